"""The quick start's report: targets against what was measured, ``REPORT.md`` and ``report.json``, and the
pictures it shows (reconstruction grid, generated images with their prompts, question/answer examples)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "existence")
# (name in report.json, how the report says it, target, unit); every one is measured on held-out data.
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("tokenizer_psnr", "tokenizer PSNR of reconstructions", 27.0, "dB"),
    ("tokenizer_usage_min", "tokenizer usage of the least-used sub-codebook (> target)", 90.0, "%"),
    ("zero_shot_color", "zero-shot colour, top-1", 95.0, "%"),
    ("zero_shot_shape", "zero-shot shape, top-1", 80.0, "%"),
    ("vqa_overall", "VQA accuracy, all questions", 80.0, "%"),
    *((f"vqa_{t}", f"VQA accuracy, {t} questions", 60.0, "%") for t in QA_TYPES),
    ("geneval_overall", "synthetic GenEval overall", 0.5, ""),
    ("total_minutes", "quick start wall time, all stages (<= target)", 15.0, "min"),
)


def _upscale(image, size: int = 128):
    from PIL import Image

    return image.resize((size, size), Image.NEAREST)


def save_qa_examples(out: Path, world: Path, rows: list[dict], n: int = 4) -> None:
    from PIL import Image

    folder = out / "qa_examples"
    folder.mkdir(parents=True, exist_ok=True)
    seen: list[str] = []
    for row in rows:
        if row["id"] in seen:
            continue
        seen.append(row["id"])
        if len(seen) > n:
            break
        with Image.open(world / "images" / "test" / f"{row['id']}.png") as im:
            _upscale(im.convert("RGB")).save(folder / f"{row['id']}.png")


def grid_rows(metas: list[dict], images: list[list], per_tag: int = 2) -> tuple[list[dict], list[list]]:
    """The first ``per_tag`` prompts of every tag with their images."""
    taken: dict[str, int] = {}
    rows_m, rows_i = [], []
    for meta, imgs in zip(metas, images):
        if taken.get(meta["tag"], 0) < per_tag:
            taken[meta["tag"]] = taken.get(meta["tag"], 0) + 1
            rows_m.append(meta)
            rows_i.append(imgs)
    return rows_m, rows_i


def _wrap(text: str, width_of, max_width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``max_width`` (a longer single word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and width_of(f"{lines[-1]} {word}") <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_generation_grid(path: Path, metas: list[dict], images: list[list], n: int = 12) -> None:
    """A grid of generated images, one row per prompt (first ``n`` prompts), the prompt written on the left."""
    from PIL import Image, ImageDraw, ImageFont

    rows = list(zip(metas, images))[:n]
    if not rows:
        return
    cell, text_w = 96, 320
    per = max(len(imgs) for _, imgs in rows)
    canvas = Image.new("RGB", (text_w + per * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    # Pillow's built-in font at 10 px leaves 2 px between words; 15 px keeps the prompts readable.
    font = ImageFont.load_default(size=15)
    for r, (meta, imgs) in enumerate(rows):
        lines = _wrap(meta["prompt"], lambda t: draw.textlength(t, font=font), text_w - 8)
        top = r * cell + (cell - 18 * len(lines)) // 2
        draw.multiline_text((4, top), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=3)
        for c, im in enumerate(imgs):
            canvas.paste(_upscale(im, cell), (text_w + c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if unit == "" else f"{value:.2f} {unit}".rstrip()


def collect_targets(records: dict[str, dict]) -> list[dict]:
    """One entry per target: ``name``, ``measured`` (None when its stage did not run), ``target``, ``reached``."""

    def result(stage: str) -> dict:
        return records.get(stage, {}).get("result", {})

    tok, vqa, gen = result("tokenizer"), result("vqa"), result("generation")
    measured = {
        "tokenizer_psnr": tok.get("psnr"),
        "tokenizer_usage_min": tok.get("usage_min"),
        "zero_shot_color": tok.get("zero_shot_color"),
        "zero_shot_shape": tok.get("zero_shot_shape"),
        "vqa_overall": vqa.get("overall"),
        **{f"vqa_{t}": vqa.get("per_type", {}).get(t) for t in QA_TYPES},
        "geneval_overall": gen.get("overall"),
        "total_minutes": sum(r["seconds"] for n, r in records.items() if n != "report") / 60,
    }
    out = []
    for name, _, target, unit in TARGETS:
        value = measured[name]
        if value is None:
            reached = False
        elif name == "total_minutes":
            reached = value <= target
        elif name == "tokenizer_usage_min":
            reached = value > target
        else:
            reached = value >= target
        out.append({"name": name, "measured": value, "target": target, "unit": unit, "reached": reached})
    return out


def write_report(out: Path, records: dict[str, dict], stages: Sequence[str]) -> Path:
    """Write ``REPORT.md`` and ``report.json`` from the stage records."""
    targets = collect_targets(records)
    labels = {name: label for name, label, _, _ in TARGETS}

    def result(stage: str) -> dict:
        return records.get(stage, {}).get("result", {})

    tok, vqa, gen, mllm, world = (result(s) for s in ("tokenizer", "vqa", "generation", "mllm", "world"))
    lines = [
        "# UniTok quick start report",
        "",
        "`unitok-tiny` and a small unified MLLM trained from scratch on the built-in synthetic world "
        f"(`{world.get('path', '?')}`); every figure below is measured on its held-out test split or prompts.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | |",
        "|---|---|---|---|",
    ]
    for t in targets:
        verdict = "reached" if t["reached"] else ("not measured" if t["measured"] is None else "not reached")
        lines.append(
            f"| {labels[t['name']]} | {_fmt(t['measured'], t['unit'])} | {_fmt(t['target'], t['unit'])} | {verdict} |"
        )
    lines += ["", "## Stages", "", "| stage | seconds | |", "|---|---|---|"]
    for name in stages:
        rec = records.get(name)
        if name == "report":
            lines.append("| report | | this file |")
        elif rec is None:
            lines.append(f"| {name} | | not run |")
        else:
            lines.append(f"| {name} | {rec['seconds']:.1f} | {rec['result'].get('via', '')} |")
    lines += [
        "",
        "Stage times are those of the call that ran each stage (a reused stage keeps its time).",
        "",
    ]
    if tok:
        lines += [
            "## Tokenizer",
            "",
            f"- {tok['steps']} steps of batch {tok['batch']} ({tok['samples']} images seen); final losses {tok['losses']}",
            f"- PSNR {tok['psnr']:.2f} dB, SSIM {tok['ssim']:.4f} on {tok['images']} test images",
            f"- usage per sub-codebook (%): {', '.join(f'{u:.1f}' for u in tok['usage'])}",
            f"- perplexity per sub-codebook: {', '.join(f'{p:.1f}' for p in tok['perplexity'])}",
            f"- zero-shot top-1: shape {tok['zero_shot_shape']:.1f}%, colour {tok['zero_shot_color']:.1f}%",
            f"- corrupt samples skipped: {tok['skipped']}",
            "",
            "Originals (top) and their reconstructions from the discrete codes (bottom):",
            "",
            "![reconstructions](reconstructions.png)",
            "",
        ]
    if mllm:
        r = mllm["recipe"]
        lines += [
            "## MLLM",
            "",
            f"- Llama hidden {r['hidden']}, {r['layers']} layers; depth head width {r['depth_width']}, "
            f"{r['depth_layers']} layers; {mllm['parameters']:,} trainable parameters",
            f"- visual tokens: {_projector_words(r)}",
            f"- {r['steps']} steps of batch {r['batch']} (generation fraction {r['generation_fraction']}), lr {r['lr']}",
            f"- final losses: {mllm['final']}",
            "",
        ]
    if vqa:
        lines += [
            "## Visual question answering",
            "",
            f"{vqa['questions']} held-out questions; accuracy {vqa['overall']:.1f}% overall; per type: "
            + ", ".join(f"{k} {v:.1f}%" for k, v in vqa["per_type"].items()),
            "",
            "| image | question | answer | truth |",
            "|---|---|---|---|",
        ]
        shown = {p.stem for p in (out / "qa_examples").glob("*.png")}
        for row in [r for r in vqa["examples"] if r["id"] in shown][:10]:
            lines.append(
                f"| ![{row['id']}](qa_examples/{row['id']}.png) | {row['question']} | {row['prediction']} | {row['answer']} |"
            )
        lines.append("")
    if gen:
        sampling = gen.get("sampling", {})
        per_prompt = sampling.get("n_samples", sampling.get("images_per_prompt"))
        lines += [
            "## Text to image",
            "",
            f"{gen['prompts']} GenEval prompts of the world, {per_prompt} images each "
            f"(cfg {sampling.get('cfg_scale')}, temperature {sampling.get('temperature')}, top-k "
            f"{sampling.get('top_k')}, top-p {sampling.get('top_p')}); overall "
            f"{gen['overall']:.3f}; per tag: " + ", ".join(f"{k} {v:.2f}" for k, v in gen["per_tag"].items()),
            "",
            "Prompts (left) and generated images:",
            "",
            "![generated](generated.png)",
            "",
        ]
    if mllm:
        lines += [
            "## Try it",
            "",
            "```",
            f"unitok demo --model {mllm['dir']}",
            "```",
            "",
        ]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    summary = {
        "targets": targets,
        "stages": {n: {"seconds": r["seconds"]} for n, r in records.items()},
        "results": {n: r["result"] for n, r in records.items() if n != "report"},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    return report


def _projector_words(recipe: dict) -> str:
    """The MLLM's visual input merger in words (recipes written before the field existed used the MLP)."""
    kind = recipe.get("projector", "mlp")
    if kind == "window":
        reach = recipe.get("projector_window", 1)
        side = 2 * reach + 1
        return f"window projector (each from its position's codes and its earlier neighbours in a masked {side}x{side} window)"
    if kind == "mlp":
        return "per-position MLP projector"
    return f"{kind} projector"
