"""The UniTok paper's tokenizer findings reproduced in miniature: ``python -m unitok.scripts.ablations``.

Each finding trains a few ``unitok-tiny`` variants through the real trainer (``unitok.tokenizer.train``,
preset ``unitok-tiny-synth``) with the same budget and seed, evaluates each on the held-out split of the
synthetic world, and writes one table per finding to ``OUT/ABLATIONS.md`` plus every number to
``OUT/ablations.json`` (the published ``docs/ABLATIONS.md`` came from ``--doc docs/ABLATIONS.md --json
docs/ablations.json``):

1. ``mcq-vs-rq``: multi-codebook vs residual quantization at the same code shape (D=64, K=8, V=256):
   quantization error and reconstruction.
2. ``codebooks``: 1, 2, 4, 8 sub-codebooks at a fixed total of 2048 entries over a 64-dim latent.
3. ``supervision``: reconstruction only, contrastive only, both.
4. ``projection``: attention vs linear projection around the quantizer.

``--seeds 0 1`` trains every variant once per seed and reports the mean and the range over seeds. Runs are
folders ``<out>/<run>/`` for seed 0 and ``<out>/<run>-seed<k>/`` for other seeds (trainer output, ``final/``
weights, ``result.json``). A run whose ``result.json`` exists for the same budget is not trained again,
and an interrupted run continues from its last checkpoint, so a killed sweep resumes by repeating its command.
Variants that are the same model (the MCQ row, the K=8 row, the "both" row and the attention row are the base
recipe: the quick start's tokenizer) share one run. ``--jobs N`` trains N runs at a time, each in its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unitok.eval import evaluate_reconstruction, evaluate_zero_shot
from unitok.eval.quantization import quantization_error
from unitok.eval.tokenizer_eval import build_image_dataset, make_loader
from unitok.scripts.ablations_report import (
    BASE_RUN,
    FINDINGS,
    PAPER,
    aggregate_row,
    machine_description,
    render_markdown,
    verdict,
)
from unitok.tokenizer import UniTok
from unitok.tokenizer.train import train
from unitok.tokenizer.training import checkpointing
from unitok.tokenizer.training.config import load_run_config

logger = logging.getLogger(__name__)

RUN_PRESET = "unitok-tiny-synth"
RESULT_FILE = "result.json"
# The quick start's recipe (run preset unitok-tiny-synth), spelled out so each run is self-describing: the
# entropy regulariser against codebook collapse at this learning rate.
RECIPE = ("model.overrides.entropy_weight=0.1", "optim.lr=1e-3")
# The base quantizer of every variant: the quick start's tokenizer (8 sub-codebooks x 256 entries x 8 dims,
# the release's code shape), spelled out so each run is self-describing.
BASE_MODEL = {
    "quantizer": "mcq",
    "num_codebooks": 8,
    "vocab_size": 2048,
    "vocab_width": 64,
    "quant_proj": "attn",
}
# The default budget: the quick start's, 1600 steps x batch 16.
DEFAULT_STEPS = 1600
DEFAULT_BATCH = 16
ZERO_SHOT_ATTRIBUTES = ("shape", "color")


@dataclass(frozen=True)
class Variant:
    """One row of a finding's table: a label, the folder of its run, and the run-config overrides that make it.

    Rows of different findings with the same ``run`` are the same model and share one training run.
    """

    label: str
    run: str
    overrides: tuple[str, ...] = ()
    note: str = ""


def _model(**fields) -> tuple[str, ...]:
    """Overrides of the model fields that differ from ``BASE_MODEL``."""
    unknown = sorted(set(fields) - set(BASE_MODEL))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; expected some of {sorted(BASE_MODEL)}")
    # Every field is spelled out, so a run's command does not depend on the run preset's current defaults.
    return tuple(f"model.overrides.{key}={value}" for key, value in {**BASE_MODEL, **fields}.items())


BASE = Variant("base", BASE_RUN, _model())
VARIANTS: dict[str, tuple[Variant, ...]] = {
    "mcq-vs-rq": (
        Variant("MCQ 8 x 256 x 8-d, base", BASE.run, BASE.overrides),
        Variant("RQ 8 levels x 256 x 64-d", "rq-d64", _model(quantizer="rq")),
    ),
    "codebooks": (
        *(Variant(f"{k} x {2048 // k} (d={64 // k})", f"k{k}", _model(num_codebooks=k)) for k in (1, 2, 4)),
        Variant("8 x 256 (d=8), base", BASE.run, BASE.overrides),
    ),
    "supervision": (
        Variant(
            "reconstruction only",
            "recon-only",
            (*_model(), "loss.clip=0"),
            "text tower and CLIP head frozen at init",
        ),
        Variant(
            "contrastive only",
            "contrastive-only",
            (*_model(), "loss.l1=0", "loss.l2=0", "train.recon_batch_size=1"),
            "no pixel loss, so the decoder gets no gradient (it decodes 1 image a step); the VQ and entropy "
            "losses that train the codebook stay",
        ),
        Variant("both, base", BASE.run, BASE.overrides),
    ),
    "projection": (
        Variant("attention projection, base", BASE.run, BASE.overrides),
        Variant("linear projection", "linear-proj", _model(quant_proj="linear")),
    ),
}


@dataclass
class Budget:
    """What every run of a sweep shares."""

    steps: int
    batch_size: int
    seed: int
    threads: int

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "threads": self.threads,
        }


def run_folder(out_dir: Path, variant: Variant, seed: int) -> Path:
    """``<out>/<run>`` for seed 0, ``<out>/<run>-seed<k>`` for the repeats with other seeds."""
    return out_dir / (variant.run if seed == 0 else f"{variant.run}-seed{seed}")


def run_overrides(
    variant: Variant, out_dir: Path, world: Path, budget: Budget, extra: list[str]
) -> list[str]:
    """The ``--set`` list of one run: output, data, budget, logging, the recipe, the variant, user extras."""
    return [
        f"output_dir={run_folder(out_dir, variant, budget.seed)}",
        f"data.path={world}",
        "data.synth=null",
        f"train.total_steps={budget.steps}",
        f"train.local_batch_size={budget.batch_size}",
        f"train.seed={budget.seed}",
        f"train.cpu_threads={budget.threads}",
        f"logging.log_every={max(1, budget.steps // 10)}",
        "logging.image_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"checkpoint.every_steps={max(1, budget.steps // 4)}",
        "checkpoint.keep_last=1",
        "checkpoint.resume=auto",
        *RECIPE,
        *variant.overrides,
        *extra,
    ]


def train_command(overrides: list[str]) -> str:
    """The ``unitok train-tokenizer`` command line equivalent to one run."""
    return shlex.join(
        ["unitok", "train-tokenizer", "--config", RUN_PRESET, *(a for o in overrides for a in ("--set", o))]
    )


def eval_command(run_dir: Path, world: Path, split: str, max_images: int | None) -> str:
    """An ``unitok eval-tokenizer`` command that measures the same reconstruction and shape zero-shot."""
    args = [
        "unitok",
        "eval-tokenizer",
        "--model",
        str(run_dir / "final"),
        "--data",
        str(world),
        "--split",
        split,
    ]
    args += ["--zeroshot", str(world / "classify" / "shape" / split), "--templates", "synth-shape"]
    if max_images is not None:
        args += ["--max-images", str(max_images)]
    return shlex.join(args)


def evaluate_run(final_dir: Path, world: Path, split: str, max_images: int | None, batch_size: int) -> dict:
    """Reconstruction, codebook use, quantization error and zero-shot top-1 of one trained tokenizer."""
    model = UniTok.from_pretrained(final_dir).eval()
    image_size = model.config.image_size
    dataset, _ = build_image_dataset(str(world), image_size, "image-text", split)
    recon = evaluate_reconstruction(
        model, make_loader(dataset, batch_size, 0, max_images), max_images=max_images, progress=False
    )
    qerr = quantization_error(model, make_loader(dataset, batch_size, 0, max_images), max_images=max_images)
    zero_shot = {
        attribute: evaluate_zero_shot(
            model,
            world / "classify" / attribute / split,
            templates=f"synth-{attribute}",
            batch_size=batch_size,
            max_images=max_images,
            topk=(1,),
        )
        for attribute in ZERO_SHOT_ATTRIBUTES
    }
    codebook = recon["codebook"]
    return {
        "split": split,
        "num_images": recon["num_images"],
        "psnr": recon["psnr"],
        "ssim": recon["ssim"],
        "usage_percent": codebook["usage_percent_mean"],
        "perplexity": codebook["perplexity_mean"],
        # Entropy of the codes per position summed over sub-codebooks: comparable across different K x V.
        "bits_per_position": sum(math.log2(p) for p in codebook["perplexity"]),
        "codebook": codebook,
        "quantization_mse": qerr["mse"],
        "quantization_relative_mse": qerr["relative_mse"],
        "zero_shot_top1": {attribute: result["top1"] for attribute, result in zero_shot.items()},
        "zero_shot_images": {attribute: result["num_images"] for attribute, result in zero_shot.items()},
        "eval_images_per_second": recon["images_per_second"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_variant(
    variant: Variant,
    out_dir: Path,
    world: Path,
    budget: Budget,
    extra: list[str],
    split: str,
    max_images: int | None,
    eval_batch: int,
) -> dict:
    """Train (or continue) and evaluate one run; reuse its ``result.json`` when the budget matches."""
    run_dir = run_folder(out_dir, variant, budget.seed)
    result_path = run_dir / RESULT_FILE
    overrides = run_overrides(variant, out_dir, world, budget, extra)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result["overrides"] != overrides or result["eval"]["split"] != split:
            raise ValueError(
                f"{result_path} was made with another budget, split or overrides; delete {run_dir} or pick "
                "another --out"
            )
        logger.info("%s: reusing %s", variant.run, result_path)
        return result
    logger.info("%s: training %d steps: %s", variant.run, budget.steps, train_command(overrides))
    resumed_from = checkpointing.resolve_resume("auto", run_dir)
    start = time.perf_counter()
    trained = train(load_run_config(RUN_PRESET, overrides))
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_run(trained.final_dir, world, split, max_images, eval_batch)
    eval_seconds = time.perf_counter() - start
    result = {
        "run": variant.run,
        "overrides": overrides,
        "train_command": train_command(overrides),
        "eval_command": eval_command(run_dir, world, split, max_images),
        "budget": {
            **budget.to_dict(),
            "images_seen": trained.step * budget.batch_size,
            "train_seconds": train_seconds,
            # A run continued from a checkpoint reports only this invocation's time.
            "resumed_from": None if resumed_from is None else str(resumed_from),
        },
        "eval_seconds": eval_seconds,
        "last_train_metrics": trained.metrics,
        "eval": metrics,
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``unitok ablations``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Reproduce the UniTok paper's tokenizer findings in miniature (unitok-tiny on the synthetic "
        "world): train each variant with the same budget, evaluate on held-out data, write OUT/ABLATIONS.md.",
    )
    p.add_argument("--finding", choices=("all", *FINDINGS), default="all")
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="training steps per run (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help="training batch per step (default %(default)s)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="train every variant once per seed; tables show the mean and half the range (default 0 1)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process with --threads threads (default %(default)s; "
        "a 2-core machine trains two 1-thread runs side by side)",
    )
    p.add_argument(
        "--world",
        default="runs/world",
        help="synthetic world folder, as the README's `unitok data synth --out runs/world --size 64` writes it "
        "(default %(default)s)",
    )
    p.add_argument("--split", default="val", choices=("val", "test"), help="held-out split to evaluate on")
    p.add_argument("--max-eval-images", type=int, help="at most this many images per evaluation set")
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--out", default="runs/ablations", help="folder of the runs (default %(default)s)")
    p.add_argument(
        "--doc", help="markdown report (default: OUT/ABLATIONS.md; docs/ABLATIONS.md only when asked)"
    )
    p.add_argument("--json", help="JSON of all results (default: OUT/ablations.json)")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config override for every run (repeatable), e.g. --set train.device=cpu",
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok ablations``; returns 0 on success."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.threads, args.jobs, args.eval_batch_size) < 1:
        parser.error("--steps, --batch-size, --threads, --jobs and --eval-batch-size must be >= 1")
    if args.max_eval_images is not None and args.max_eval_images < 1:
        parser.error("--max-eval-images must be >= 1")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    world = Path(args.world)
    if not (world / "captions" / "train.jsonl").is_file() or not (world / "classify").is_dir():
        parser.error(
            f"{world} is not a synthetic world with classify/ folders; write one with "
            f"`unitok data synth --out {world} --num-images 8000 --size 64`"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = run_sweep(args, world, prog or "python -m unitok.scripts.ablations", argv)
    finally:
        torch.set_num_threads(threads)
    print(render_markdown(report))
    return 0


def _run_in_worker(
    variant: Variant, out_dir: Path, world: Path, budget: Budget, args: argparse.Namespace
) -> dict:
    """``run_variant`` in a worker process, with the sweep's thread count and logging."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(budget.threads)
    return run_variant(
        variant, out_dir, world, budget, args.extra, args.split, args.max_eval_images, args.eval_batch_size
    )


