"""The quick start: the whole tokenizer pipeline on the built-in synthetic world, on a CPU.

1. writes the synthetic world (images, captions, shards, class folders) unless it is already there;
2. trains ``unitok-tiny`` with the ``unitok-tiny-synth`` run config (an interrupted run resumes);
3. evaluates the trained tokenizer on the held-out test split: PSNR/SSIM of reconstructions,
   per-sub-codebook usage and perplexity, and zero-shot classification of shape and colour from text
   prompts alone;
4. writes ``REPORT.md`` (metrics against their targets, the training budget, a reconstruction grid)
   and ``report.json``.

Every step is idempotent: a second call reuses the world, the finished training run and rewrites
only the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("unitok.quickstart")

RUN_CONFIG = "unitok-tiny-synth"
# What the quick start aims for on held-out synthetic images (see the report).
TARGETS = {"psnr": 28.0, "usage": 90.0, "zero_shot_shape": 90.0, "zero_shot_color": 90.0}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, run and report")
    parser.add_argument("--config", default=RUN_CONFIG, help="run config preset name or file")
    parser.add_argument(
        "--num-images", type=int, default=None, help="synthetic images (default: the config's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument(
        "--eval-images", type=int, default=400, help="held-out images for reconstruction metrics"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override",
    )
    return parser


def _world(out: Path, config) -> Path:
    from unitok.data.synth import SynthConfig, generate_world

    world = Path(config.data.path)
    if (world / "metadata.json").exists():
        logger.info("reusing the synthetic world in %s", world)
        return world
    synth = SynthConfig(**(config.data.synth or {}))
    logger.info("writing the synthetic world (%d images at %d px) to %s", synth.num_images, synth.size, world)
    generate_world(world, synth)
    return world


def _evaluate(final_dir: Path, world: Path, report_dir: Path, eval_images: int) -> dict:
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


def _row(name: str, value: float | None, target: float, unit: str) -> str:
    if value is None:
        return f"| {name} | n/a | {target:g}{unit} | not measured |"
    verdict = "reached" if value >= target else "not reached"
    return f"| {name} | {value:.2f}{unit} | {target:g}{unit} | {verdict} |"


def write_report(out: Path, summary: dict) -> Path:
    """Write ``REPORT.md`` and ``report.json`` from the quick start's summary dict."""
    metrics = summary["metrics"]
    lines = [
        "# UniTok quick start report",
        "",
        f"`unitok-tiny` trained on the built-in synthetic world ({summary['world']}), evaluated on the held-out test split.",
        "",
        "## Targets",
        "",
        "| metric | measured | target | |",
        "|---|---|---|---|",
        _row("PSNR of reconstructions", metrics["psnr"], TARGETS["psnr"], " dB"),
        _row("codebook usage (lowest sub-codebook)", metrics["usage_min"], TARGETS["usage"], "%"),
        _row("zero-shot shape, top-1", metrics["zero_shot_shape"], TARGETS["zero_shot_shape"], "%"),
        _row("zero-shot colour, top-1", metrics["zero_shot_color"], TARGETS["zero_shot_color"], "%"),
        "",
        "## Other measurements",
        "",
        f"- SSIM: {metrics['ssim']:.4f}",
        f"- codebook usage per sub-codebook (%): {', '.join(f'{u:.1f}' for u in metrics['usage'])}",
        f"- codebook perplexity per sub-codebook: {', '.join(f'{p:.1f}' for p in metrics['perplexity'])}",
        f"- evaluated images: {metrics['images']}",
        "",
        "## Training budget",
        "",
        f"- steps: {summary['train']['steps']} (global batch {summary['train']['batch']}), "
        f"{summary['train']['samples']} images seen",
        f"- wall time of this invocation: {summary['train']['seconds']:.0f} s (0 when the run was already finished)",
        f"- final training losses: {summary['train']['losses']}",
        f"- corrupt samples skipped: {summary['train']['skipped']}",
        "",
        "## Reconstructions",
        "",
        "Originals (top) and their reconstructions from the discrete codes (bottom):",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        f"Training-time grids are in `{summary['run_dir']}/images/`.",
        "",
    ]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from unitok.tokenizer.train import train
    from unitok.tokenizer.training.config import load_run_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"output_dir={out / 'tokenizer'}", f"data.path={out / 'world'}"]
    if args.num_images is not None:
        overrides.append(f"data.synth.num_images={args.num_images}")
    if args.steps is not None:
        overrides.append(f"train.total_steps={args.steps}")
    config = load_run_config(args.config, overrides + args.overrides)

    world = _world(out, config)
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    if result.final_dir is None:
        raise RuntimeError(f"training stopped at step {result.step} of {result.total_steps}; rerun to resume")

    logger.info("evaluating %s on the held-out test split", result.final_dir)
    evaluation = _evaluate(result.final_dir, world, out, args.eval_images)
    recon = evaluation["reconstruction"]
    usage = [float(u) for u in recon["codebook"]["usage_percent"]]
    losses = {
        k: round(float(result.metrics[k]), 4)
        for k in ("loss", "l1", "l2", "vq", "clip")
        if k in result.metrics
    }
    summary = {
        "world": str(world),
        "run_dir": str(result.output_dir),
        "train": {
            "steps": result.step,
            "batch": config.train.local_batch_size,
            "samples": int(result.metrics.get("samples", 0)),
            "seconds": seconds,
            "losses": losses,
            "skipped": result.skipped,
        },
        "metrics": {
            "psnr": recon["psnr"],
            "ssim": recon["ssim"],
            "usage": usage,
            "usage_min": min(usage),
            "perplexity": [float(p) for p in recon["codebook"]["perplexity"]],
            "images": recon["num_images"],
            "zero_shot_shape": 100 * evaluation["zero_shot"]["shape"]["top1"],
            "zero_shot_color": 100 * evaluation["zero_shot"]["color"]["top1"],
        },
        "evaluation": evaluation,
    }
    report = write_report(out, summary)
    print(report.read_text())
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
