"""unitok.scripts.ablations: the runner end to end on a tiny world (2 steps a run), reuse, and the verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unitok.data.synth import SynthConfig, generate_world
from unitok.scripts import ablations, ablations_report
from unitok.scripts.ablations import VARIANTS, Budget, aggregate_row, main, run_variant, verdict

TINY = ["model.overrides.image_size=32", "data.num_workers=0", "train.device=cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(
        root,
        SynthConfig(num_images=60, size=32, classify_per_class=1, shard_size=64, geneval_per_tag={}),
        workers=1,
    )
    return root


def test_variants_are_consistent():
    runs: dict[str, tuple[str, ...]] = {}
    for finding, variants in VARIANTS.items():
        for variant in variants:
            # Rows that share a run folder must be the same model.
            assert runs.setdefault(variant.run, variant.overrides) == variant.overrides, (finding, variant)
    # Every run spells out all quantizer fields, so its command does not depend on the preset's defaults.
    assert runs["base"] == tuple(f"model.overrides.{k}={v}" for k, v in ablations.BASE_MODEL.items())
    rq = dict(item.split("=", 1) for item in runs["rq-d64"])
    assert rq["model.overrides.vocab_width"] == "64" and rq["model.overrides.quantizer"] == "rq"
    assert rq["model.overrides.num_codebooks"] == "8" and rq["model.overrides.vocab_size"] == "2048"
    assert [len(VARIANTS[f]) for f in ablations.FINDINGS] == [2, 4, 3, 2]


def test_projection_sweep_writes_reports_and_reuses_runs(world, tmp_path, monkeypatch):
    out, doc, report = tmp_path / "runs", tmp_path / "ABLATIONS.md", tmp_path / "ablations.json"
    argv = ["--finding", "projection", "--steps", "2", "--batch-size", "4", "--world", str(world)]
    argv += ["--max-eval-images", "6", "--eval-batch-size", "4", "--out", str(out), "--doc", str(doc)]
    argv += ["--json", str(report), *(a for o in TINY for a in ("--set", o))]
    # The two runs train side by side in two spawned processes.
    assert main([*argv, "--jobs", "2"]) == 0

    data = json.loads(report.read_text())
    rows = data["findings"]["projection"]["rows"]
    assert [row["run"] for row in rows] == ["base", "linear-proj"]
    for row in rows:
        ev = row["eval"]
        assert ev["num_images"] == 3 and ev["split"] == "val"  # the whole val split (5% of 60)
        assert 0 <= ev["zero_shot_top1"]["shape"] <= 1 and 0 <= ev["zero_shot_top1"]["color"] <= 1
        assert ev["quantization_mse"] > 0 and 0 < ev["usage_percent"] <= 100
        assert row["budget"]["images_seen"] == 8 and row["runs"][0]["budget"]["resumed_from"] is None
        assert (out / row["run"] / "final" / "model.safetensors").is_file()
    text = doc.read_text()
    assert "## Finding 4" in text and "| linear projection | `linear-proj` |" in text
    assert "| projection | attention projection reconstructs better |" in text
    assert "--set model.overrides.quant_proj=linear" in text and "2 steps x batch 4 = 8 images seen" in text
    assert (
        data["setup"]["patch_size"] == 8 and "at 32 px with 8 px per code position: a 4x4 code grid" in text
    )

    # A second invocation trains nothing: every run already has its result.
    def no_training(config):
        raise AssertionError(f"trained {config.output_dir} again")

    monkeypatch.setattr(ablations, "train", no_training)
    assert main(argv) == 0
    # ...but a different budget in the same folder is refused instead of mixing runs.
    with pytest.raises(ValueError, match="another budget"):
        main([*argv[:3], "3", *argv[4:]])


@pytest.mark.parametrize(("run", "seed"), [("rq-d64", 0), ("k1", 1), ("contrastive-only", 0)])
def test_one_variant_of_each_other_finding_trains_and_evaluates(world, tmp_path, run, seed):
    variant = next(v for vs in VARIANTS.values() for v in vs if v.run == run)
    result = run_variant(variant, tmp_path, world, Budget(2, 4, seed, 1), TINY, "test", 4, 4)
    assert result["run"] == run and result["eval"]["split"] == "test"
    run_dir = tmp_path / (run if seed == 0 else f"{run}-seed{seed}")
    config = (run_dir / "run_config.yaml").read_text()
    for override in (*variant.overrides, f"train.seed={seed}"):
        key, value = override.rsplit(".", 1)[-1].split("=")
        assert f"{key}: {value}" in config
    assert json.loads((run_dir / ablations.RESULT_FILE).read_text()) == result


def _result(psnr, shape, color, qerr=0.01, clip=2.0, seed=0):
    """One run's result.json with the fields the report reads."""
    return {
        "run": "r",
        "budget": {"seed": seed, "steps": 2, "batch_size": 32, "images_seen": 64, "train_seconds": 1.0},
        "last_train_metrics": {"clip": clip},
        "eval": {
            "split": "val",
            "num_images": 3,
            "codebook": {"codebook_size": 256},
            "psnr": psnr,
            "ssim": 0.5,
            "usage_percent": 50.0,
            "perplexity": 32.0,
            "bits_per_position": 40.0,
            "quantization_mse": qerr,
            "quantization_relative_mse": 10 * qerr,
            "eval_images_per_second": 100.0,
            "zero_shot_top1": {"shape": shape, "color": color},
        },
    }


