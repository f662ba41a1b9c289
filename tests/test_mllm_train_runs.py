"""train-mllm end to end on CPU: SIGKILL and resume, stages (alignment rows, LoRA adapter), ZeRO-2/3 with two
processes against one, the ZeRO-3 export, and overfitting synthetic-world samples through the command line."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_mllm_train_helpers import make_folder, one_thread, save_tiny_unitok  # noqa: F401 (autouse fixture)

from unitok.data.extract import extract_codes
from unitok.mllm import UniTokMLLM
from unitok.mllm.config import MLLM_PRESETS
from unitok.mllm.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# The tiny preset's LLM with its output layer tied to its input embedding.
TIED_LLM = {**MLLM_PRESETS["tiny"]["llm"], "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm_data")
    tokenizer = save_tiny_unitok(root / "unitok")
    extract_codes(
        tokenizer, str(make_folder(root / "data", 8)), root / "codes", num_workers=0, progress=False
    )
    return root / "codes"


def args(store, out, steps=4, **sets):
    """CLI arguments of a short tiny run (batch 4, checkpoints every 2 steps)."""
    values = {
        "data.stores": f"[{store}]",
        "output_dir": str(out),
        "data.group_batches": 1,
        "training.max_steps": steps,
        "training.save_steps": 2,
        "training.logging_steps": 1,
        "training.per_device_train_batch_size": 4,
        "training.report_to": "[]",
        **sets,
    }
    out = ["--config", "mllm-tiny-synth"]
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def losses(out):
    state = json.loads(max(Path(out).glob("checkpoint-*/trainer_state.json")).read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def same_state(a, b):
    sa, sb = UniTokMLLM.from_pretrained(a).state_dict(), UniTokMLLM.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_to_the_same_weights(store, tmp_path):
    assert train_main(args(store, tmp_path / "whole", steps=8)) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "unitok.mllm.train", *args(store, out, steps=8)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and done[-1] < 8
    assert train_main(args(store, out, steps=8)) == 0
    assert (out / "final").is_dir() and not (out / ".staging" / "checkpoint-8").exists()
    assert same_state(tmp_path / "whole" / "final", out / "final")
    # A checkpoint's export loads on its own.
    assert (
        UniTokMLLM.from_pretrained(out / "checkpoint-8" / "mllm").config
        == UniTokMLLM.from_pretrained(out / "final").config
    )


def test_tied_embeddings_save_once_resume_and_export_tied(store, tmp_path):
    sets = {"model.config.llm": json.dumps(TIED_LLM)}
    whole = tmp_path / "whole"
    assert train_main(args(store, whole, steps=4, **sets)) == 0
    saved = load_file(str(whole / "checkpoint-2" / "model.safetensors"))
    assert "llm.model.embed_tokens.weight" in saved and "llm.lm_head.weight" not in saved
    # The same command resumes a run stopped after checkpoint-2 and ends with the uninterrupted run's weights.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert train_main(args(store, resumed, steps=4, **sets)) == 0
    assert same_state(whole / "final", resumed / "final")
    model = UniTokMLLM.from_pretrained(resumed / "final")
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    # A checkpoint that lacks an untied weight is refused, not resumed with that weight at its initial value.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(whole / "checkpoint-2", broken / "checkpoint-2")
    weights = broken / "checkpoint-2" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors[next(k for k in tensors if k.startswith("projector."))]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="missing"):
        train_main(args(store, broken, steps=4, **sets))


def test_alignment_trains_only_the_new_token_rows_and_lora_saves_an_adapter(store, tmp_path):
    out = tmp_path / "align"
    assert train_main(args(store, out, steps=2, stage="alignment", **{"training.save_steps": 1})) == 0
    before, after = (load_file(str(out / p / "model.safetensors")) for p in ("checkpoint-1", "checkpoint-2"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("projector.") for k in changed) and any(
        k.startswith("depth_head.") for k in changed
    )
    assert all(
        k.startswith(("projector.", "depth_head.")) or "embed_tokens" in k or "lm_head" in k for k in changed
    )
    model = UniTokMLLM.from_pretrained(out / "final")
    rows = sorted({model.builder.ids.boi, model.builder.ids.eoi, model.builder.ids.image})
    for name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        diff = (before[name] != after[name]).any(dim=1).nonzero().flatten().tolist()
        assert diff and set(diff) <= set(rows), name

    out = tmp_path / "lora"
    sets = {"stage": "lora", "model.config.lora_r": 4, "model.config.lora_alpha": 8}
    assert train_main(args(store, out, steps=2, **sets)) == 0
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    probe = json.loads((out / "probe.json").read_text())
    model = UniTokMLLM.from_pretrained(out / "final").eval()
    assert model.config.lora_r == 4
    assert _loss(model, store, probe["keys"]) == pytest.approx(probe["loss"], abs=1e-5)


def _loss(model, store, keys):
    """The model's loss on dataset keys of a run (the same scan and CFG draws as in training)."""
    from unitok.data.mllm_data import Collator, MixtureDataset
    from unitok.mllm.sequence import MLLMBatch
    from unitok.mllm.training.model_setup import detach_unitok

    data = MixtureDataset(model.builder, [store])
    detach_unitok(model)
    with torch.no_grad():
        return float(model(MLLMBatch(**Collator(model.builder.ids.pad)([data[k] for k in keys]))).loss)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# SGD keeps the comparison tight: Adam's first steps move every weight by about +-lr whatever the size of its
