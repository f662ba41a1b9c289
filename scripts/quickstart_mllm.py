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

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    depth_width: int = 128
    depth_layers: int = 2
    depth_heads: int = 4
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 50
    # Fraction of each batch that is text -> image (the rest: one question about one image).
    generation_fraction: float = 0.5
    cfg_dropout: float = 0.1
    seed: int = 0


@dataclass
class SamplingRecipe:
    """Text-to-image sampling settings of the quick start's GenEval run."""

    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
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
        llm={
            "hidden_size": recipe.hidden,
            "num_hidden_layers": recipe.layers,
            "num_attention_heads": recipe.heads,
            "num_key_value_heads": recipe.heads,
            "intermediate_size": recipe.intermediate,
            "max_position_embeddings": 512,
        },
        unitok=str(Path(tokenizer_dir).resolve()),
        unitok_preset=None,
        depth_width=recipe.depth_width,
        depth_layers=recipe.depth_layers,
        depth_heads=recipe.depth_heads,
        cfg_dropout=recipe.cfg_dropout,
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


def eval_vqa_library(model_dir: Path, world: Path, codes_dir: Path, batch: int = 64) -> dict:
    """Greedy answers to every test question, exact match per question kind."""
    from unitok.mllm import UniTokMLLM

    model = UniTokMLLM.from_pretrained(model_dir).eval()
    codes, ids = load_codes(codes_dir, "test")
    records = {r["id"]: r for r in read_records(world, "test")}
    items = [(i, sid, qa) for i, sid in enumerate(ids) for qa in records[sid]["qa"]]
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
            cfg_scale=sampling.cfg_scale,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
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
