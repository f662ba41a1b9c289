"""The supervised shape probe (``python -m unitok.scripts.shape_probe``) on a small world."""

from pathlib import Path

import pytest
import torch

from unitok.data.synth import SynthConfig, generate_world
from unitok.data.world import SHAPE_NAMES
from unitok.scripts import shape_probe


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(
        root,
        SynthConfig(num_images=60, size=64, classify_per_class=1, shard_size=64, geneval_per_tag={}),
        workers=1,
    )
    return root


def test_labels_are_the_shapes_of_each_scene(world):
    pixels, labels = shape_probe.load_split(world, "test")
    assert pixels.shape[1:] == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert labels.shape == (len(pixels), len(SHAPE_NAMES))
    assert torch.all(labels.sum(1) >= 1) and torch.all(labels.sum(1) <= 3)
    with pytest.raises(FileNotFoundError, match="unitok data synth"):
        shape_probe.load_split(world, "nope")


@pytest.mark.parametrize("features", shape_probe.FEATURES)
def test_probe_trains_and_scores_every_feature_choice(world, features):
    torch.set_num_threads(1)
    rows = shape_probe.probe(world, "unitok-tiny-synth", features, steps=3, every=2)
    assert [row["step"] for row in rows] == [2, 3]
    for row in rows:
        assert 0 <= row["exact"] <= row["per_label"] <= 1 and row["loss"] > 0


def test_main_prints_a_table(world, capsys):
    assert shape_probe.main(["--world", str(world), "--steps", "1", "--features", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "| cnn | 1 |" in out
