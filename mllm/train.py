"""Train the MLLM: ``unitok train-mllm --config NAME [--set key=value ...]`` (or ``python -m unitok.mllm.train``).

Launch one process per GPU with torchrun, as with LLaVA / Liquid::

    torchrun --nproc_per_node 8 -m unitok.mllm.train --config llama2-7b-pretrain \\
        --set data.stores=[codes/pretrain] --set output_dir=runs/pretrain

The run config (``unitok.mllm.training.config``) names the model, the data mixture, the stage (alignment,
full or LoRA) and the ``transformers.TrainingArguments`` (DeepSpeed ZeRO-2/3 by shipped name, bf16,
accumulation, warmup + cosine, TensorBoard ...). ``resume: auto`` (the default) continues from the newest
complete ``checkpoint-N`` of ``output_dir``, so a killed run restarts with the same command. The trained
model is written to ``OUTPUT_DIR/final`` (``UniTokMLLM.from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unitok.data.codes import CodeStore, read_store_info
from unitok.data.mllm_data import (
    Collator,
    MixtureDataset,
    MixtureSampler,
    conversation_turns,
    read_text_samples,
)
from unitok.mllm.config import MLLM_PRESETS, MLLMConfig
from unitok.mllm.training.config import RunConfig, load_deepspeed_config, load_run_config, preset_names
from unitok.tokenizer.training.config import to_float

logger = logging.getLogger(__name__)

FINAL_FOLDER = "final"
TEXT_TOKENIZER_FOLDER = "text_tokenizer"
DATA_SUMMARY = "data_summary.json"
PROBE_FILE = "probe.json"


@dataclass
class TrainResult:
    """What a run returns: where it wrote, how far it got, and its logged history."""

    output_dir: Path
    final_dir: Path
    global_step: int
    resumed_from: str | None
    log_history: list[dict[str, Any]]
    data_summary: dict[str, Any]


def _tokenizer_corpus(config: RunConfig, mllm: MLLMConfig) -> list[str]:
    """Every text the run will tokenize (for a word-level tokenizer trained on the data)."""
    corpus = [mllm.prompt_template.replace("{prompt}", ""), mllm.system_prompt, mllm.uncond_prompt]
    for path in config.data.stores:
        store = CodeStore(path)
        for caption in store.texts("caption", range(len(store))):
            if caption:
                corpus.append(caption)
        for raw in store.texts("conversations", range(len(store))):
            turns = conversation_turns(json.loads(raw)) if raw else None
            corpus += [t for turn in turns or [] for t in turn]
    from unitok.data.datasets import SkipCounter

    for path in config.data.texts:
        corpus += read_text_samples(path, SkipCounter(str(path)))
    return [text.replace(mllm.image_token, " ") for text in corpus if text]


def build_mllm_config(config: RunConfig) -> MLLMConfig:
    """The MLLM config of a run: the preset, the first store's tokenizer (unless one is named), the overrides."""
    name = config.model.preset
    if name not in MLLM_PRESETS:
        raise ValueError(f"unknown model.preset {name!r}; expected one of {sorted(MLLM_PRESETS)}")
    fields = dict(MLLM_PRESETS[name])
    overrides = dict(config.model.config)
    if config.data.stores and not {"unitok", "unitok_preset"} & set(overrides):
        # The codes must be looked up in the codebook they were extracted with.
        fields.update(unitok=read_store_info(config.data.stores[0])["tokenizer"], unitok_preset=None)
    if config.model.build_text_tokenizer:
        fields["text_tokenizer"] = TEXT_TOKENIZER_FOLDER
    return MLLMConfig.from_dict({**fields, **overrides})


def build_model(config: RunConfig, output_dir: Path, is_main: bool, tokenizer_saved: bool = False) -> Any:
    """The model to train: from its config, or from ``model.init_from`` (a checkpoint) with the overrides."""
    from unitok.mllm.model import UniTokMLLM
    from unitok.mllm.text_tokenizer import build_tiny_tokenizer, load_text_tokenizer

    if config.model.init_from is not None:
        return _from_checkpoint(Path(config.model.init_from), config.model.config)
    mllm = build_mllm_config(config)
    tokenizer = None
    if config.model.build_text_tokenizer:
        saved = output_dir / TEXT_TOKENIZER_FOLDER
        if tokenizer_saved:
            tokenizer = load_text_tokenizer(saved)
        else:
            # Every rank trains the same (deterministic) tokenizer; rank 0 keeps it for restarts.
            tokenizer = build_tiny_tokenizer(_tokenizer_corpus(config, mllm))
            if is_main:
                output_dir.mkdir(parents=True, exist_ok=True)
                tmp = output_dir / f".{TEXT_TOKENIZER_FOLDER}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tokenizer.save_pretrained(str(tmp))
                os.replace(tmp, saved)
    return UniTokMLLM.from_config(mllm, text_tokenizer=tokenizer)