def _row(label, psnr, shape, color, qerr=0.01, clip=2.0):
    return aggregate_row(label, "", [_result(psnr, shape, color, qerr, clip)])


def test_aggregate_row_means_and_ranges_over_seeds():
    row = aggregate_row(
        "x", "", [_result(18.0, 0.2, 0.4, seed=0), _result(19.0, 0.4, 0.4, clip=None, seed=1)]
    )
    assert row["seeds"] == [0, 1] and row["final_clip_loss"] == [2.0, None]
    assert row["eval"]["psnr"] == pytest.approx(18.5) and row["spread"]["psnr"] == pytest.approx(1.0)
    assert row["eval"]["zero_shot_top1"] == pytest.approx({"shape": 0.3, "color": 0.4})
    assert row["spread"]["zero_shot"] == pytest.approx(0.1) and row["spread"]["zero_shot_color"] == 0
    assert "| 18.50 ± 0.50 |" in ablations_report._fmt_row("projection", row)
    # A 0.5 dB gain is a tie when the seeds of a row disagree by 1 dB.
    other = _row("y", 18.0, 0.3, 0.4)
    assert verdict("projection", [row, other])["claims"][0]["verdict"] == "tie: not reproduced"


def test_verdicts_state_agreement_with_numbers():
    def judged(finding, rows):
        result = verdict(finding, rows)
        return [c["verdict"] for c in result["claims"]], result["lines"]

    words, lines = judged("mcq-vs-rq", [_row("MCQ", 20.0, 0.5, 0.5, 0.01), _row("RQ", 18.0, 0.5, 0.5, 0.2)])
    assert words == ["agrees", "agrees"] and "RQ/MCQ = 20.00x (per seed: 20.00x)" in lines[0]
    words, _ = judged("mcq-vs-rq", [_row("MCQ", 20.0, 0.5, 0.5, 0.1), _row("RQ", 20.1, 0.5, 0.5, 0.2)])
    assert words == ["agrees in direction only (below 15x)", "tie: not reproduced"]
    words, _ = judged("mcq-vs-rq", [_row("MCQ", 20.0, 0.5, 0.5, 0.1), _row("RQ", 21.0, 0.5, 0.5, 0.02)])
    assert words == ["disagrees", "disagrees"]

    rising = [_row(f"{k} x", 18 + i, 0.2 + 0.1 * i, 0.2) for i, k in enumerate((1, 2, 4, 8))]
    assert judged("codebooks", rising)[0] == ["agrees", "agrees"]
    flat = [_row(f"{k} x", 18.0, 0.2, 0.2) for k in (1, 2, 4, 8)]
    words, lines = judged("codebooks", flat)
    assert words == ["tie: not reproduced"] * 2 and "1 x: 18.00 dB" in lines[0]

    rows = [_row("recon", 20.0, 0.1, 0.1), _row("clip", 12.0, 0.8, 0.8), _row("both", 19.0, 0.8, 0.8)]
    words, lines = judged("supervision", rows)
    assert words == ["disagrees", "agrees"] and "(-1.00 dB; tie threshold 0.30 dB)" in lines[0]

    words, _ = judged("projection", [_row("attn", 20.0, 0.6, 0.6), _row("linear", 20.1, 0.4, 0.4)])
    assert words == ["tie: not reproduced", "agrees"]
    # A run whose contrastive loss stayed at ln(32) = 3.466 gets a caveat: its zero-shot figure is chance.
    stuck = verdict("projection", [_row("attn", 20.0, 0.1, 0.1, clip=3.46), _row("linear", 20.0, 0.4, 0.4)])
    assert "attn seed 0 (3.460) never left its chance level" in stuck["lines"][-1]
    assert [c["verdict"] for c in stuck["claims"]] == ["tie: not reproduced", "disagrees"]
