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


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from unitok.tokenizer import UniTok
    from unitok.tokenizer.training.config import load_run_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokenizer") / "final"
    UniTok(load_run_config("unitok-tiny-synth").model.tokenizer_config()).save_pretrained(path)
    return path


def test_frozen_code_vectors_are_the_tokenizers_own(world, tokenizer_dir):
    from unitok.tokenizer import UniTok

    tokenizer = UniTok.from_pretrained(tokenizer_dir).eval()
    pixels, _ = shape_probe.load_split(world, "test")
    vecs = shape_probe.encode_split(tokenizer, pixels, batch=3)
    h = tokenizer.config.image_size // tokenizer.config.patch_size
    assert vecs.shape == (len(pixels), h, h, tokenizer.config.vocab_width)
    with torch.no_grad():
        torch.testing.assert_close(vecs[:2], tokenizer.codes_to_vectors(tokenizer.encode(pixels[:2])))


@pytest.mark.parametrize("reader", shape_probe.READERS)
def test_frozen_code_probe_trains_every_reader(world, tokenizer_dir, reader):
    torch.set_num_threads(1)
    rows = shape_probe.probe_codes(world, tokenizer_dir, reader, steps=3, every=2, batch=4)
    assert [row["step"] for row in rows] == [2, 3] and rows[0]["features"] == f"codes:{reader}"
    for row in rows:
        assert 0 <= row["exact"] <= row["per_label"] <= 1 and row["loss"] > 0


def test_frozen_code_readers_see_what_they_should():
    """Changing the grid's last position: the per-position and window readers (the MLLM's projectors, causal)
    keep every other position's features; the conv reader's neighbours of that position change."""
    torch.manual_seed(0)
    vecs = torch.randn(1, 4, 4, 8)
    changed = vecs.clone()
    changed[0, 3, 3] += 5.0
    for reader in shape_probe.READERS:
        body = shape_probe._CodeReader(reader, code_width=8, grid_width=4, width=16).eval()
        with torch.no_grad():
            if reader == "conv":
                before, after = (body.net(v.permute(0, 3, 1, 2))[0, :, 2, 2] for v in (vecs, changed))
                assert not torch.allclose(before, after)
            else:
                before, after = (body.net(v.flatten(1, 2))[:, :15] for v in (vecs, changed))
                assert torch.equal(before, after)
            assert body(vecs).shape == (1, 16)
    with pytest.raises(ValueError, match="unknown reader"):
        shape_probe._CodeReader("nope", 8, 4)


def test_main_probes_a_tokenizer_when_given_one(world, tokenizer_dir, capsys):
    argv = ["--world", str(world), "--tokenizer", str(tokenizer_dir), "--steps", "1", "--readers", "window"]
    assert shape_probe.main(argv) == 0
    assert "| codes:window | 1 |" in capsys.readouterr().out