# gradient, so float-rounding differences of near-zero gradients would show up in the loss.
EXACT = {
    "training.optim": "sgd",
    "training.learning_rate": 0.1,
    "training.warmup_ratio": 0.0,
    # Length grouping forms its groups per global step, so it would split a step's samples differently.
    "data.group_by_length": False,
}


def _torchrun(store, out, stage_config, **sets):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "unitok.mllm.train",
        *args(
            store,
            out,
            steps=3,
            **EXACT,
            **{"training.per_device_train_batch_size": 2, "training.deepspeed": stage_config},
            **sets,
        ),
    ]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero,tied", [("zero2", False), ("zero3", False), ("zero3", True)])
def test_two_processes_match_one_at_equal_global_batch(store, tmp_path, zero, tied):
    reference = tmp_path / "one"
    # tied: an LLM whose output layer is its input embedding, partitioned by ZeRO-3 as one parameter.
    model = {"model.config.llm": json.dumps(TIED_LLM)} if tied else {}
    sets = {"training.per_device_train_batch_size": 2, "training.gradient_accumulation_steps": 2, **EXACT}
    assert train_main(args(store, reference, steps=3, **sets, **model)) == 0
    _torchrun(store, tmp_path / zero, zero, **model)
    one, two = losses(reference), losses(tmp_path / zero)
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-5)
    assert len(set(one)) == 3
    # The export gathered from the engine gives the engine's loss in one process.
    probe = json.loads((tmp_path / zero / "probe.json").read_text())
    exported = UniTokMLLM.from_pretrained(tmp_path / zero / "final").eval()
    assert _loss(exported, store, probe["keys"]) == pytest.approx(probe["loss"], abs=1e-5)
    if tied:
        assert exported.llm.get_output_embeddings().weight is exported.llm.get_input_embeddings().weight


@pytest.mark.slow
def test_overfitting_through_the_command_line_answers_and_generates(tmp_path):
    from unitok.data.synth import SynthConfig, generate_world
    from unitok.scripts.cli import main as cli

    world = tmp_path / "world"
    generate_world(world, SynthConfig(num_images=3, classify_per_class=0, geneval_per_tag={}), workers=1)
    tokenizer = save_tiny_unitok(tmp_path / "unitok")
    assert (
        cli(
            [
                "extract-codes",
                "--tokenizer",
                str(tokenizer),
                "--data",
                str(world),
                "--out",
                str(tmp_path / "codes"),
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    sets = {
        "training.learning_rate": 3e-3,
        "training.per_device_train_batch_size": 4,
        "training.save_steps": 1000,
        "training.logging_steps": 50,
        "model.config.cfg_dropout": 0.0,
    }
    assert cli(["train-mllm", *args(tmp_path / "codes", tmp_path / "run", steps=200, **sets)]) == 0
    model = UniTokMLLM.from_pretrained(tmp_path / "run" / "final").eval()
    from unitok.data.codes import CodeStore

    store = CodeStore(tmp_path / "codes")
    for i in range(len(store)):
        record = store[i]
        codes = torch.from_numpy(record.codes)
        question, answer = record.conversations[0]["value"], record.conversations[1]["value"]
        assert model.answer(codes, question, max_new_tokens=12) == [answer]
        generated = model.generate_images([record.caption], temperature=0.0, decode=False).codes
        assert torch.equal(generated[0].cpu(), codes)
