"""The quick start end to end on a tiny budget: world, training, evaluation, report."""

import json

from unitok.scripts import quickstart


def test_quickstart_writes_world_run_and_report(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = [
        "--out", str(out), "--num-images", "160", "--steps", "2", "--eval-images", "8",
        "--set", "data.synth.size=32", "--set", "data.synth.classify_per_class=2",
        "--set", "data.num_workers=0", "--set", "model.overrides.image_size=32",
        "--set", "train.local_batch_size=4", "--set", "logging.progress_bar=false",
        "--set", "logging.tensorboard=false", "--set", "train.cpu_threads=1",
    ]  # fmt: skip
    assert quickstart.main(argv) == 0
    assert (out / "world" / "metadata.json").is_file()
    assert (out / "tokenizer" / "final" / "config.json").is_file()
    summary = json.loads((out / "report.json").read_text())
    assert summary["train"]["steps"] == 2
    metrics = summary["metrics"]
    assert metrics["images"] == 8 and len(metrics["usage"]) == 8
    assert 0 <= metrics["zero_shot_shape"] <= 100 and 0 <= metrics["zero_shot_color"] <= 100
    report = (out / "REPORT.md").read_text()
    assert "| PSNR of reconstructions |" in report and (out / "reconstructions.png").is_file()
    # A second call reuses the world and the finished run and only rewrites the report.
    world_mtime = (out / "world" / "metadata.json").stat().st_mtime
    assert quickstart.main(argv) == 0
    assert (out / "world" / "metadata.json").stat().st_mtime == world_mtime
    assert json.loads((out / "report.json").read_text())["train"]["steps"] == 2
    assert "report written to" in capsys.readouterr().out
