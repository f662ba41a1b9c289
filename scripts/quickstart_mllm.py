"""The MLLM half of the quick start: code extraction, MLLM training, VQA and text-to-image scoring.

Each function is one stage of :mod:`unitok.scripts.quickstart`; it reads what the earlier stages wrote
under the quick start's folder and returns a JSON-ready dict that the report uses. The stages call the
project's own commands (``unitok extract-codes``, ``unitok train-mllm``, ``unitok eval-vqa``,
``unitok eval-geneval``) in-process when they are installed, and otherwise the library functions that
those commands are built on (``UniTok.encode``, ``UniTokMLLM.forward``/``answer``/``generate_images``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class MLLMRecipe:
    """The quick start's MLLM: a small random-init Llama on the tiny word-level vocabulary, trained from
    scratch on the world's question/answer pairs (image -> text) and captions (text -> image codes)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 176
    depth_width: int = 64
    depth_layers: int = 2
    depth_heads: int = 4
    # Many small steps, most of them image -> text: the LLM learns to look up the object that a question names
    # only after a few thousand steps. 2,400 x 16 with a quarter for generation gives VQA 63 % (52 % at 800 x 32
    # half and half) for 1.15x the time, and GenEval 0.09 against 0.13; 3,200 steps give 65 % but took the whole
    # quick start to 15 min 18 s on a 2-core box where 2,400 took 14 min 54 s (BENCHMARKS.md, "Quick start").
    steps: int = 2400
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 50  # library path only; the command uses its preset's warmup ratio
    # Fraction of each batch that is text -> image (the rest: one question about one image).
    generation_fraction: float = 0.25
    cfg_dropout: float = 0.1
    # The visual input merger (MLLMConfig.projector) and the reach of the "window" one: each visual token from
    # its position's codes and those of its earlier neighbours on the grid (a masked 3x3 window). At equal steps
    # and cost it lowers the code loss by 9 % and lifts GenEval from 0.08 to 0.11 over the per-position MLP
    # (two seeds each), with the same VQA accuracy (BENCHMARKS.md, "Quick start").
    projector: str = "window"
    projector_window: int = 1
    projector_hidden: int | None = None  # the projector MLP's inner width (None: the LLM's hidden size)
    # One matrix for the LLM's input embeddings and its output layer (LlamaConfig.tie_word_embeddings).
    tie_embeddings: bool = False
    seed: int = 0

    def llm_fields(self, max_positions: int) -> dict:
        """The inline ``LlamaConfig`` fields of the recipe's LLM."""
        return {
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": max_positions,
            "tie_word_embeddings": self.tie_embeddings,
        }


@dataclass
class SamplingRecipe:
    """Text-to-image sampling settings of the quick start's GenEval run."""

    # None: the default of ``unitok eval-geneval`` (the synthetic GenEval target is set at those).
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    images_per_prompt: int = 4
    seed: int = 0


def command_module(name: str) -> Any | None:
    """The module of ``unitok NAME`` when the command exists, else ``None``."""
    from unitok.scripts.cli import COMMANDS

    if name not in COMMANDS:
        return None
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ImportError as err:  # an optional dependency of that command is missing
        logger.warning("unitok %s is listed but cannot be imported (%s); using the library", name, err)
        return None


# ---------------------------------------------------------------------------------------------- records


def read_records(world: Path, split: str) -> list[dict]:
    """The world's caption records of ``split`` (``captions/{split}.jsonl``)."""
    path = world / "captions" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected the synthetic world written by the world stage")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- codes


def extract_codes(tokenizer_dir: Path, world: Path, out: Path, splits=("train", "test")) -> dict:
    """Encode every world image of ``splits`` into UniTok codes: ``out/{split}.npy`` ([N,h,w,K] uint16) and
    ``out/{split}.ids.json`` (the record ids in the same order)."""
    from PIL import Image
    from tqdm import tqdm

    from unitok.tokenizer import UniTok
    from unitok.tokenizer.preprocess import load_image

    model = UniTok.from_pretrained(tokenizer_dir).eval()
    size = model.config.image_size
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        records = read_records(world, split)
        chunks, batch = [], 128
        for start in tqdm(range(0, len(records), batch), desc=f"codes {split}", leave=False):
            imgs = []
            for rec in records[start : start + batch]:
                with Image.open(world / rec["image"]) as im:
                    imgs.append(load_image(im, size=size))
            with torch.no_grad():
                chunks.append(model.encode(torch.stack(imgs)).to(torch.int32).numpy().astype(np.uint16))
        codes = np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 1), np.uint16)
        tmp = out / f"{split}.tmp.npy"
        np.save(tmp, codes)
        tmp.replace(out / f"{split}.npy")
        (out / f"{split}.ids.json").write_text(json.dumps([r["id"] for r in records]))
        counts[split] = int(codes.shape[0])
    grid = list(codes.shape[1:])
    return {"images": counts, "grid": grid, "dir": str(out), "via": "library (UniTok.encode)"}


