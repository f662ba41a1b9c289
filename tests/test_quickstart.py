"""The quick start end to end on a tiny budget: every stage runs, the report has every section, and a
second call reuses every stage while ``--stage`` reruns one."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from unitok.scripts import quickstart, quickstart_report

SECTIONS = (
    "## Targets",
    "## Stages",
    "## Tokenizer",
    "![reconstructions](reconstructions.png)",
    "## MLLM",
    "## Visual question answering",
    "## Text to image",
    "![generated](generated.png)",
    "## Try it",
    "unitok demo --model",
)


def test_quickstart_runs_every_stage_and_reports(tmp_path, capsys, caplog):
    out = tmp_path / "qs"
    argv = [
        "--out", str(out), "--num-images", "120", "--steps", "2", "--eval-images", "8",
        "--world", "size=32", "--world", "classify_per_class=2",
        "--set", "data.num_workers=0", "--set", "model.overrides.image_size=32",
        "--set", "train.local_batch_size=4", "--set", "logging.progress_bar=false",
        "--set", "logging.tensorboard=false", "--set", "train.cpu_threads=1",
        "--mllm", "steps=3", "--mllm", "batch=4", "--mllm", "hidden=32", "--mllm", "layers=1",
        "--mllm", "intermediate=64", "--mllm", "depth_width=32",
        "--sampling", "images_per_prompt=1", "--max-prompts", "6", "--vqa-limit", "10", "--no-progress",
    ]  # fmt: skip
    assert quickstart.main(argv) == 0
    for stage in quickstart.STAGES:
        assert (out / "stages" / f"{stage}.json").is_file(), stage
    summary = json.loads((out / "report.json").read_text())
    names = [t["name"] for t in summary["targets"]]
    assert names == [name for name, *_ in quickstart_report.TARGETS]
    for target in summary["targets"]:
        assert set(target) >= {"name", "measured", "target", "reached"}
        assert target["measured"] is not None, target["name"]
        assert isinstance(target["reached"], bool)
    results = summary["results"]
    assert results["tokenizer"]["steps"] == 2 and len(results["tokenizer"]["usage"]) == 8
    assert results["codes"]["images"]["test"] == 6
    assert set(results["vqa"]["per_type"]) <= set(quickstart_report.QA_TYPES)
    assert results["vqa"]["questions"] == 10 and results["generation"]["prompts"] == 6
    assert set(summary["stages"]) == set(quickstart.STAGES) - {"report"}
    report = (out / "REPORT.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    assert "- visual tokens: window projector" in report  # the recipe's default merger, through train-mllm
    for image in ("reconstructions.png", "generated.png"):
        assert (out / image).is_file()
    assert list((out / "qa_examples").glob("*.png"))
    assert (Path(results["mllm"]["dir"]) / "config.json").is_file()
    assert f"unitok demo --model {results['mllm']['dir']}" in report

    # A second call reuses every stage; --stage reruns only the one named.
    before = {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in quickstart.STAGES}
    assert quickstart.main([*argv, "--stage", "vqa"]) == 0
    after = {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in quickstart.STAGES}
    assert [s for s in quickstart.STAGES if after[s] != before[s]] == ["vqa", "report"]
    assert "report written to" in capsys.readouterr().out

    # Other MLLM settings (another seed) train a new MLLM, which makes its evaluations stale: they run again;
    # the tokenizer and the codes are reused.
    caplog.set_level(logging.INFO, logger="unitok.quickstart")
    argv += ["--mllm", "seed=1"]
    assert quickstart.main(argv) == 0
    again = {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in quickstart.STAGES}
    assert [s for s in quickstart.STAGES if again[s] != after[s]] == ["mllm", "vqa", "generation", "report"]
    assert "stage mllm: running again, its input changed since it ran: settings" in caplog.text
    assert "stage vqa: running again, its input changed since it ran: mllm" in caplog.text
    # A stage whose own output is gone runs again; the same codes, byte for byte, leave the MLLM as it is.
    shutil.rmtree(out / "codes")
    assert quickstart.main(argv) == 0
    after = {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in quickstart.STAGES}
    assert [s for s in quickstart.STAGES if after[s] != again[s]] == ["codes", "report"]

    # Other tokenizer settings resume its run, which refuses a changed training: an error that says what to do.
    caplog.clear()
    assert quickstart.main([*argv, "--steps", "3"]) == 2
    assert "train.total_steps" in caplog.text and f"remove {out / 'tokenizer'}" in caplog.text
    assert {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in quickstart.STAGES} == after

    # A world on disk of another config is neither reused nor replaced under the models trained on it.
    assert quickstart.main([*argv, "--world", "max_objects=2"]) == 2
    assert {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in quickstart.STAGES} == after
    assert "max_objects: 3 on disk, 2 asked for" in caplog.text


def test_prompt_wrap_keeps_every_word_and_the_width():
    text = "a photo of a purple heart below a small green cross and a yellow ring"
    lines = quickstart_report._wrap(text, len, 20)
    assert " ".join(lines) == text
    assert all(len(line) <= 20 for line in lines) and len(lines) == 4
    assert quickstart_report._wrap("incomprehensibilities x", len, 5) == ["incomprehensibilities", "x"]
    assert quickstart_report._wrap("", len, 5) == [""]


def test_recipe_fields_take_numbers_in_any_yaml_spelling():
    from unitok.scripts.quickstart_mllm import MLLMRecipe, SamplingRecipe

    # YAML reads 5e-3 (no dot) as a string; the recipe must get the float.
    parsed = quickstart._parse_fields(MLLMRecipe, ["lr=5e-3", "steps=1600", "generation_fraction=0.25"])
    assert parsed == {"lr": 0.005, "steps": 1600, "generation_fraction": 0.25}
    assert isinstance(parsed["lr"], float) and isinstance(parsed["steps"], int)
    assert quickstart._parse_fields(SamplingRecipe, ["cfg_scale=3", "top_k=null"]) == {
        "cfg_scale": 3.0,
        "top_k": None,
    }
    for bad, says in (("steps=1.5", "steps must be an integer"), ("lr=fast", "lr must be a number")):
        with pytest.raises(SystemExit, match=says):
            quickstart._parse_fields(MLLMRecipe, [bad])
