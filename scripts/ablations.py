"""The UniTok paper's tokenizer findings reproduced in miniature: ``python -m unitok.scripts.ablations``.

Each finding trains a few ``unitok-tiny`` variants through the real trainer (``unitok.tokenizer.train``,
preset ``unitok-tiny-synth``) with the same budget and seed, evaluates each on the held-out split of the
synthetic world, and writes one table per finding to ``OUT/ABLATIONS.md`` plus every number to
``OUT/ablations.json`` (the published ``docs/ABLATIONS.md`` came from ``--doc docs/ABLATIONS.md --json
docs/ablations.json``):

1. ``mcq-vs-rq``: multi-codebook vs residual quantization at the same code shape (D=64, K=8, V=256):
   quantization error and reconstruction.
2. ``codebooks``: 1, 2, 4, 8 sub-codebooks at a fixed total of 2048 entries over a 32-dim latent.
3. ``supervision``: reconstruction only, contrastive only, both.
4. ``projection``: attention vs linear projection around the quantizer.

``--seeds 0 1`` trains every variant once per seed and reports the mean and the range over seeds. Runs are
folders ``<out>/<run>/`` for seed 0 and ``<out>/<run>-seed<k>/`` for other seeds (trainer output, ``final/``
weights, ``result.json``). A run whose ``result.json`` exists for the same budget is not trained again,
and an interrupted run continues from its last checkpoint, so a killed sweep resumes by repeating its command.
Variants that are the same model (the K=8 row, the "both" row and the attention row are the base recipe)
share one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unitok.eval import evaluate_reconstruction, evaluate_zero_shot
from unitok.eval.quantization import quantization_error
from unitok.eval.tokenizer_eval import build_image_dataset, make_loader
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
# The default budget: the quick start's (1200 steps x batch 16).
DEFAULT_STEPS = 1200
DEFAULT_BATCH = 16
ZERO_SHOT_ATTRIBUTES = ("shape", "color")
FINDINGS = ("mcq-vs-rq", "codebooks", "supervision", "projection")
# What the paper reports for each finding (arXiv 2502.20321; ImageNet, 256 px, UniTok-L scale).
PAPER = {
    "mcq-vs-rq": "MCQ has a 15-45x lower quantization error than RQ at the same code shape, and reconstructs "
    "better (rFID 0.55 vs 3.46).",
    "codebooks": "At a fixed total vocabulary, splitting it into more sub-codebooks improves both reconstruction "
    "and zero-shot accuracy.",
    "supervision": "Training with both losses costs neither: reconstruction matches reconstruction-only training "
    "and zero-shot accuracy matches contrastive-only training.",
    "projection": "The attention projection (Fig. 3, 'Attn. Projection') improves on a linear projection.",
}
# A difference smaller than this (or than the range over seeds) is read as a tie: run-to-run noise.
TIE_PSNR_DB = 0.3
TIE_ACCURACY = 0.03
# A final training CLIP loss within this of ln(batch) (chance) means the contrastive branch never learned.
CLIP_PLATEAU_MARGIN = 0.05
# Shape zero-shot below this in every run (chance 12.5% over 8 classes) means the CLIP branch learned no shapes.
SHAPE_NEAR_CHANCE = 0.2


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


BASE = Variant("base", "base", _model())
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


# -------------------------------------------------------------------------------------------------
# verdicts and the report


def _mean_zero_shot(ev: dict) -> float:
    values = ev["zero_shot_top1"].values()
    return sum(values) / len(values)


# Eval fields averaged over seeds (and whose range over seeds is reported).
_AVERAGED = (
    "psnr",
    "ssim",
    "usage_percent",
    "perplexity",
    "bits_per_position",
    "quantization_mse",
    "quantization_relative_mse",
    "eval_images_per_second",
)


def aggregate_row(label: str, note: str, results: list[dict]) -> dict:
    """One table row from the per-seed results of one variant: means, ranges (max - min) and the seed runs.

    ``row["eval"]`` holds the means (same keys as one run's ``eval``), ``row["spread"]`` the range over seeds
    of ``psnr``, ``ssim``, ``quantization_mse``, ``zero_shot_shape``, ``zero_shot_color`` and ``zero_shot``
    (the mean of the two), 0 for a single seed.
    """
    evals = [result["eval"] for result in results]

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    def spread(values):
        values = list(values)
        return max(values) - min(values)

    attributes = list(evals[0]["zero_shot_top1"])
    row_eval = {key: mean(e[key] for e in evals) for key in _AVERAGED}
    row_eval["zero_shot_top1"] = {a: mean(e["zero_shot_top1"][a] for e in evals) for a in attributes}
    row_eval.update(
        split=evals[0]["split"],
        num_images=evals[0]["num_images"],
        codebook_size=evals[0]["codebook"]["codebook_size"],
    )
    ranges = {key: spread(e[key] for e in evals) for key in ("psnr", "ssim", "quantization_mse")}
    ranges.update({f"zero_shot_{a}": spread(e["zero_shot_top1"][a] for e in evals) for a in attributes})
    ranges["zero_shot"] = spread(_mean_zero_shot(e) for e in evals)
    budget = results[0]["budget"]
    return {
        "label": label,
        "note": note,
        "run": results[0]["run"],
        "seeds": [result["budget"]["seed"] for result in results],
        "eval": row_eval,
        "spread": ranges,
        "budget": {
            "steps": budget["steps"],
            "batch_size": budget["batch_size"],
            "images_seen": budget["images_seen"],
            "train_seconds": mean(result["budget"]["train_seconds"] for result in results),
        },
        "final_clip_loss": [result["last_train_metrics"].get("clip") for result in results],
        "runs": results,
    }


AGREES, DISAGREES, TIE = "agrees", "disagrees", "tie: not reproduced"


def verdict(finding: str, rows: list[dict]) -> dict:
    """Where the miniature agrees with the paper and where not, with the numbers (means over seeds).

    Returns:
        ``{"claims": [{"claim", "measured", "verdict"}], "lines": [sentences]}``; ``verdict`` is ``"agrees"``,
        ``"disagrees"`` or ``"tie: not reproduced"``. A difference is a tie when it is smaller than the tie
        threshold or than the largest range over seeds of the two rows compared.
    """
    claims, lines = _finding_verdict(finding, rows)
    return {"claims": claims, "lines": lines + _plateau_notes(rows)}


def _tolerance(rows: list[dict], key: str, floor: float) -> float:
    return max(floor, *(row["spread"][key] for row in rows))


def _judge(gain: float, tie: float) -> str:
    """Verdict on a claim that a gain is positive, for a measured ``gain`` and its tie threshold."""
    return AGREES if gain >= tie else DISAGREES if gain <= -tie else TIE


def _claim(claim: str, measured: str, verdict_word: str) -> dict:
    return {"claim": claim, "measured": measured, "verdict": verdict_word}


def _plateau_notes(rows: list[dict]) -> list[str]:
    """Runs whose contrastive loss ended at chance (ln batch): their zero-shot figures are chance, not a trend."""
    batch = rows[0]["budget"]["batch_size"]
    stuck = [
        f"{row['label']} seed {seed} ({loss:.3f})"
        for row in rows
        for seed, loss in zip(row["seeds"], row["final_clip_loss"])
        if loss is not None and loss > math.log(batch) - CLIP_PLATEAU_MARGIN
    ]
    if not stuck:
        return []
    return [
        "Caveat: the contrastive loss of " + ", ".join(stuck) + f" never left its chance level ln(batch) = "
        f"{math.log(batch):.3f} in this budget (the CLIP branch sits on a plateau before it starts learning, "
        "and when it leaves varies from run to run), so zero-shot accuracy there is chance, not an effect of "
        "the variant."
    ]


def _finding_verdict(finding: str, rows: list[dict]) -> tuple[list[dict], list[str]]:
    ev = [row["eval"] for row in rows]
    if finding == "mcq-vs-rq":
        return _mcq_vs_rq(rows)
    if finding == "codebooks":
        labels = [row["label"].split(" (")[0] for row in rows]
        psnr_word, psnr_line = _trend(
            "PSNR", labels, [e["psnr"] for e in ev], "{:.2f} dB", _tolerance(rows, "psnr", TIE_PSNR_DB)
        )
        acc_word, acc_line = _trend(
            "Mean zero-shot top-1 (shape, colour)",
            labels,
            [100 * _mean_zero_shot(e) for e in ev],
            "{:.1f}%",
            100 * _tolerance(rows, "zero_shot", TIE_ACCURACY),
        )
        first, last = ev[0], ev[-1]
        return [
            _claim(
                "more sub-codebooks reconstruct better",
                f"PSNR {first['psnr']:.2f} dB (K=1) -> {last['psnr']:.2f} dB (K=8)",
                psnr_word,
            ),
            _claim(
                "more sub-codebooks give better zero-shot accuracy",
                f"mean top-1 {100 * _mean_zero_shot(first):.1f}% (K=1) -> {100 * _mean_zero_shot(last):.1f}% (K=8)",
                acc_word,
            ),
        ], [psnr_line, acc_line]
    if finding == "supervision":
        return _supervision(rows)
    return _projection(rows)


def _mcq_vs_rq(rows: list[dict]) -> tuple[list[dict], list[str]]:
    mcq, rq = (row["eval"] for row in rows)
    ratio = rq["quantization_mse"] / mcq["quantization_mse"]
    per_seed = [
        b["eval"]["quantization_mse"] / a["eval"]["quantization_mse"]
        for a, b in zip(rows[0]["runs"], rows[1]["runs"])
    ]
    # Direction counts only when every seed agrees on it.
    if all(r >= 15 for r in per_seed) and ratio <= 45:
        error_word = AGREES
    elif all(r > 1 for r in per_seed):
        error_word = f"{AGREES} in direction only (below 15x)"
    elif all(r < 1 for r in per_seed):
        error_word = DISAGREES
    else:
        error_word = TIE
    d_psnr = mcq["psnr"] - rq["psnr"]
    tie_psnr = _tolerance(rows, "psnr", TIE_PSNR_DB)
    claims = [
        _claim(
            "MCQ has a 15-45x lower quantization error",
            f"RQ/MCQ error ratio {ratio:.2f}x (per seed {', '.join(f'{r:.2f}x' for r in per_seed)})",
            error_word,
        ),
        _claim("MCQ reconstructs better", f"PSNR {d_psnr:+.2f} dB for MCQ", _judge(d_psnr, tie_psnr)),
    ]
    lines = [
        f"Quantization error per element: MCQ {mcq['quantization_mse']:.4f} vs RQ {rq['quantization_mse']:.4f}, "
        f"RQ/MCQ = {ratio:.2f}x (per seed: {', '.join(f'{r:.2f}x' for r in per_seed)}); the paper has 15-45x.",
        f"Information in the codes: MCQ {mcq['bits_per_position']:.1f} vs RQ {rq['bits_per_position']:.1f} bits "
        f"per position (mean code perplexity {mcq['perplexity']:.0f} vs {rq['perplexity']:.0f}). The error is "
        "measured on each model's own learned latent, so a quantizer whose encoder packs the latent onto fewer "
        "codes shows a lower error while keeping less information.",
        _compare("Reconstruction", "MCQ", "RQ", mcq, rq, "psnr", tie_psnr, "dB"),
    ]
    return claims, lines


def _supervision(rows: list[dict]) -> tuple[list[dict], list[str]]:
    recon_only, contrastive_only, both = (row["eval"] for row in rows)
    d_psnr = both["psnr"] - recon_only["psnr"]
    d_acc = _mean_zero_shot(both) - _mean_zero_shot(contrastive_only)
    tie_psnr = _tolerance([rows[0], rows[2]], "psnr", TIE_PSNR_DB)
    tie_acc = _tolerance([rows[1], rows[2]], "zero_shot", TIE_ACCURACY)
    # The claim is "no cost": a gain or a tie agrees, only a loss beyond the tie threshold disagrees.
    claims = [
        _claim(
            "joint training costs no reconstruction (vs reconstruction only)",
            f"PSNR {d_psnr:+.2f} dB",
            DISAGREES if d_psnr <= -tie_psnr else AGREES,
        ),
        _claim(
            "joint training costs no zero-shot accuracy (vs contrastive only)",
            f"mean top-1 {100 * d_acc:+.1f} points",
            DISAGREES if d_acc <= -tie_acc else AGREES,
        ),
    ]
    lines = [
        f"Reconstruction: both {both['psnr']:.2f} dB vs reconstruction-only {recon_only['psnr']:.2f} dB "
        f"({d_psnr:+.2f} dB; tie threshold {tie_psnr:.2f} dB).",
        f"Zero-shot (mean of shape and colour top-1): both {100 * _mean_zero_shot(both):.1f}% vs "
        f"contrastive-only {100 * _mean_zero_shot(contrastive_only):.1f}% ({100 * d_acc:+.1f} points; tie "
        f"threshold {100 * tie_acc:.1f}).",
        f"Controls: contrastive-only reconstructs at {contrastive_only['psnr']:.2f} dB (untrained decoder); "
        f"reconstruction-only classifies at {100 * _mean_zero_shot(recon_only):.1f}% (untrained text tower; "
        "chance is 12.5% for shape, 10% for colour).",
    ]
    return claims, lines


def _projection(rows: list[dict]) -> tuple[list[dict], list[str]]:
    attn, linear = (row["eval"] for row in rows)
    d_psnr = attn["psnr"] - linear["psnr"]
    d_acc = _mean_zero_shot(attn) - _mean_zero_shot(linear)
    tie_psnr = _tolerance(rows, "psnr", TIE_PSNR_DB)
    tie_acc = _tolerance(rows, "zero_shot", TIE_ACCURACY)
    claims = [
        _claim(
            "attention projection reconstructs better",
            f"PSNR {d_psnr:+.2f} dB for attention",
            _judge(d_psnr, tie_psnr),
        ),
        _claim(
            "attention projection gives better zero-shot accuracy",
            f"mean top-1 {100 * d_acc:+.1f} points for attention",
            _judge(d_acc, tie_acc),
        ),
    ]
    lines = [
        _compare("Reconstruction", "attention", "linear", attn, linear, "psnr", tie_psnr, "dB"),
        f"Zero-shot (mean of shape and colour top-1): attention {100 * _mean_zero_shot(attn):.1f}% vs linear "
        f"{100 * _mean_zero_shot(linear):.1f}% ({100 * d_acc:+.1f} points; tie threshold {100 * tie_acc:.1f}).",
    ]
    return claims, lines


def _compare(what: str, a_name: str, b_name: str, a: dict, b: dict, key: str, tie: float, unit: str) -> str:
    diff = a[key] - b[key]
    word = "tie" if abs(diff) < tie else (f"{a_name} better" if diff > 0 else f"{b_name} better")
    return (
        f"{what}: {a_name} {a[key]:.2f} {unit} vs {b_name} {b[key]:.2f} {unit} ({diff:+.2f} {unit}, {word}; "
        f"tie threshold {tie:.2f} {unit})."
    )


def _trend(what: str, labels: list[str], values: list[float], fmt: str, tie: float) -> tuple[str, str]:
    """(verdict on "more sub-codebooks are better", a sentence with the series) for values in K order."""
    steps = [b - a for a, b in itertools.pairwise(values)]
    series = ", ".join(f"{label}: {fmt.format(v)}" for label, v in zip(labels, values))
    overall = values[-1] - values[0]
    if all(s > -tie for s in steps) and overall >= tie:
        word, text = AGREES, "improves with more sub-codebooks"
    elif overall >= tie:
        word, text = f"{AGREES} in trend only", "is better with 8 than with 1 sub-codebook but not monotone"
    elif overall > -tie:
        word, text = TIE, "does not change beyond the tie threshold from 1 to 8 sub-codebooks"
    else:
        word, text = DISAGREES, "gets worse with more sub-codebooks"
    return word, f"{what} {text} (tie threshold {fmt.format(tie)}): {series}."


def _with_range(row: dict, value: float, key: str, fmt: str, scale: float = 1.0) -> str:
    """``mean`` or, over several seeds, ``mean ± half the range``."""
    text = fmt.format(scale * value)
    if len(row["seeds"]) > 1:
        text += " ± " + fmt.format(scale * row["spread"][key] / 2)
    return text


def _fmt_row(finding: str, row: dict) -> str:
    e, b = row["eval"], row["budget"]
    zs = e["zero_shot_top1"]
    cells = [row["label"], f"`{row['run']}`"]
    if finding == "mcq-vs-rq":
        cells += [
            _with_range(row, e["quantization_mse"], "quantization_mse", "{:.4f}"),
            f"{e['quantization_relative_mse']:.3f}",
        ]
    cells += [
        _with_range(row, e["psnr"], "psnr", "{:.2f}"),
        _with_range(row, e["ssim"], "ssim", "{:.3f}"),
        f"{e['usage_percent']:.1f}",
        f"{e['perplexity']:.1f} / {e['codebook_size']}",
        f"{e['bits_per_position']:.1f}",
        _with_range(row, zs["shape"], "zero_shot_shape", "{:.1f}", 100),
        _with_range(row, zs["color"], "zero_shot_color", "{:.1f}", 100),
    ]
    if finding != "mcq-vs-rq":
        cells += [f"{e['quantization_relative_mse']:.3f}"]
    losses = row["final_clip_loss"]
    cells += [
        " / ".join("-" if loss is None else f"{loss:.2f}" for loss in losses),
        f"{b['train_seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _header(finding: str) -> list[str]:
    names = ["variant", "run"]
    if finding == "mcq-vs-rq":
        names += ["quant. error (MSE)", "relative error"]
    names += [
        "PSNR dB",
        "SSIM",
        "usage %",
        "perplexity / V",
        "code bits / pos",
        "zero-shot shape %",
        "zero-shot colour %",
    ]
    if finding != "mcq-vs-rq":
        names += ["relative quant. error"]
    names += ["final train CLIP loss (per seed)", "train wall s (mean)"]
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


TITLES = {
    "mcq-vs-rq": "Finding 1: multi-codebook (MCQ) vs residual (RQ) quantization at the same code shape",
    "codebooks": "Finding 2: number of sub-codebooks at a fixed total of 2048 entries (32-dim latent)",
    "supervision": "Finding 3: reconstruction, contrastive, or both",
    "projection": "Finding 4: attention vs linear projection around the quantizer",
}


def render_markdown(report: dict) -> str:
    """docs/ABLATIONS.md from the JSON report."""
    setup = report["setup"]
    budget = setup["budget"]
    lines = [
        "# The paper's tokenizer findings, in miniature",
        "",
        "Generated by `unitok.scripts.ablations` (do not edit by hand; rerun it). Every number below comes from "
        f"`{setup['json']}`.",
        "",
        "## Setup",
        "",
        f"- Model: `unitok-tiny` as the run preset sets it (ViTamin-style encoder of width 128 with 2 ViT blocks, "
        "a 2-block decoder) at "
        f"{setup['image_size']} px: a 4x4 code grid. Paper: UniTok-L at 256 px on DataComp-1B, a 16x16 grid.",
        f"- Data: the built-in synthetic world `{setup['world']}` (train split for training; the held-out "
        f"`{setup['split']}` split for every metric: {setup['num_eval_images']} image-caption pairs for "
        f"reconstruction, `classify/shape/{setup['split']}` (8 classes) and `classify/color/{setup['split']}` "
        "(10 classes) for zero-shot with the synth-shape / synth-color templates).",
        f"- Budget, the same for every run: {budget['steps']} steps x batch {budget['batch_size']} = "
        f"{budget['steps'] * budget['batch_size']:,} images seen (about "
        f"{budget['steps'] * budget['batch_size'] / setup['train_images']:.2f} epochs of "
        f"{setup['train_images']:,} training images), fp32 on CPU, {budget['threads']} torch thread per run; every "
        f"variant trained once per seed ({', '.join(str(x) for x in budget['seeds'])}): {setup['num_runs']} runs. "
        "Wall time per run is in the tables (the machine was shared with other jobs, so it is noisy).",
        f"- Recipe: preset `{RUN_PRESET}` with `" + "`, `".join(RECIPE) + "` (against codebook collapse at "
        "this scale); no LPIPS and no GAN (no pretrained VGG/DINOv2 weights offline).",
        "- Metrics: PSNR/SSIM of 8-bit reconstructions; codebook usage % (entries hit at least once) and "
        "perplexity averaged over the K sub-codebooks, both over the whole held-out set; code bits / pos = "
        "sum over sub-codebooks of log2(perplexity), comparable across K x V; quantization error = mean squared "
        "error per latent element between the per-chunk L2-normalised latent and its quantized vector "
        "(`unitok.eval.quantization`); relative error = that divided by the mean squared normalised latent; "
        "final train CLIP loss = the trainer's last logged contrastive loss (chance: ln(batch)). "
        "rFID is not reported: the FID Inception weights cannot be downloaded here, so PSNR/SSIM stand in.",
        "- Tables show the mean over seeds ± half the range (max - min) where there are several seeds. A "
        f"difference is called a tie when it is below {TIE_PSNR_DB} dB PSNR or {100 * TIE_ACCURACY:.0f} "
        "zero-shot points, or below the largest range over seeds of the rows compared.",
        f"- Scale: a model of about {_parameters(report) / 1e6:.1f} M parameters (UniTok-L: 820 M) that sees "
        f"{budget['steps'] * budget['batch_size']:,} images (the paper: billions), judged on a synthetic world; "
        "a disagreement below is a statement about this scale and budget, not a refutation of the paper.",
        f"- Machine: {setup['machine']}. Sweep wall time: {setup['total_seconds'] / 60:.1f} min "
        "(training + evaluation, summed over the distinct runs).",
        "",
        f"Sweep command: `{setup['command']}`",
        "",
    ]
    lines += ["## Summary: the paper's claims in miniature", "", "| finding | claim | measured | verdict |"]
    lines += ["|---|---|---|---|"]
    for finding, block in report["findings"].items():
        for claim in block["verdict"]["claims"]:
            lines.append(f"| {finding} | {claim['claim']} | {claim['measured']} | {claim['verdict']} |")
    lines += ["", *_zero_shot_note(report), ""]
    for finding in FINDINGS:
        if finding not in report["findings"]:
            continue
        block = report["findings"][finding]
        rows = block["rows"]
        lines += [f"## {TITLES[finding]}", "", f"Paper: {PAPER[finding]}", ""]
        lines += _header(finding) + [_fmt_row(finding, row) for row in rows] + [""]
        notes = [f"{row['label']}: {row['note']}" for row in rows if row.get("note")]
        if notes:
            lines += ["Notes: " + "; ".join(notes) + ".", ""]
        lines += ["**Miniature vs paper.**", ""]
        lines += [
            f"- {c['claim']}: {c['measured']} -> **{c['verdict']}**" for c in block["verdict"]["claims"]
        ]
        lines += [f"- {line}" for line in block["verdict"]["lines"]] + [""]
        lines += [
            "Commands (training, then the equivalent evaluation; the sweep evaluates in-process with the "
            "same functions and adds colour zero-shot and the quantization error):",
            "",
        ]
        for row in rows:
            commands = [c for run in row["runs"] for c in (run["train_command"], run["eval_command"])]
            lines += [f"- {row['label']}:", "", "  ```", *(f"  {c}" for c in commands), "  ```", ""]
    return "\n".join(lines)


def _parameters(report: dict) -> float:
    """Parameters of the base run's model (0 when no base run is in the report)."""
    for block in report["findings"].values():
        for row in block["rows"]:
            if row["run"] == BASE.run:
                return float(row["runs"][0]["eval"].get("parameters", 0))
    return 0.0


def _zero_shot_note(report: dict) -> list[str]:
    """A warning when shape zero-shot stayed near chance in every run (then colour carries the comparisons)."""
    shapes = [
        run["eval"]["zero_shot_top1"]["shape"]
        for block in report["findings"].values()
        for row in block["rows"]
        for run in row["runs"]
        if "shape" in run["eval"]["zero_shot_top1"]
    ]
    if not shapes or max(shapes) >= SHAPE_NEAR_CHANCE:
        return []
    return [
        f"Shape zero-shot top-1 stays between {100 * min(shapes):.1f}% and {100 * max(shapes):.1f}% in every run "
        "(chance 12.5%): at this budget the CLIP branch learns colour words but not shapes, so every zero-shot "
        "comparison here rests on the colour classes."
    ]


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}"


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
            "machine": _machine(),
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