def load_codes(codes_dir: Path, split: str) -> tuple[torch.Tensor, list[str]]:
    """Codes [N,h,w,K] (int64) and ids written by :func:`extract_codes`."""
    codes = torch.from_numpy(np.load(codes_dir / f"{split}.npy").astype(np.int64))
    ids = json.loads((codes_dir / f"{split}.ids.json").read_text())
    return codes, ids


# ---------------------------------------------------------------------------------------------- MLLM


def build_mllm(tokenizer_dir: Path, recipe: MLLMRecipe):
    from unitok.mllm import MLLMConfig, UniTokMLLM

    config = MLLMConfig.preset(
        "tiny",
        llm=recipe.llm_fields(512),
        unitok=str(Path(tokenizer_dir).resolve()),
        unitok_preset=None,
        depth_width=recipe.depth_width,
        depth_layers=recipe.depth_layers,
        depth_heads=recipe.depth_heads,
        cfg_dropout=recipe.cfg_dropout,
        projector=recipe.projector,
        projector_window=recipe.projector_window,
        projector_hidden=recipe.projector_hidden,
        max_length=256,
    )
    torch.manual_seed(recipe.seed)
    return UniTokMLLM.from_config(config)


def _question_text(question: str) -> str:
    from unitok.data.formats import SHORT_ANSWER_PROMPT

    return f"<image>\n{question}\n{SHORT_ANSWER_PROMPT}"


def train_mllm(
    tokenizer_dir: Path, world: Path, codes_dir: Path, out: Path, recipe: MLLMRecipe, progress: bool = True
) -> dict:
    """Train the quick start's MLLM from scratch and save it to ``out`` (``UniTokMLLM.save_pretrained``)."""
    from tqdm import tqdm

    from unitok.mllm import GenerationSample, MLLMCollator, UnderstandingSample

    model = build_mllm(tokenizer_dir, recipe)
    codes, ids = load_codes(codes_dir, "train")
    records = {r["id"]: r for r in read_records(world, "train")}
    qa_items = [(i, qa) for i, sid in enumerate(ids) for qa in records[sid]["qa"]]
    captions = [records[sid]["caption"] for sid in ids]
    collator = MLLMCollator(model.builder, cfg_dropout=recipe.cfg_dropout)
    rng = random.Random(recipe.seed)
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n_gen = round(recipe.batch * recipe.generation_fraction)
    model.train()
    history: list[dict] = []
    running: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="mllm", disable=not progress, leave=False)
    for step in bar:
        samples: list[Any] = []
        for _ in range(recipe.batch - n_gen):
            i, qa = qa_items[rng.randrange(len(qa_items))]
            samples.append(UnderstandingSample([(_question_text(qa["question"]), qa["answer"])], [codes[i]]))
        for _ in range(n_gen):
            i = rng.randrange(len(ids))
            samples.append(GenerationSample(captions[i], codes[i]))
        batch = collator(samples)
        out_ = model(batch)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for key in ("loss", "text_loss", "code_loss"):
            running[key] += float(getattr(out_, key).detach())
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            n = (step % 100) + 1
            entry = {"step": step + 1, **{k: round(v / n, 4) for k, v in running.items()}}
            history.append(entry)
            running.clear()
            bar.set_postfix(loss=entry["loss"])
            logger.info("mllm step %d: %s", step + 1, entry)
    model.eval()
    model.save_pretrained(out)
    return {
        "dir": str(out),
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in params),
        "history": history,
        "final": history[-1] if history else {},
        "train_seconds": time.perf_counter() - started,
        "via": "library (UniTokMLLM.forward, AdamW)",
    }


