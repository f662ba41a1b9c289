"""Hard-negative captions (``data.negative_words`` + ``loss.clip_negatives``): the word swap, the loss, the
collated ids and a short training run that uses them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizer_runs import make_world, run, tiny_overrides, torchrun

from unitok.data.negatives import WordSwap, load_word_swap, load_word_swaps
from unitok.data.world import COLOR_NAMES, SHAPES
from unitok.tokenizer.losses import hard_negative_loss
from unitok.tokenizer.training.config import load_run_config
from unitok.tokenizer.training.data import _Collate
from unitok.tokenizer.training.monitor import METRICS_FILE

SHAPE_WORDS = {s.name for s in SHAPES.values()} | {s.plural for s in SHAPES.values()}


def _words(text: str) -> list[str]:
    return text.replace(",", " ").split()


def test_a_swap_changes_exactly_one_shape_word_to_an_unused_one_of_the_same_number():
    swap = load_word_swap("synth-shape")
    rng = np.random.default_rng(0)
    captions = ["a small circle above two small triangles", "a diamond and two stars", "three pink rings"]
    seen = set()
    for caption in captions * 20:
        negative = swap.negative(caption, rng)
        before, after = _words(caption), _words(negative)
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and len(changed) == 1, (caption, negative)
        old, new = changed[0]
        assert old in SHAPE_WORDS and new in SHAPE_WORDS and new not in before
        singular = {s.name for s in SHAPES.values()}
        assert (old in singular) == (new in singular), (old, new)
        seen.add(new)
    assert len(seen) >= 8  # the draws cover the vocabulary, not one fixed replacement
    assert swap.negative("a photo of a thing", rng) is None
    # Whole words only: "crosses" is a shape word, "across" is not.
    assert swap.negative("walking across", rng) is None


def test_colour_swaps_keep_the_article_right():
    swap = load_word_swap("synth-color")
    negatives = {swap.negative("a red circle", np.random.default_rng(seed)) for seed in range(200)}
    assert negatives == {f"{'an' if c[0] in 'aeiou' else 'a'} {c} circle" for c in COLOR_NAMES if c != "red"}
    negatives = {swap.negative("An orange star", np.random.default_rng(seed)) for seed in range(200)}
    assert "A red star" in negatives and "An orange star" not in negatives
    assert all(n.startswith("A ") for n in negatives)


def test_vocabulary_files_and_their_errors(tmp_path):
    good = tmp_path / "words.txt"
    good.write_text("# animals\ncat dog  bird\n\ncats dogs birds  # plurals\n", encoding="utf-8")
    swap = load_word_swap(str(good))
    assert swap.groups == [("cat", "dog", "bird"), ("cats", "dogs", "birds")]
    assert swap.negative("two cats", np.random.default_rng(0)) in {"two dogs", "two birds"}
    for text, message in (
        ("cat\n", "at least two words"),
        ("cat dog\ndog bird\n", "more than one group"),
        ("# nothing\n", "holds no swap group"),
        ("cat d0g\n", "letters"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_word_swap(str(bad))
    with pytest.raises(ValueError, match="synth-shape"):
        load_word_swap(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="at least two words"):
        WordSwap([["only"]])


def test_hard_negative_loss_by_hand_and_masked_rows():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    negative = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    valid = torch.tensor([True, True, False])
    scale = 3.0
    # row 0: p = 0.6, n = 1.0; row 1: p = 1.0, n = 0.6; row 2 masked out
    expected = (math.log(1 + math.exp(scale * 0.4)) + math.log(1 + math.exp(-scale * 0.4))) / 2
    loss = hard_negative_loss(image, text, negative, valid, torch.tensor(scale))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    none = hard_negative_loss(image, text, negative, torch.zeros(3, dtype=torch.bool), scale)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match=r"negative features \[B,N,E\]"):
        hard_negative_loss(image, text[:2], negative, valid, scale)
    with pytest.raises(ValueError, match="bool mask"):
        hard_negative_loss(image, text, negative, valid.float(), scale)


def test_several_negatives_per_caption_share_one_softmax_and_missing_ones_drop_out():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.8, 0.6], [1.0, 0.0]]])
    valid = torch.tensor([[True, True], [False, True]])
    scale = 2.0
    # row 0: p = 0.6 against 1.0 and 0.0; row 1: p = 1.0 against 0.0 only (its first negative is missing)
    row0 = math.log(math.exp(1.2) + math.exp(2.0) + math.exp(0.0)) - 1.2
    row1 = math.log(math.exp(2.0) + math.exp(0.0)) - 2.0
    loss = hard_negative_loss(image, text, negatives, valid, scale)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # One negative as [B,E] with a [B] mask is the N = 1 case.
    single = hard_negative_loss(image, text, negatives[:, 1], valid[:, 1], scale)
    assert single.item() == pytest.approx(
        hard_negative_loss(image, text, negatives[:, 1:], valid[:, 1:], scale).item()
    )
    with pytest.raises(ValueError, match="bool mask"):
        hard_negative_loss(image, text, negatives, valid[:, :1], scale)


def test_collated_ids_hold_each_caption_and_its_negative_reproducibly():
    samples = [(torch.zeros(3, 8, 8), caption, 0) for caption in ("a red star", "nothing here", "two rings")]
    collate = _Collate(16, load_word_swaps("synth-shape"))
    _, ids, skipped = collate(samples)
    assert ids.shape == (3, 2, 16) and ids.dtype == torch.long and int(skipped) == 0
    assert torch.equal(ids[:, 0], _Collate(16)(samples)[1])
    assert ids[0, 1, 0] != 0 and ids[2, 1, 0] != 0 and not ids[1, 1].any()
    assert not torch.equal(ids[0, 0], ids[0, 1])
    assert torch.equal(collate(samples)[1], ids)  # the same batch draws the same swaps (exact resume)
    empty = collate([(None, "", 2)])
    assert empty[1].shape == (0, 2, 16) and int(empty[2]) == 2
    # One negative per vocabulary: a shape swap, then a colour swap ("two rings" names no colour).
    both = _Collate(16, load_word_swaps("synth-shape+synth-color"))(samples)[1]
    assert both.shape == (3, 3, 16) and torch.equal(both[:, 0], ids[:, 0])
    assert both[0, 1].any() and both[0, 2].any() and both[2, 1].any() and not both[2, 2].any()
    assert not torch.equal(both[0, 1], both[0, 2])
    with pytest.raises(ValueError, match="empty vocabulary"):
        load_word_swaps("synth-shape+")


def test_config_needs_a_vocabulary_for_the_negative_term():
    with pytest.raises(ValueError, match=r"needs loss\.clip > 0 and data\.negative_words"):
        load_run_config("unitok-tiny-synth", ["loss.clip_negatives=0.5"])
    with pytest.raises(ValueError, match=r"data\.negative_words"):
        load_run_config("unitok-tiny-synth", ["data.negative_words=no-such-vocabulary.txt"])
    with pytest.raises(ValueError, match=r"data\.negative_words.*no-such"):
        load_run_config("unitok-tiny-synth", ["data.negative_words=synth-shape+no-such.txt"])
    config = load_run_config(
        "unitok-tiny-synth", ["loss.clip_negatives=0.5", "data.negative_words=synth-shape+synth-color"]
    )
    assert (config.loss.clip_negatives, config.data.negative_words) == (0.5, "synth-shape+synth-color")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory)


def test_a_run_with_hard_negatives_logs_the_term_and_trains_differently(world, tmp_path):
    base = run(tmp_path / "base", world, "data.negative_words=synth-shape")
    negatives = run(tmp_path / "neg", world, "data.negative_words=synth-shape", "loss.clip_negatives=1.0")
    assert base.step == negatives.step == 2
    records = [json.loads(line) for line in (tmp_path / "neg" / METRICS_FILE).read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "base" / METRICS_FILE).read_text().splitlines()]
    assert all("clip_neg" not in r for r in plain)
    # A random model cannot tell a caption from its swap: the two-way loss starts near ln 2.
    assert records[0]["clip_neg"] == pytest.approx(math.log(2), abs=0.15)
    # The same batches and the same CLIP loss at step 1; the extra term changes the update.
    assert records[0]["clip"] == pytest.approx(plain[0]["clip"], rel=1e-5)
    assert records[1]["clip"] != pytest.approx(plain[1]["clip"], rel=1e-6)


def test_a_run_with_two_negatives_per_caption_starts_near_ln_3(world, tmp_path):
    run(tmp_path / "two", world, "data.negative_words=synth-shape+synth-color", "loss.clip_negatives=1.0")
    records = [json.loads(line) for line in (tmp_path / "two" / METRICS_FILE).read_text().splitlines()]
    # Some captions of the world name no colour: their rows have one negative (ln 2), the rest two (ln 3).
    assert math.log(2) - 0.15 < records[0]["clip_neg"] < math.log(3) + 0.15
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.distributed
def test_two_gloo_processes_train_with_hard_negatives(world, tmp_path):
    negatives = ("data.negative_words=synth-shape", "loss.clip_negatives=1.0")
    single = tmp_path / "single"
    run(single, world, "model.overrides.entropy_weight=0.0", *negatives)
    ddp = tmp_path / "ddp"
    torchrun(tiny_overrides(ddp, world, "train.local_batch_size=4", *negatives))
    read = lambda out: [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]  # noqa: E731
    mine, reference = read(ddp), read(single)
    assert [r["samples"] for r in mine] == [8, 16]
    # Step 1 sees the same images and captions split over the two processes: the pixel and in-batch CLIP
    # terms match. The swaps are drawn per local batch, so the negatives themselves differ: the term is
    # compared with its start near ln 2, not to the digit.
    for key in ("l2", "clip"):
        assert mine[0][key] == pytest.approx(reference[0][key], rel=1e-4), key
    for records in (mine, reference):
        assert records[0]["clip_neg"] == pytest.approx(math.log(2), abs=0.15)
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["clip_neg"]) for r in records)
