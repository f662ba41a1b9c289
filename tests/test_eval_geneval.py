"""GenEval folder writer (layout, config, resume) and the exact synthetic scorer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401

from unitok.data.geneval import GENEVAL_TAGS, make_geneval_prompts, render_from_metadata
from unitok.data.world import Background, Scene, SceneObject
from unitok.eval.geneval import (
    SamplingSettings,
    main,
    official_prompts_path,
    read_prompts,
    score_folder,
    score_image,
    write_geneval_folder,
)


class RenderingModel:
    """Stands in for the MLLM: 'generates' the world's own render of each prompt (seeded per call)."""

    def __init__(self, prompts: list[dict]):
        self.by_text = {p["prompt"]: p for p in prompts}
        self.calls = 0

    def generate_images(self, texts, seed=0, **_):
        self.calls += 1
        images = [
            render_from_metadata(self.by_text[t], size=64, seed=seed * 100 + i) for i, t in enumerate(texts)
        ]
        return type("Generated", (), {"images": images})()


def test_official_prompts_shipped():
    prompts = read_prompts(official_prompts_path())
    assert len(prompts) == 553
    counts = {tag: sum(p["tag"] == tag for p in prompts) for tag in GENEVAL_TAGS}
    assert counts == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    assert (official_prompts_path().parent / "LICENSE").read_text().startswith("MIT License")


def test_world_renders_score_one(tmp_path):
    prompts = make_geneval_prompts(seed=3, per_tag=dict.fromkeys(GENEVAL_TAGS, 3))
    model = RenderingModel(prompts)
    info = write_geneval_folder(model, prompts, tmp_path, SamplingSettings(batch_size=4), progress=False)
    assert info["images"] == 4 * len(prompts)
    first = tmp_path / "00000"
    assert json.loads((first / "metadata.jsonl").read_text()) == prompts[0]
    assert sorted(p.name for p in (first / "samples").iterdir()) == [f"{n:04d}.png" for n in range(4)]
    score = score_folder(tmp_path, progress=False)
    assert score["tags"] == dict.fromkeys(GENEVAL_TAGS, 1.0)
    assert score["overall"] == 1.0 and score["correct_prompts"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(prompts) and all(r["correct"] for r in rows)


def _scene(*objects: SceneObject) -> Scene:
    return Scene(64, tuple(objects), Background("solid", ((130, 130, 130),)))


RED_CIRCLE = SceneObject("circle", "red", "large", (4.0, 22.0, 24.0, 42.0))
BLUE_SQUARE = SceneObject("square", "blue", "large", (38.0, 22.0, 58.0, 42.0))
LINES = {
    "single_object": {"include": [{"class": "circle", "count": 1}]},
    "two_object": {"include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]},
    "colors": {"include": [{"class": "circle", "count": 1, "color": "red"}]},
    "position": {
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ]
    },
    "color_attr": {
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ]
    },
}


def _passing(scene: Scene) -> set[str]:
    image = scene.render()
    return {tag for tag, line in LINES.items() if score_image(image, {"tag": tag, "prompt": "p", **line})[0]}


def test_removing_or_recolouring_loses_exactly_the_right_tags():
    assert _passing(_scene(RED_CIRCLE, BLUE_SQUARE)) == set(LINES)
    # Recolouring the circle: only the colour tags fail.
    assert _passing(_scene(replace(RED_CIRCLE, color="green"), BLUE_SQUARE)) == set(LINES) - {
        "colors",
        "color_attr",
    }
    # Removing the square: everything that needs it fails.
    assert _passing(_scene(RED_CIRCLE)) == {"single_object", "colors"}
    # Removing the circle: everything fails.
    assert _passing(_scene(BLUE_SQUARE)) == set()
    # Swapping sides: only the position fails.
    left, right = replace(BLUE_SQUARE, box=RED_CIRCLE.box), replace(RED_CIRCLE, box=BLUE_SQUARE.box)
    assert _passing(_scene(left, right)) == set(LINES) - {"position"}


def test_counting_needs_the_exact_count():
    line = {
        "tag": "counting",
        "prompt": "a photo of two stars",
        "include": [{"class": "star", "count": 2}],
        "exclude": [{"class": "star", "count": 3}],
    }
    boxes = [(4.0, 4.0, 20.0, 20.0), (40.0, 4.0, 56.0, 20.0), (4.0, 40.0, 20.0, 56.0)]
    stars = [SceneObject("star", "yellow", "small", b) for b in boxes]
    assert score_image(_scene(*stars[:2]).render(), line) == (True, "")
    ok, reason = score_image(_scene(*stars).render(), line)
    assert not ok and "star<3" in reason
    ok, reason = score_image(_scene(stars[0]).render(), line)
    assert not ok and "star>=2" in reason


@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mllm") / "model"
    tiny_mllm(tiny_unitok()).save_pretrained(path)
    return path


def _prompt_file(tmp_path: Path, prompts: list[dict]) -> Path:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def test_cli_generates_scores_and_resumes(tmp_path, mllm_dir, capsys):
    prompts = make_geneval_prompts(seed=0, per_tag={"single_object": 2, "colors": 1})
    file, out = _prompt_file(tmp_path, prompts), tmp_path / "out"
    argv = ["--model", str(mllm_dir), "--prompts", str(file), "--out", str(out), "--scorer", "synthetic"]
    argv += ["--batch-size", "2", "--n-samples", "2", "--seed", "5", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["score"]["tags"]) == {"single_object", "colors"}
    assert 0.0 <= report["score"]["overall"] <= 1.0
    assert report["generation"]["images"] == 6 and report["paper"]["geneval_overall"] == 0.59
    assert (out / "grid.png").is_file() and "overall" in (out / "results.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"]["seed"] == 5 and config["sampling"]["n_samples"] == 2
    before = (out / "00002" / "samples" / "0001.png").read_bytes()
    # A rerun skips everything; a lost prompt folder is regenerated with the same pixels.
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["generation"]["resumed_prompts"] == 3
    for f in (out / "00002").rglob("*"):
        if f.is_file():
            f.unlink()
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["generation"]["generated_prompts"] == 1
    assert (out / "00002" / "samples" / "0001.png").read_bytes() == before
    # Other settings into the same folder: refused.
    capsys.readouterr()
    assert main([*argv, "--cfg-scale", "2.0"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(tmp_path, mllm_dir, capsys):
    prompts = make_geneval_prompts(seed=0, per_tag={"single_object": 2})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(prompts[0]) + "\n{not json\n")
    assert main(["--model", str(mllm_dir), "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    dog = _prompt_file(tmp_path, [{**prompts[0], "include": [{"class": "dog", "count": 1}]}])
    assert (
        main(
            [
                "--model",
                str(mllm_dir),
                "--prompts",
                str(dog),
                "--out",
                str(tmp_path / "o"),
                "--scorer",
                "synthetic",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{dog}:1" in err and "not a shape" in err
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text("{}")
    good = _prompt_file(tmp_path, prompts)
    assert main(["--model", str(empty_model), "--prompts", str(good), "--out", str(tmp_path / "o2")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_samples"):
        SamplingSettings(n_samples=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=float("nan"))