def _train_parallel(
    args: argparse.Namespace, world: Path, out_dir: Path, pending: dict[tuple[str, int], Variant]
) -> dict[tuple[str, int], dict]:
    """Train and evaluate ``pending`` runs in ``args.jobs`` spawned processes; a failed run fails the sweep
    after the others finish (each resumes from its checkpoint on the next invocation)."""
    import concurrent.futures
    import multiprocessing

    done: dict[tuple[str, int], dict] = {}
    errors: list[str] = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(
                _run_in_worker,
                variant,
                out_dir,
                world,
                Budget(args.steps, args.batch_size, seed, args.threads),
                args,
            ): (run, seed)
            for (run, seed), variant in pending.items()
        }
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                done[key] = future.result()
                logger.info("%s (seed %d): done", *key)
            except Exception as err:  # reported together below; the other runs keep going
                errors.append(f"{key[0]} (seed {key[1]}): {type(err).__name__}: {err}")
    if errors:
        raise RuntimeError("runs failed (rerun the same command to resume them): " + "; ".join(errors))
    return done


def run_sweep(args: argparse.Namespace, world: Path, prog: str, argv: list[str] | None) -> dict:
    """Train and evaluate every run the chosen findings need (each variant once per seed); write the JSON and
    markdown reports."""
    out_dir = Path(args.out)
    findings = FINDINGS if args.finding == "all" else (args.finding,)
    json_path = Path(args.json) if args.json else out_dir / "ablations.json"
    doc_path = Path(args.doc) if args.doc else out_dir / "ABLATIONS.md"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else None
    results: dict[tuple[str, int], dict] = {}
    if args.jobs > 1:
        # Distinct runs first, several at a time; the loop below then reuses their result.json.
        pending = {(v.run, seed): v for finding in findings for v in VARIANTS[finding] for seed in args.seeds}
        results.update(_train_parallel(args, world, out_dir, pending))
    report_findings = {}
    for finding in findings:
        rows = []
        for variant in VARIANTS[finding]:
            for seed in args.seeds:
                if (variant.run, seed) not in results:
                    budget = Budget(args.steps, args.batch_size, seed, args.threads)
                    results[variant.run, seed] = run_variant(
                        variant,
                        out_dir,
                        world,
                        budget,
                        args.extra,
                        args.split,
                        args.max_eval_images,
                        args.eval_batch_size,
                    )
            seed_results = [results[variant.run, seed] for seed in args.seeds]
            rows.append(aggregate_row(variant.label, variant.note, seed_results))
        report_findings[finding] = {"paper": PAPER[finding], "rows": rows, "verdict": verdict(finding, rows)}
    budget = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "threads": args.threads,
    }
    if (
        previous is not None
        and previous["setup"]["budget"] == budget
        and previous["setup"]["split"] == args.split
    ):
        # Keep findings of earlier invocations with the same budget (e.g. --finding run one at a time).
        report_findings = {**previous["findings"], **report_findings}
    metadata = json.loads((world / "metadata.json").read_text())
    report = {
        "setup": {
            "command": shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)]),
            "budget": budget,
            "world": str(world),
            "split": args.split,
            "train_images": metadata["splits"]["train"],
            "num_eval_images": next(iter(results.values()))["eval"]["num_images"],
            "image_size": metadata["config"]["size"],
            "patch_size": load_run_config(RUN_PRESET, args.extra).model.tokenizer_config().patch_size,
            "machine": machine_description(),
            "run_preset": RUN_PRESET,
            "recipe": list(RECIPE),
            "json": str(json_path),
            "num_runs": len(results),
            "total_seconds": sum(r["budget"]["train_seconds"] + r["eval_seconds"] for r in results.values()),
        },
        "findings": {f: report_findings[f] for f in FINDINGS if f in report_findings},
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render_markdown(report))
    logger.info("wrote %s and %s", json_path, doc_path)
    return report


if __name__ == "__main__":
    sys.exit(main())
