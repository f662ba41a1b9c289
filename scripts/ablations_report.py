"""The report of ``unitok ablations``: rows aggregated over seeds, verdicts against the paper's claims, markdown.

Everything here reads results (``result.json`` of each run, as ``unitok.scripts.ablations`` writes them) and
trains nothing.
"""

from __future__ import annotations

import itertools
import math
import os
import platform

import torch

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
# Shape zero-shot below this in every run (twice chance: 12.5% over 8 classes) means the CLIP branch learned no shapes.
SHAPE_NEAR_CHANCE = 0.25
# The run folder of the base recipe (shared by the rows that are the same model).
BASE_RUN = "base"


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
    "codebooks": "Finding 2: number of sub-codebooks at a fixed total of 2048 entries (64-dim latent)",
    "supervision": "Finding 3: reconstruction, contrastive, or both",
    "projection": "Finding 4: attention vs linear projection around the quantizer",
}


def render_markdown(report: dict) -> str:
    """docs/ABLATIONS.md from the JSON report."""
    setup = report["setup"]
    budget = setup["budget"]
    # Reports written before the patch size was recorded used the release's 16.
    patch = setup.get("patch_size", 16)
    grid = setup["image_size"] // patch
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
        f"{setup['image_size']} px with {patch} px per code position: a {grid}x{grid} code grid. Paper: UniTok-L at "
        "256 px on DataComp-1B, 16 px per position: a 16x16 grid.",
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
        f"- Recipe: preset `{setup['run_preset']}` with `"
        + "`, `".join(setup["recipe"])
        + "` (against codebook collapse at "
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
            if row["run"] == BASE_RUN:
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


def machine_description() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}"
