"""The quick start: the whole UniTok pipeline on the built-in synthetic world, on a CPU.

Stages (each writes under ``--out`` and is reused when the quick start runs again; ``--stage NAME``
reruns one of them):

1. ``world``: the synthetic world (images, captions, questions, class folders, GenEval prompts);
2. ``tokenizer``: trains ``unitok-tiny`` with the ``unitok-tiny-synth`` run config (an interrupted run
   resumes) and evaluates it on the held-out test split: PSNR/SSIM, per-sub-codebook usage, zero-shot
   shape and colour classification from text prompts alone, a reconstruction grid;
3. ``codes``: the UniTok codes of the world's train and test images;
4. ``mllm``: trains a small unified MLLM from scratch on the codes (questions -> answers, captions ->
   image codes);
5. ``vqa``: answers the held-out test questions, accuracy per question type;
6. ``generation``: text-to-image on the world's GenEval prompts, scored by the synthetic GenEval scorer;
7. ``report``: ``REPORT.md`` and ``report.json`` (targets reached or not, stage times, grids, examples,
   the demo command).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

logger = logging.getLogger("unitok.quickstart")

RUN_CONFIG = "unitok-tiny-synth"
# The quick start's world (fields of unitok.data.synth.SynthConfig): every shape and colour, 1-3 objects,
# 64 px, objects 1.3x the default widths (so outlines cover more of the image); 7200 train / 400 val / 400
# test scenes and 40 single-object scenes per class and split.
WORLD: dict = {
    "num_images": 8000,
    "size": 64,
    "seed": 0,
    "max_objects": 3,
    "object_scale": 1.3,
    "classify_per_class": 40,
}
STAGES: tuple[str, ...] = ("world", "tokenizer", "codes", "mllm", "vqa", "generation", "report")
# Folders (under --out) that a stage's command writes and resumes from; ``--stage NAME`` clears its folder.
# (The tokenizer stage resumes or re-evaluates its run; remove ``tokenizer/`` to train it again.)
STAGE_OUTPUTS: dict[str, str] = {"codes": "codes", "mllm": "mllm", "vqa": "vqa", "generation": "generation"}
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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, models and report")
    parser.add_argument("--config", default=RUN_CONFIG, help="tokenizer run config (preset name or file)")
    parser.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        default=[],
        help="rerun this stage even when its output exists (repeatable); the others are reused",
    )
    parser.add_argument(
        "--num-images", type=int, default=None, help=f"synthetic images (default {WORLD['num_images']})"
    )
    parser.add_argument(
        "--world",
        dest="world_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="synthetic-world override (fields of unitok.data.synth.SynthConfig, e.g. size=32)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="tokenizer training steps (default: the config's)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=400, help="held-out images for the reconstruction metrics"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tokenizer run-config override",
    )
    parser.add_argument(
        "--mllm",
        dest="mllm_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="MLLM recipe override (fields of MLLMRecipe, e.g. steps=300) ",
    )
    parser.add_argument(
        "--sampling",
        dest="sampling_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="text-to-image sampling override (fields of SamplingRecipe, e.g. images_per_prompt=1)",
    )
    parser.add_argument(
        "--vqa-limit", type=int, default=None, help="answer only this many held-out questions (default: all)"
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="score only this many GenEval prompts (spread over tags)",
    )
    parser.add_argument(
        "--engine",
        choices=("commands", "library"),
        default=None,
        help="MLLM stages through the unitok commands (default when installed) or direct library calls",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _parse_fields(cls, items: list[str]) -> dict:
    import yaml

    known = {f.name: f for f in fields(cls)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"expected KEY=VALUE with KEY one of {sorted(known)}, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


class Pipeline:
    """Runs the stages in order, reusing each one's record ``stages/NAME.json`` unless asked to rerun it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from unitok.scripts.quickstart_mllm import MLLMRecipe, SamplingRecipe
        from unitok.tokenizer.training.config import load_run_config

        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        from unitok.data.synth import SynthConfig

        # The world stage writes the world before the tokenizer stage reads it (no data.synth needed).
        overrides = [f"output_dir={self.out / 'tokenizer'}", f"data.path={self.out / 'world'}"]
        world = {**WORLD, **_parse_fields(SynthConfig, args.world_overrides)}
        if args.num_images is not None:
            world["num_images"] = args.num_images
        self.synth = SynthConfig(**world)
        if args.steps is not None:
            overrides.append(f"train.total_steps={args.steps}")
        self.config = load_run_config(args.config, overrides + args.overrides)
        self.mllm_recipe = MLLMRecipe(**_parse_fields(MLLMRecipe, args.mllm_overrides))
        self.sampling = SamplingRecipe(**_parse_fields(SamplingRecipe, args.sampling_overrides))
        self.rerun = set(args.stage)
        self.records: dict[str, dict] = {}
        self.progress = not args.no_progress
        from unitok.scripts.quickstart_mllm import commands_available

        self.engine = args.engine or ("commands" if commands_available() else "library")
        logger.info("MLLM stages through %s", self.engine)

    # paths
    @property
    def world(self) -> Path:
        return Path(self.config.data.path)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.config.output_dir) / "final"

    @property
    def codes_dir(self) -> Path:
        return self.out / "codes"

    def _record_path(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def run(self) -> Path:
        metadata = self.world / "metadata.json"
        if metadata.is_file() and "world" not in self.rerun:
            _check_world(self.world, json.loads(metadata.read_text()), self.synth)
        for name in STAGES:
            path = self._record_path(name)
            if name != "report" and path.is_file() and name not in self.rerun:
                self.records[name] = json.loads(path.read_text())
                logger.info(
                    "stage %s: reusing %s (%.0f s when it ran)", name, path, self.records[name]["seconds"]
                )
                continue
            if name in self.rerun and name in STAGE_OUTPUTS:
                # The commands resume what they find; a rerun asked for starts that stage afresh.
                shutil.rmtree(self.out / STAGE_OUTPUTS[name], ignore_errors=True)
            logger.info("stage %s: running", name)
            started = time.perf_counter()
            result = getattr(self, f"stage_{name}")()
            record = {"stage": name, "seconds": time.perf_counter() - started, "result": result}
            self.records[name] = record
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(path)
            logger.info("stage %s: done in %.1f s", name, record["seconds"])
        return self.out / "REPORT.md"

    # ------------------------------------------------------------------ stages

    def stage_world(self) -> dict:
        from unitok.data.synth import generate_world

        synth = self.synth
        if not (self.world / "metadata.json").exists() or "world" in self.rerun:
            logger.info(
                "writing the synthetic world (%d images at %d px) to %s",
                synth.num_images,
                synth.size,
                self.world,
            )
            generate_world(self.world, synth, overwrite=True) if "world" in self.rerun else generate_world(
                self.world, synth
            )
        meta = json.loads((self.world / "metadata.json").read_text())
        return {"path": str(self.world), "config": meta.get("config"), "splits": meta.get("splits")}

    def stage_tokenizer(self) -> dict:
        from unitok.tokenizer.train import train

        if "tokenizer" in self.rerun and self.tokenizer_dir.exists():
            logger.info("rerunning the tokenizer stage: evaluating the finished run again")
        result = train(self.config)
        if result.final_dir is None:
            raise RuntimeError(
                f"training stopped at step {result.step} of {result.total_steps}; rerun to resume"
            )
        evaluation = _evaluate_tokenizer(Path(result.final_dir), self.world, self.out, self.args.eval_images)
        recon = evaluation["reconstruction"]
        usage = [float(u) for u in recon["codebook"]["usage_percent"]]
        losses = {
            k: round(float(result.metrics[k]), 4)
            for k in ("loss", "l1", "l2", "vq", "clip")
            if k in result.metrics
        }
        return {
            "run_dir": str(result.output_dir),
            "final_dir": str(result.final_dir),
            "steps": result.step,
            "batch": self.config.train.local_batch_size,
            "samples": int(result.metrics.get("samples", 0)),
            "losses": losses,
            "skipped": result.skipped,
            "psnr": recon["psnr"],
            "ssim": recon["ssim"],
            "usage": usage,
            "usage_min": min(usage),
            "perplexity": [float(p) for p in recon["codebook"]["perplexity"]],
            "images": recon["num_images"],
            "zero_shot_shape": 100 * evaluation["zero_shot"]["shape"]["top1"],
            "zero_shot_color": 100 * evaluation["zero_shot"]["color"]["top1"],
            "grid": "reconstructions.png",
        }

    def stage_codes(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            return qm.extract_codes_command(self.tokenizer_dir, self.world, self.codes_dir, self.progress)
        return qm.extract_codes(self.tokenizer_dir, self.world, self.codes_dir)

    def stage_mllm(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            return qm.train_mllm_command(self.codes_dir, self.out / "mllm", self.mllm_recipe, self.progress)
        return qm.train_mllm(
            self.tokenizer_dir, self.world, self.codes_dir, self.out / "mllm", self.mllm_recipe, self.progress
        )

    @property
    def mllm_dir(self) -> Path:
        """The trained MLLM (from the mllm stage's record)."""
        return Path(self.records["mllm"]["result"]["dir"])

    def stage_vqa(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            result = qm.eval_vqa_command(
                self.mllm_dir, self.world, self.out / "vqa", limit=self.args.vqa_limit
            )
        else:
            result = qm.eval_vqa_library(self.mllm_dir, self.world, self.codes_dir, limit=self.args.vqa_limit)
        _save_qa_examples(self.out, self.world, result["examples"])
        result["example_images"] = "qa_examples"
        return result

    def stage_generation(self) -> dict:
        from unitok.scripts import quickstart_mllm as qm

        if self.engine == "commands":
            result = qm.eval_geneval_command(
                self.mllm_dir, self.world, self.out / "generation", self.sampling, self.args.max_prompts
            )
            metas, images = result.pop("metas"), result.pop("images")
        else:
            from unitok.mllm import UniTokMLLM

            metas = qm.geneval_prompts(self.world)
            if self.args.max_prompts is not None:
                metas = qm._spread(metas, self.args.max_prompts)
            model = UniTokMLLM.from_pretrained(self.mllm_dir).eval()
            images = qm.generate_for_prompts(model, [m["prompt"] for m in metas], self.sampling)
            result = {
                **qm.score_geneval_library(metas, images),
                "sampling": asdict(self.sampling),
                "via": "library",
            }
        _save_generation_grid(self.out / "generated.png", *_grid_rows(metas, images))
        result["grid"] = "generated.png"
        return result

    def stage_report(self) -> dict:
        return {"report": str(write_report(self.out, self.records))}


# ---------------------------------------------------------------------------------------------- helpers


class WorldMismatchError(ValueError):
    """The world under --out is not the one the quick start asks for."""


def _check_world(world: Path, meta: dict, synth) -> None:
    """Raise WorldMismatchError when the world on disk is not the one asked for (another format or config).

    Every later stage was trained or measured on that world, so it is neither reused silently nor replaced
    under them: the message says which fields differ and how to start over.
    """
    from dataclasses import asdict

    from unitok.data.synth import FORMAT_VERSION

    expected = {"format_version": FORMAT_VERSION, **asdict(synth)}
    found = {"format_version": meta.get("format_version"), **(meta.get("config") or {})}
    differ = sorted(k for k in expected if found.get(k) != expected[k])
    if differ:
        detail = ", ".join(f"{k}: {found.get(k)!r} on disk, {expected[k]!r} asked for" for k in differ)
        raise WorldMismatchError(
            f"{world} holds another synthetic world than this quick start asks for ({detail}); the models "
            f"under {world.parent} were trained on it. Pass a new --out, or remove {world.parent} to start over."
        )


def _evaluate_tokenizer(final_dir: Path, world: Path, report_dir: Path, eval_images: int) -> dict:
    from unitok.eval import evaluate_reconstruction, evaluate_zero_shot
    from unitok.eval.tokenizer_eval import build_image_dataset, make_loader
    from unitok.tokenizer import UniTok

    model = UniTok.from_pretrained(final_dir).eval()
    size = model.config.image_size
    dataset, _ = build_image_dataset(str(world), size, data_format="image-text", split="test")
    loader = make_loader(dataset, batch_size=64, num_workers=0, max_images=eval_images)
    recon = evaluate_reconstruction(model, loader, grid_path=report_dir / "reconstructions.png", grid_size=8)
    zero_shot = {
        attribute: evaluate_zero_shot(
            model, world / "classify" / attribute / "test", templates=f"synth-{attribute}"
        )
        for attribute in ("shape", "color")
    }
    return {"reconstruction": recon, "zero_shot": zero_shot}


def _upscale(image, size: int = 128):
    from PIL import Image

    return image.resize((size, size), Image.NEAREST)


def _save_qa_examples(out: Path, world: Path, rows: list[dict], n: int = 4) -> None:
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


def _grid_rows(metas: list[dict], images: list[list], per_tag: int = 2) -> tuple[list[dict], list[list]]:
    """The first ``per_tag`` prompts of every tag with their images."""
    taken: dict[str, int] = {}
    rows_m, rows_i = [], []
    for meta, imgs in zip(metas, images):
        if taken.get(meta["tag"], 0) < per_tag:
            taken[meta["tag"]] = taken.get(meta["tag"], 0) + 1
            rows_m.append(meta)
            rows_i.append(imgs)
    return rows_m, rows_i


def _save_generation_grid(path: Path, metas: list[dict], images: list[list], n: int = 12) -> None:
    """A grid of generated images, one row per prompt (first ``n`` prompts), the prompt written on the left."""
    from PIL import Image, ImageDraw

    rows = list(zip(metas, images))[:n]
    if not rows:
        return
    cell, text_w = 96, 320
    per = max(len(imgs) for _, imgs in rows)
    canvas = Image.new("RGB", (text_w + per * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (meta, imgs) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), meta["prompt"], fill=(0, 0, 0))
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


def write_report(out: Path, records: dict[str, dict]) -> Path:
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
    for name in STAGES:
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = Pipeline(args).run()
    except WorldMismatchError as err:
        logger.error("%s", err)
        return 2
    print(report.read_text())
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