def _from_checkpoint(path: Path, overrides: dict[str, Any]) -> Any:
    """A full (non-LoRA) MLLM checkpoint as the starting point of a stage, with config overrides applied."""
    from safetensors.torch import load_file

    from unitok.mllm.model import UniTokMLLM

    saved = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if saved is None:
        raise ValueError(f"model.init_from={str(path)!r} is not an MLLM checkpoint (no config.json)")
    if (path / "adapter").is_dir():
        raise ValueError(
            f"model.init_from={str(path)!r} is a LoRA checkpoint; start a stage from full weights"
        )
    fields = {**saved, "llm": str(path / saved["llm"]), "text_tokenizer": str(path / saved["text_tokenizer"])}
    if saved.get("unitok") and (path / saved["unitok"]).exists():
        fields["unitok"] = str(path / saved["unitok"])
    model = UniTokMLLM.from_config(MLLMConfig.from_dict({**fields, **overrides}))
    state = load_file(str(path / "model.safetensors"))
    for name, module in (("projector", model.projector), ("depth_head", model.depth_head)):
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
        )
    return model


def training_arguments(config: RunConfig) -> tuple[dict[str, Any], bool]:
    """``TrainingArguments`` kwargs of a run (DeepSpeed resolved to a dict), and whether to checkpoint activations."""
    kwargs = dict(config.training)
    checkpointing = bool(kwargs.pop("gradient_checkpointing", False))
    kwargs["output_dir"] = config.output_dir
    kwargs.setdefault("report_to", ["tensorboard"])
    kwargs.setdefault("save_strategy", "steps")
    kwargs["remove_unused_columns"] = False
    from transformers import TrainingArguments

    types = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    known = set(types)
    for key, value in kwargs.items():
        # YAML reads 5e-3 (no dot) as a string, which TrainingArguments would keep as one.
        if isinstance(value, str) and types.get(key) in (float, "float"):
            kwargs[key] = to_float(value, f"training.{key}")
    if "warmup_ratio" in kwargs and "warmup_ratio" not in known:
        # LLaVA-style scripts say warmup_ratio; transformers >= 5 reads a fraction < 1 from warmup_steps.
        kwargs["warmup_steps"] = float(kwargs.pop("warmup_ratio"))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown transformers.TrainingArguments field(s) under training: {unknown}")
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.setdefault("ddp_backend", "gloo")
    if kwargs.get("deepspeed") is not None:
        ds = dict(load_deepspeed_config(kwargs["deepspeed"]))
        # The Trainer fills "auto" batch sizes from its own world size, which is 1 on a CPU-only DeepSpeed run;
        # DeepSpeed derives the global batch from these two and the real world size.
        ds["train_micro_batch_size_per_gpu"] = kwargs.get("per_device_train_batch_size", 8)
        ds["gradient_accumulation_steps"] = kwargs.get("gradient_accumulation_steps", 1)
        ds.pop("train_batch_size", None)
        kwargs["deepspeed"] = ds
        if not torch.cuda.is_available():
            # DeepSpeed picks its accelerator at import; without a GPU it must be told to run on the CPU.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return kwargs, checkpointing


