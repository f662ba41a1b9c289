"""GenEval for the MLLM: ``unitok eval-geneval``.

Two halves:

1. **Folder writer** (:func:`write_geneval_folder`): generates ``n_samples`` (4) images per prompt of a GenEval
   ``evaluation_metadata.jsonl`` into GenEval's layout, ``<out>/<index:05d>/metadata.jsonl`` (the prompt's line)
   + ``samples/<n:04d>.png`` (+ a ``grid.png`` of the samples), with the sampling settings in
   ``<out>/config.json``. Prompts are generated in fixed chunks of ``batch_size`` prompts (``n_samples`` images
   each) with seed ``seed + chunk index``, and each finished prompt folder is renamed into place, so a rerun skips
   the finished chunks and produces the same images as one uninterrupted run. GenEval's own detector-based
   scorer reads this folder unchanged (docs/EVALUATION.md gives the commands).
2. **Exact synthetic scorer** (:func:`score_folder`) for prompts over the built-in synthetic world
   (``unitok data synth`` writes them): GenEval's rules with :func:`unitok.data.detect.detect_objects`, which
   reads shape, colour and box of every object off the pixels, in place of Mask2Former + CLIP. For each
   ``include`` item at least ``count`` objects of the class (of the colour, when one is asked) must be found;
   an item with ``position: [relation, j]`` needs every such object in that relation (GenEval's rule,
   :func:`unitok.data.world.relations`) to every object matched by item j; an ``exclude`` item fails the image
   when ``count`` objects of its class are present. Per-tag score = mean correctness of the tag's images;
   overall = mean of the tag scores (GenEval's summary). Where GenEval picks the top-``count`` detections by
   confidence and then checks their colour, the exact detector has no confidence: objects of the asked colour
   are picked first.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from unitok.data.detect import Detection, detect_objects
from unitok.data.geneval import GENEVAL_RELATIONS, GENEVAL_TAGS, validate_metadata
from unitok.data.world import relations

from .harness import PAPER, default_device, fmt, load_mllm, markdown_table, run_cli, write_json_atomic

logger = logging.getLogger(__name__)

PROMPTS_PACKAGE_DIR = "geneval_prompts"
SCORERS = ("synthetic", "none")
_SAMPLE_RE = re.compile(r"^\d+\.png$")


def official_prompts_path() -> Path:
    """The 553 GenEval prompts shipped with the package (MIT licence beside them)."""
    return Path(str(resources.files("unitok.eval") / PROMPTS_PACKAGE_DIR / "evaluation_metadata.jsonl"))


def read_prompts(path: str | Path, synthetic: bool = False) -> list[dict]:
    """Read a GenEval ``evaluation_metadata.jsonl``; ``synthetic`` also checks classes/colours against the world.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line, naming the file and line number; or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist (expected a GenEval evaluation_metadata.jsonl)"
        )
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            _check_line(meta, synthetic)
        except (json.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}:{lineno}: malformed GenEval prompt line: {err}") from None
        prompts.append(meta)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _check_line(meta: Any, synthetic: bool) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    if synthetic:
        validate_metadata(meta)
        return
    if meta.get("tag") not in GENEVAL_TAGS:
        raise ValueError(f"'tag' must be one of {', '.join(GENEVAL_TAGS)}, got {meta.get('tag')!r}")
    if not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
        raise ValueError(f"needs a non-empty 'prompt' string, got {meta.get('prompt')!r}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"needs a non-empty 'include' list, got {include!r}")
    for item in include + list(meta.get("exclude", [])):
        if not isinstance(item.get("class"), str) or not isinstance(item.get("count"), int):
            raise ValueError(f"include/exclude items need 'class' (str) and 'count' (int), got {item!r}")


# ------------------------------------------------------------------------------------------------ writer


@dataclass
class SamplingSettings:
    """How the images are sampled (stored in ``config.json``; a resumed run must use the same)."""

    n_samples: int = 4
    batch_size: int = 4
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError(
                f"n_samples and batch_size must be >= 1, got {self.n_samples} and {self.batch_size}"
            )
        for name in ("cfg_scale", "temperature", "top_p"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def prompt_dir(out_dir: Path, index: int) -> Path:
    """``<out>/<index:05d>``."""
    return out_dir / f"{index:05d}"


def is_complete(folder: Path, n_samples: int) -> bool:
    """Whether a prompt folder holds its metadata and all ``n_samples`` samples."""
    return (folder / "metadata.jsonl").is_file() and all(
        (folder / "samples" / f"{n:04d}.png").is_file() for n in range(n_samples)
    )


def _write_prompt(out_dir: Path, index: int, meta: dict, images: Sequence[Image.Image]) -> None:
    final = prompt_dir(out_dir, index)
    tmp = out_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "samples").mkdir(parents=True)
    try:
        (tmp / "metadata.jsonl").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        for n, image in enumerate(images):
            image.save(tmp / "samples" / f"{n:04d}.png")
        make_grid(images, columns=len(images)).save(tmp / "grid.png")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_grid(images: Sequence[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Images (same size) in rows of ``columns`` on a white background."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid


def _check_config(out_dir: Path, config: dict) -> None:
    path = out_dir / "config.json"
    if not path.is_file():
        write_json_atomic(path, config)
        return
    old = json.loads(path.read_text())
    keys = ("sampling", "prompts_sha")
    if any(old.get(k) != config.get(k) for k in keys):
        raise ValueError(
            f"{out_dir} holds images sampled with other settings or prompts ({path}: "
            f"{ {k: old.get(k) for k in keys} }); resume with the same settings or choose a new --out"
        )


def _prompts_digest(prompts: Sequence[dict]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(json.dumps(p, sort_keys=True) for p in prompts).encode()).hexdigest()[:16]


def write_geneval_folder(
    model: Any,
    prompts: Sequence[dict],
    out_dir: str | Path,
    settings: SamplingSettings | None = None,
    model_name: str = "",
    progress: bool = True,
) -> dict:
    """Generate ``settings.n_samples`` images per prompt into GenEval's folder layout (see the module docstring).

    Args:
        model: a :class:`~unitok.mllm.UniTokMLLM` (``generate_images``).
        prompts: GenEval metadata lines (:func:`read_prompts`).
        out_dir: the image folder; created if missing. Finished prompts already there are kept.
        settings: sampling settings (default :class:`SamplingSettings`).
        model_name: recorded in ``config.json``.
        progress: show a progress bar over images.

    Returns:
        ``{"prompts", "generated_prompts", "resumed_prompts", "images", "seconds", "images_per_second"}``.

    Raises:
        ValueError: when ``out_dir`` already holds images made with other settings or prompts.
    """
    settings = settings or SamplingSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": model_name,
        "sampling": asdict(settings),
        "prompts": len(prompts),
        "prompts_sha": _prompts_digest(prompts),
        "layout": "<index:05d>/metadata.jsonl + samples/<n:04d>.png",
    }
    _check_config(out, config)
    n, bs = settings.n_samples, settings.batch_size
    chunks = [list(range(start, min(start + bs, len(prompts)))) for start in range(0, len(prompts), bs)]
    todo = [
        (k, chunk)
        for k, chunk in enumerate(chunks)
        if not all(is_complete(prompt_dir(out, i), n) for i in chunk)
    ]
    resumed = len(prompts) - sum(len(chunk) for _, chunk in todo)
    if resumed:
        logger.info("resuming: %d of %d prompts already done in %s", resumed, len(prompts), out)
    bar = tqdm(total=n * sum(len(c) for _, c in todo), desc="geneval", unit="img", disable=not progress)
    start = time.perf_counter()
    written = 0
    for k, chunk in todo:
        texts = [prompts[i]["prompt"] for i in chunk for _ in range(n)]
        result = model.generate_images(
            texts,
            cfg_scale=settings.cfg_scale,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed + k,
            image_size=settings.image_size,
        )
        for j, i in enumerate(chunk):
            if not is_complete(prompt_dir(out, i), n):
                _write_prompt(out, i, prompts[i], result.images[j * n : (j + 1) * n])
                written += 1
        bar.update(len(texts))
    bar.close()
    seconds = time.perf_counter() - start
    images = written * n
    return {
        "prompts": len(prompts),
        "generated_prompts": written,
        "resumed_prompts": resumed,
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 and images else None,
    }


# ------------------------------------------------------------------------------------------------ scorer


def score_image(image: Image.Image, meta: dict) -> tuple[bool, str]:
    """GenEval's verdict on one image of the synthetic world: ``(correct, reason)`` (see the module docstring)."""
    return score_detections(detect_objects(image), meta)


def score_detections(found: Sequence[Detection], meta: dict) -> tuple[bool, str]:
    """:func:`score_image` on detections already made."""
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in found:
        by_class[d.shape].append(d)
    matched: list[list[Detection] | None] = []
    reasons: list[str] = []
    for item in meta["include"]:
        cls, count, color = item["class"], item["count"], item.get("color")
        objs = by_class.get(cls, [])
        group = [d for d in objs if color is None or d.color == color]
        ok = True
        if len(objs) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(objs)}")
        elif len(group) < count:
            ok = False
            seen = ", ".join(sorted(d.color for d in objs))
            reasons.append(f"expected {color} {cls}>={count}, found {len(group)} ({seen})")
        if ok and "position" in item:
            relation, target = item["position"]
            targets = matched[target] if target < len(matched) else None
            if relation not in GENEVAL_RELATIONS:
                raise ValueError(f"unknown relation {relation!r}; expected one of {GENEVAL_RELATIONS}")
            if not targets:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            elif not all(relation in relations(a.bbox, b.bbox) for a in group for b in targets):
                ok = False
                reasons.append(f"expected {cls} {relation} target")
        matched.append(group if ok else None)
    for item in meta.get("exclude", []):
        present = len(by_class.get(item["class"], []))
        if present >= item["count"]:
            reasons.append(f"expected {item['class']}<{item['count']}, found {present}")
    return not reasons, "; ".join(reasons)


def list_prompt_dirs(folder: Path) -> list[Path]:
    """The ``<index:05d>`` prompt folders of a GenEval image folder, in index order."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def score_folder(folder: str | Path, progress: bool = True) -> dict:
    """Score a GenEval image folder of synthetic-world prompts with the exact scorer.

    Writes ``<folder>/results.jsonl`` (one line per image: ``filename, tag, prompt, correct, reason, metadata``)
    and returns the summary: ``tags`` (score per tag present), ``overall`` (mean of the tag scores), ``images``,
    ``prompts``, ``correct_images`` and ``correct_prompts`` (fractions; a prompt counts when any image is right),
    ``unreadable_images``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no GenEval image folder {folder}")
    dirs = list_prompt_dirs(folder)
    if not dirs:
        raise ValueError(f"{folder} holds no <index:05d> prompt folders (expected GenEval's image layout)")
    rows, per_tag, per_prompt, unreadable = [], defaultdict(list), [], 0
    for d in tqdm(dirs, desc="score", unit="prompt", disable=not progress):
        meta_path = d / "metadata.jsonl"
        if not meta_path.is_file():
            raise ValueError(f"{d} has no metadata.jsonl (expected GenEval's image layout)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            validate_metadata(meta)
        except (json.JSONDecodeError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}:1: not a synthetic-world GenEval metadata line: {err}") from None
        samples = sorted(p for p in (d / "samples").glob("*.png") if _SAMPLE_RE.match(p.name))
        if not samples:
            raise ValueError(f"{d / 'samples'} holds no NNNN.png images")
        verdicts = []
        for path in samples:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except OSError as err:
                logger.warning("unreadable image %s counted as wrong: %s", path, err)
                unreadable += 1
                correct, reason = False, f"unreadable image: {err}"
            else:
                correct, reason = score_image(image, meta)
            verdicts.append(correct)
            per_tag[meta["tag"]].append(correct)
            rows.append(
                {
                    "filename": str(path.relative_to(folder)),
                    "tag": meta["tag"],
                    "prompt": meta["prompt"],
                    "correct": correct,
                    "reason": reason,
                    "metadata": meta,
                }
            )
        per_prompt.append(any(verdicts))
    with open(folder / "results.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tags = {tag: sum(v) / len(v) for tag in GENEVAL_TAGS if (v := per_tag.get(tag))}
    return {
        "tags": tags,
        "overall": sum(tags.values()) / len(tags),
        "images": len(rows),
        "prompts": len(dirs),
        "correct_images": sum(r["correct"] for r in rows) / len(rows),
        "correct_prompts": sum(per_prompt) / len(per_prompt),
        "unreadable_images": unreadable,
    }


def format_markdown(report: dict) -> str:
    """The GenEval report as markdown, beside the paper's overall score."""
    lines = [f"# GenEval: {report.get('model') or report['folder']}", ""]
    score = report.get("score")
    if score is None:
        lines.append(
            f"Images written to `{report['folder']}`; not scored (score them with GenEval's scorer)."
        )
        return "\n".join(lines) + "\n"
    rows = [(tag, fmt(score["tags"].get(tag), ".3f"), "—") for tag in GENEVAL_TAGS]
    rows.append(("**overall**", fmt(score["overall"], ".3f"), fmt(PAPER["geneval"], ".2f")))
    lines += [
        f"Scorer: {report['scorer']} ({score['images']} images, {score['prompts']} prompts). "
        "The paper's figure is the real GenEval (Mask2Former + CLIP) on Llama-2-7B; the synthetic scorer "
        "measures the synthetic world, so the two columns are not the same benchmark.",
        "",
        markdown_table(["tag", "ours", "paper (UniTok, Llama-2-7B)"], rows),
        f"correct images {fmt(100 * score['correct_images'], '.1f')}%, "
        f"correct prompts {fmt(100 * score['correct_prompts'], '.1f')}%",
    ]
    if report.get("grid"):
        lines += ["", f"![samples]({Path(report['grid']).name})"]
    return "\n".join(lines) + "\n"


def overview_grid(folder: Path, max_prompts: int = 8) -> Image.Image | None:
    """One row per prompt (the first ``max_prompts``) of its samples."""
    images, columns = [], 0
    for d in list_prompt_dirs(folder)[:max_prompts]:
        row = sorted((d / "samples").glob("*.png"))
        columns = max(columns, len(row))
        images.append([Image.open(p).convert("RGB") for p in row])
    if not images or not columns:
        return None
    flat = [
        im
        for row in images
        for im in row + [Image.new("RGB", row[0].size, (255, 255, 255))] * (columns - len(row))
    ]
    return make_grid(flat, columns)


# ------------------------------------------------------------------------------------------------ command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok eval-geneval``."""
    d = SamplingSettings()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Generate GenEval's image folder (4 images per prompt) with an MLLM checkpoint, resumable, "
        "and score it with the exact synthetic-world scorer. Writes config.json, results.json, results.md and "
        "grid.png beside the prompt folders.",
    )
    p.add_argument("--model", help="MLLM checkpoint folder (save_pretrained); omit with --score-only")
    p.add_argument(
        "--prompts",
        help="GenEval evaluation_metadata.jsonl (default: the 553 official prompts shipped with the package)",
    )
    p.add_argument("--out", required=True, help="image folder (GenEval layout) and reports")
    p.add_argument(
        "--scorer",
        choices=SCORERS,
        default="none",
        help="synthetic: exact detector-free scorer for synthetic-world prompts; none: only write the folder",
    )
    p.add_argument(
        "--score-only", action="store_true", help="score an existing --out folder, generate nothing"
    )
    p.add_argument(
        "--n-samples", type=int, default=d.n_samples, help="images per prompt (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="prompts per batch (default %(default)s)"
    )
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--image-size", type=int, help="pixels (default: the tokenizer's)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the model")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    """Generate (unless ``--score-only``), score, and write the reports; returns the report."""
    out = Path(args.out)
    progress = not args.no_progress
    synthetic = args.scorer == "synthetic"
    report: dict[str, Any] = {"folder": str(out), "scorer": args.scorer, "model": args.model}
    if not args.score_only:
        if args.model is None:
            raise ValueError("--model is required unless --score-only")
        prompts_path = Path(args.prompts) if args.prompts else official_prompts_path()
        prompts = read_prompts(prompts_path, synthetic=synthetic)
        if args.limit is not None:
            prompts = prompts[: args.limit]
        settings = SamplingSettings(
            n_samples=args.n_samples,
            batch_size=args.batch_size,
            cfg_scale=args.cfg_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            image_size=args.image_size,
        )
        model = load_mllm(args.model, args.device, args.dtype)
        report["prompts_file"] = str(prompts_path)
        report["sampling"] = asdict(settings)
        report["generation"] = write_geneval_folder(model, prompts, out, settings, str(args.model), progress)
    report["score"] = score_folder(out, progress) if synthetic else None
    grid = overview_grid(out)
    if grid is not None:
        grid.save(out / "grid.png")
        report["grid"] = str(out / "grid.png")
    report["paper"] = {"geneval_overall": PAPER["geneval"]}
    write_json_atomic(out / "results.json", report)
    (out / "results.md").write_text(format_markdown(report), encoding="utf-8")
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok eval-geneval``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    report = run_cli(run, args)
    if report is None:
        return 2
    print(format_markdown(report))
    return 0