# ---------------------------------------------------------------------------------------------- VQA


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".")


def eval_vqa_library(
    model_dir: Path, world: Path, codes_dir: Path, batch: int = 64, limit: int | None = None
) -> dict:
    """Greedy answers to every test question, exact match per question kind."""
    from unitok.mllm import UniTokMLLM

    model = UniTokMLLM.from_pretrained(model_dir).eval()
    codes, ids = load_codes(codes_dir, "test")
    records = {r["id"]: r for r in read_records(world, "test")}
    items = [(i, sid, qa) for i, sid in enumerate(ids) for qa in records[sid]["qa"]][:limit]
    rows = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        answers = model.answer(
            codes[[i for i, _, _ in chunk]],
            [_question_text(qa["question"]) for _, _, qa in chunk],
            max_new_tokens=4,
        )
        for (_, sid, qa), pred in zip(chunk, answers):
            rows.append(
                {
                    "id": sid,
                    "kind": qa["kind"],
                    "question": qa["question"],
                    "answer": qa["answer"],
                    "prediction": pred,
                    "correct": normalise_answer(pred) == normalise_answer(qa["answer"]),
                }
            )
    return summarise_vqa(rows, via="library (UniTokMLLM.answer, exact match)")


def summarise_vqa(rows: list[dict], via: str) -> dict:
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        per_kind[row["kind"]].append(bool(row["correct"]))
    return {
        "overall": 100 * sum(r["correct"] for r in rows) / max(1, len(rows)),
        "per_type": {k: 100 * sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "questions": len(rows),
        "examples": rows[:40],
        "via": via,
    }


# ---------------------------------------------------------------------------------------------- generation


def geneval_prompts(world: Path) -> list[dict]:
    path = world / "geneval" / "evaluation_metadata.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generate_for_prompts(model, prompts: list[str], sampling: SamplingRecipe, batch: int = 64) -> list[list]:
    """``images_per_prompt`` decoded PIL images per prompt."""
    from tqdm import tqdm

    flat = [p for p in prompts for _ in range(sampling.images_per_prompt)]
    images: list = []
    for start in tqdm(range(0, len(flat), batch), desc="generate", leave=False):
        out = model.generate_images(
            flat[start : start + batch],
            cfg_scale=1.0 if sampling.cfg_scale is None else sampling.cfg_scale,
            temperature=1.0 if sampling.temperature is None else sampling.temperature,
            top_k=sampling.top_k or 0,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            seed=sampling.seed + start,
        )
        images.extend(out.images)
    n = sampling.images_per_prompt
    return [images[i * n : (i + 1) * n] for i in range(len(prompts))]


def count_kinds(rows: list[dict]) -> dict[str, int]:
    return dict(Counter(r["kind"] for r in rows))


def geneval_correct(meta: dict, detections: list) -> bool:
    """GenEval's rule for one image: every ``include`` group found in number (colour and relative position
    where asked), no ``exclude`` class found in the excluded number. Detections are per-pixel analyses of
    the synthetic world (:func:`unitok.data.detect.detect_objects`), so class and colour are exact."""
    from unitok.data.world import relations

    by_class: dict[str, list] = defaultdict(list)
    for det in detections:
        by_class[det.shape].append(det)
    matched_groups: list[list | None] = []
    correct = True
    for req in meta.get("include", []):
        found = by_class.get(req["class"], [])
        if "color" in req:
            found = [d for d in found if d.color == req["color"]]
        found = found[: req["count"]]
        matched = len(found) >= req["count"]
        if matched and "position" in req:
            rel, target = req["position"]
            group = matched_groups[target] if target < len(matched_groups) else None
            matched = group is not None and all(
                rel in relations(a.bbox, b.bbox) for a in found for b in group
            )
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        if len(by_class.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def score_geneval_library(metas: list[dict], images: list[list]) -> dict:
    """GenEval scores (per tag and overall = mean of the tags) of ``images[i]`` generated for ``metas[i]``."""
    from unitok.data.detect import detect_objects

    per_tag: dict[str, list[float]] = defaultdict(list)
    rows = []
    for meta, imgs in zip(metas, images):
        flags = [geneval_correct(meta, detect_objects(im)) for im in imgs]
        per_tag[meta["tag"]].extend(float(f) for f in flags)
        rows.append({"prompt": meta["prompt"], "tag": meta["tag"], "correct": flags})
    tags = {t: sum(v) / len(v) for t, v in per_tag.items()}
    return {
        "overall": sum(tags.values()) / max(1, len(tags)),
        "per_tag": tags,
        "prompts": len(metas),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------- commands

COMMANDS: tuple[str, ...] = ("extract-codes", "train-mllm", "eval-vqa", "eval-geneval")
MLLM_PRESET = "mllm-tiny-synth"


def commands_available() -> bool:
    """True when every command the MLLM stages call is installed."""
    return all(command_module(name) is not None for name in COMMANDS)


def _run_command(name: str, argv: list[str]) -> None:
    module = command_module(name)
    logger.info("unitok %s %s", name, " ".join(argv))
    status = module.main(argv, prog=f"unitok {name}")
    if status:
        raise RuntimeError(f"unitok {name} failed with exit status {status} (arguments: {argv})")


def extract_codes_command(tokenizer_dir: Path, world: Path, out: Path, progress: bool) -> dict:
    """``unitok extract-codes`` for the world's train and test splits (one code store each)."""
    from unitok.data.codes import store_summary

    result = {}
    for split in ("train", "test"):
        argv = ["--tokenizer", str(tokenizer_dir), "--data", str(world), "--out", str(out / split)]
        argv += ["--split", split, "--workers", "0", *([] if progress else ["--no-progress"])]
        _run_command("extract-codes", argv)
        result[split] = store_summary(out / split)
    images = {split: int(summary["rows"]) for split, summary in result.items()}
    return {"stores": result, "images": images, "dir": str(out), "via": "unitok extract-codes"}


def mllm_overrides(recipe: MLLMRecipe) -> list[str]:
    """``unitok train-mllm`` overrides that give the ``mllm-tiny-synth`` preset this recipe."""
    return [
        f"model.config.llm={json.dumps(recipe.llm_fields(1024))}",
        f"model.config.depth_width={recipe.depth_width}",
        f"model.config.depth_layers={recipe.depth_layers}",
        f"model.config.depth_heads={recipe.depth_heads}",
        f"model.config.cfg_dropout={recipe.cfg_dropout}",
        f"model.config.projector={recipe.projector}",
        f"model.config.projector_window={recipe.projector_window}",
        f"model.config.projector_hidden={'null' if recipe.projector_hidden is None else recipe.projector_hidden}",
        f"data.mixture={json.dumps({'understanding': 1 - recipe.generation_fraction, 'generation': recipe.generation_fraction})}",
        f"data.seed={recipe.seed}",
        f"training.max_steps={recipe.steps}",
        f"training.per_device_train_batch_size={recipe.batch}",
        f"training.learning_rate={recipe.lr}",
        f"training.weight_decay={recipe.weight_decay}",
        f"training.seed={recipe.seed}",
        f"training.save_steps={max(recipe.steps, 1)}",
        "training.report_to=[]",
    ]


def train_mllm_command(codes_dir: Path, out: Path, recipe: MLLMRecipe, progress: bool) -> dict:
    """``unitok train-mllm --config mllm-tiny-synth`` on the train code store, with this recipe."""
    from unitok.mllm.train import train
    from unitok.mllm.training.config import load_run_config

    overrides = [
        f"output_dir={json.dumps(str(out))}",
        f"data.stores={json.dumps([str(codes_dir / 'train')])}",
    ]
    overrides += mllm_overrides(recipe)
    if not progress:
        overrides.append("training.disable_tqdm=true")
    logger.info("unitok train-mllm --config %s %s", MLLM_PRESET, " ".join(f"--set {o}" for o in overrides))
    started = time.perf_counter()
    result = train(load_run_config(MLLM_PRESET, overrides))
    history = [
        {k: h[k] for k in ("step", "loss", "text_loss", "code_loss", "learning_rate") if k in h}
        for h in result.log_history
        if "loss" in h
    ]
    from unitok.mllm import UniTokMLLM

    model = UniTokMLLM.from_pretrained(result.final_dir)
    return {
        "dir": str(result.final_dir),
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for _, p in model.trainable_parameters()),
        "history": history,
        "final": history[-1] if history else {},
        "steps": result.global_step,
        "train_seconds": time.perf_counter() - started,
        "command": f"unitok train-mllm --config {MLLM_PRESET} " + " ".join(f"--set '{o}'" for o in overrides),
        "via": "unitok train-mllm",
    }


def eval_vqa_command(
    model_dir: Path, world: Path, out: Path, batch: int = 64, limit: int | None = None
) -> dict:
    """``unitok eval-vqa --tasks synth_vqa`` (lmms-eval) on the world's test questions."""
    argv = ["--model", str(model_dir), "--tasks", "synth_vqa", "--data", str(world), "--out", str(out)]
    argv += ["--batch-size", str(batch), "--device", "cpu", "--no-cache"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    _run_command("eval-vqa", argv)
    report = json.loads((out / "results.json").read_text())
    metrics = report["tasks"]["synth_vqa"]
    scale = 100.0  # lmms-eval's synth_vqa aggregations are fractions
    questions = [
        json.loads(line)
        for f in sorted((out / "lmms_tasks").glob("*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    samples = [
        json.loads(line)
        for line in (out / "samples_synth_vqa.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rows = []
    for sample in samples:
        doc = (
            questions[sample["doc_id"]]
            if sample.get("doc_id") is not None and sample["doc_id"] < len(questions)
            else {}
        )
        rows.append(
            {
                "id": Path(doc.get("image", "")).stem,
                "image": doc.get("image"),
                "kind": doc.get("kind"),
                "question": doc.get("question"),
                "answer": sample.get("target"),
                "prediction": sample.get("prediction"),
                "correct": normalise_answer(str(sample.get("prediction", "")))
                == normalise_answer(str(sample.get("target", ""))),
            }
        )
    per_type = {
        k: scale * metrics[k]
        for k in ("color", "shape", "count", "position", "existence")
        if metrics.get(k) is not None
    }
    return {
        "overall": scale * metrics["overall"],
        "per_type": per_type,
        "questions": report["questions"]["synth_vqa"],
        "examples": rows[:40],
        "results": str(out / "results.json"),
        "via": "unitok eval-vqa (lmms-eval)",
    }


def eval_geneval_command(
    model_dir: Path, world: Path, out: Path, sampling: SamplingRecipe, limit: int | None
) -> dict:
    """``unitok eval-geneval --scorer synthetic`` on the world's GenEval prompts."""
    prompts = world / "geneval" / "evaluation_metadata.jsonl"
    if limit is not None:
        out.mkdir(parents=True, exist_ok=True)
        lines = _spread(geneval_prompts(world), limit)
        prompts = out.parent / "geneval_prompts_subset.jsonl"
        prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--scorer", "synthetic"]
    argv += [
        "--n-samples",
        str(sampling.images_per_prompt),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]
    for name, flag in (
        ("cfg_scale", "--cfg-scale"),
        ("temperature", "--temperature"),
        ("top_k", "--top-k"),
        ("top_p", "--top-p"),
    ):
        value = getattr(sampling, name)
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--seed", str(sampling.seed)]
    _run_command("eval-geneval", argv)
    report = json.loads((out / "results.json").read_text())
    score = report["score"]
    metas, images = read_geneval_folder(out)
    return {
        "overall": score["overall"],
        "per_tag": score.get("tags", {}),
        "prompts": len(metas),
        "sampling": report.get("sampling", {}),
        "results": str(out / "results.json"),
        "metas": metas,
        "images": images,
        "via": "unitok eval-geneval --scorer synthetic",
    }


def read_geneval_folder(out: Path) -> tuple[list[dict], list[list]]:
    """Metadata and the PIL images of every prompt folder ``<index:05d>`` of a GenEval image folder."""
    from PIL import Image

    metas, images = [], []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit()):
        metas.append(json.loads((d / "metadata.jsonl").read_text().splitlines()[0]))
        imgs = []
        for path in sorted((d / "samples").glob("*.png")):
            with Image.open(path) as im:
                imgs.append(im.convert("RGB"))
        images.append(imgs)
    return metas, images


def _spread(items: list[dict], n: int) -> list[dict]:
    """``n`` items taken round-robin over the tags (all when n is at least the total)."""
    by_tag: dict[str, list[dict]] = {}
    for item in items:
        by_tag.setdefault(item["tag"], []).append(item)
    picked: list[dict] = []
    while len(picked) < min(n, len(items)):
        for group in by_tag.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return picked