def _fill_model_sizes(ds: dict[str, Any], model: Any) -> None:
    """Fill DeepSpeed's "auto" bucket sizes from the LLM's hidden size H, with the Trainer's rules (H*H, 0.9*H*H,
    10*H); the Trainer reads H from ``model.config``, which for the MLLM is not the LLM's config."""
    llm = model.llm.get_base_model() if hasattr(model.llm, "peft_config") else model.llm
    hidden = llm.config.hidden_size
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero = ds.get("zero_optimization", {})
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def train(config: RunConfig) -> TrainResult:
    """Run (or continue) one training run; see the module docstring."""
    import transformers
    from transformers import TrainingArguments

    from unitok.mllm.training.model_setup import apply_stage, detach_unitok
    from unitok.mllm.training.trainer import STAGING, MLLMTrainer

    output_dir = Path(config.output_dir)
    kwargs, checkpointing = training_arguments(config)
    is_main = int(os.environ.get("RANK", "0")) == 0
    # The model is built before TrainingArguments exist, so that ZeRO-3 does not partition it at construction:
    # a random-init model is then the same under every engine, and the engine partitions it when it starts.
    transformers.set_seed(int(kwargs.get("seed", 42)))
    model = build_model(config, output_dir, is_main, (output_dir / TEXT_TOKENIZER_FOLDER).is_dir())
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if cpu_group and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    args = TrainingArguments(**kwargs)
    if cpu_group and args.world_size != torch.distributed.get_world_size():
        # accelerate counts a DeepSpeed run without a GPU as one process (it has no backend name for it) and would
        # then give every rank every batch; its shared state is corrected here, before the Trainer reads it.
        state = args.distributed_state
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(output_dir / STAGING, ignore_errors=True)
        (output_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    args.distributed_state.wait_for_everyone()

    masked = apply_stage(model, config.stage)
    if checkpointing:
        model.enable_gradient_checkpointing()
    unitok = detach_unitok(model)
    if args.deepspeed:
        _fill_model_sizes(args.hf_deepspeed_config.config, model)
    dataset = MixtureDataset(model.builder, config.data.stores, config.data.texts, seed=config.data.seed)
    summary = {kind: s.to_dict() for kind, s in dataset.summary.items()}
    if is_main:
        (output_dir / DATA_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    sampler = MixtureSampler(
        dataset,
        config.data.mixture,
        num_samples=config.data.samples_per_epoch,
        seed=config.data.seed,
        batch_size=args.per_device_train_batch_size,
        world_size=args.world_size,
        group_by_length=config.data.group_by_length,
        group_batches=config.data.group_batches,
    )
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    logger.info(
        "stage %s: %d trainable parameters; %d samples per epoch from %s",
        config.stage,
        trainable,
        len(sampler),
        summary,
    )
    trainer = MLLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(model.builder.ids.pad),
        sampler=sampler,
        unitok=unitok,
        masked_parameters=masked,
    )
    resume = config.resume
    if resume == "auto":
        resume = _last_checkpoint(output_dir)
    if resume is not None:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    final = output_dir / FINAL_FOLDER
    trainer.export_final(final)
    probe_keys = sampler.order(0)[: args.per_device_train_batch_size].tolist()
    loss = trainer.probe_loss(Collator(model.builder.ids.pad)([dataset[k] for k in probe_keys]))
    if is_main:
        (output_dir / PROBE_FILE).write_text(json.dumps({"keys": probe_keys, "loss": loss}) + "\n")
    return TrainResult(
        output_dir=output_dir,
        final_dir=final,
        global_step=trainer.state.global_step,
        resumed_from=resume,
        log_history=list(trainer.state.log_history),
        data_summary=summary,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok train-mllm``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train the UniTok MLLM with transformers' Trainer (DeepSpeed ZeRO-2/3 under torchrun). "
        f"Presets: {', '.join(preset_names())}.",
    )
    p.add_argument("--config", required=True, help="a preset name or a YAML/JSON run-config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config entry, e.g. --set training.learning_rate=2e-5 (repeatable)",
    )
    p.add_argument(
        "--resume", default=None, help="'auto' (default of the presets), 'none', or a checkpoint-N folder"
    )
    p.add_argument("--deepspeed", default=None, help="zero2 | zero3 | zero3_offload or a DeepSpeed JSON file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok train-mllm``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={'null' if args.resume == 'none' else args.resume}")
    if args.deepspeed is not None:
        overrides.append(f"training.deepspeed={args.deepspeed}")
    try:
        config = load_run_config(args.config, overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = train(config)
    last = next((h for h in reversed(result.log_history) if "loss" in h), {})
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained to step {result.global_step} in {time.perf_counter() - started:.0f} s"
            + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
            + f"; last loss {last.get('loss')}; model in {result.final_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
