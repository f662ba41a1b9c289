"""Readers of the real formats: image folder + JSON lines, WebDataset shards, class folders,
LLaVA conversations, GenEval prompts; corrupt samples are skipped and counted; transforms."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unitok.data import (
    ClassFolder,
    ImageTextFolder,
    ImageTextWebDataset,
    SkipCounter,
    eval_transform,
    read_conversations,
    read_geneval_prompts,
    train_transform,
)
from unitok.data.formats import write_tar_shard
from unitok.data.geneval import GENEVAL_TAGS
from unitok.data.synth import SynthConfig, generate_world
from unitok.data.transforms import to_pm1

GENEVAL_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"
)
NUM_TRAIN = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    config = SynthConfig(
        num_images=40,
        size=64,
        seed=1,
        shard_size=8,
        classify_per_class=2,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    generate_world(out, config, workers=1)
    return out


def _check_image(img: torch.Tensor, size: int = 64) -> None:
    assert img.shape == (3, size, size) and img.dtype == torch.float32
    assert img.min() >= -1.0 and img.max() <= 1.0


# --- image folder + JSON lines ------------------------------------------------------------------------


def test_image_text_folder_reads_the_world(world):
    ds = ImageTextFolder(world, "train", eval_transform(64))
    assert len(ds) == NUM_TRAIN and ds.skipped.total == 0
    img, text = ds[3]
    _check_image(img)
    first = json.loads((world / "captions" / "train.jsonl").read_text().splitlines()[3])
    assert text == first["caption"]
    assert torch.equal(img, to_pm1(Image.open(world / first["image"])))
    batch = next(iter(DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 64, 64) and len(batch[1]) == 8


def test_image_text_folder_with_a_tokenizer(world):
    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 1, 2] for t in texts])

    _, tokens = ImageTextFolder(world, "val", tokenizer=tokenizer)[0]
    assert tokens.shape == (3,) and tokens[0] > 0


def test_image_text_folder_skips_and_counts_corrupt_samples(world, tmp_path, caplog):
    root = tmp_path / "corrupt"
    shutil.copytree(world / "images", root / "images")
    lines = (world / "captions" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:6]]
    truncated = root / rows[1]["image"]
    truncated.write_bytes(truncated.read_bytes()[:200])
    (root / rows[2]["image"]).unlink()
    del rows[3]["caption"]
    (root / "captions").mkdir()
    bad = [json.dumps(r) for r in rows] + ['{"image": "images/train/x.png", "caption": ', "[1, 2]", ""]
    (root / "captions" / "train.jsonl").write_text("\n".join(bad) + "\n")

    with caplog.at_level(logging.WARNING, logger="unitok.data.datasets"):
        ds = ImageTextFolder(root, "train")
        assert len(ds) == 5  # six rows, one without caption; the two bad JSON lines dropped
        assert ds.skipped.counts == {"bad_json": 2, "missing_caption": 1}
        texts = [ds[i][1] for i in range(len(ds))]
    # Item 1 (truncated) falls through item 2 (missing file) to item 3; item 2 to item 3.
    assert ds.skipped.counts["bad_image"] == 3
    assert texts[1] == texts[2] == rows[4]["caption"]
    assert any("bad_image" in r.getMessage() for r in caplog.records)


def test_image_text_folder_needs_its_captions_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"captions/\{split\}\.jsonl"):
        ImageTextFolder(tmp_path, "train")


# --- WebDataset shards ----------------------------------------------------------------------------------


def _keys(ds: ImageTextWebDataset, **loader) -> list[str]:
    if loader:
        return [k for batch in DataLoader(ds, batch_size=None, **loader) for k in [batch[2]["key"]]]
    return [sample[2]["key"] for sample in ds]


def test_webdataset_reads_all_shards_in_order(world):
    ds = ImageTextWebDataset(str(world / "shards" / "train-*.tar"), train_transform(48), return_json=True)
    samples = list(ds)
    assert len(samples) == NUM_TRAIN and ds.skipped.total == 0
    img, text, meta = samples[0]
    _check_image(img, 48)
    assert text == meta["caption"]
    assert [m["key"] for _, _, m in samples] == sorted(m["key"] for _, _, m in samples)


def test_webdataset_splits_shards_over_workers_and_ranks(world):
    urls = str(world / "shards" / "train-{000000..000003}.tar")
    everything = _keys(ImageTextWebDataset(urls, return_json=True))
    with_workers = _keys(ImageTextWebDataset(urls, return_json=True), num_workers=2)
    assert sorted(with_workers) == sorted(everything)
    per_rank = [_keys(ImageTextWebDataset(urls, return_json=True, rank=r, world_size=2)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert len(per_rank[0]) == len(per_rank[1]) == NUM_TRAIN // 2


def test_webdataset_shuffle_is_seeded_per_epoch(world):
    ds = ImageTextWebDataset(str(world / "shards"), return_json=True, shuffle=True, shuffle_buffer=8, seed=3)
    ds.shards = [s for s in ds.shards if "train-" in s]
    first = _keys(ds)
    assert _keys(ds) == first
    ds.set_epoch(1)
    second = _keys(ds)
    assert sorted(second) == sorted(first) and second != first


def test_webdataset_skips_and_counts_corrupt_samples(world, tmp_path, caplog):
    with tarfile.open(world / "shards" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})
    samples = [(k, {ext: members[f"{k}.{ext}"] for ext in ("jpg", "txt", "json")}) for k in keys[:5]]
    samples[1][1]["jpg"] = samples[1][1]["jpg"][:300]  # truncated image bytes
    del samples[2][1]["txt"]  # no caption
    samples[3][1]["json"] = b"{not json"
    write_tar_shard(tmp_path / "bad-000000.tar", samples)
    good = (world / "shards" / "train-000001.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(good[: len(good) // 2 + 100])  # shard cut off mid-way

    with caplog.at_level(logging.WARNING, logger="unitok.data.datasets"):
        ds = ImageTextWebDataset(str(tmp_path / "bad-*.tar"), return_json=True)
        out = list(ds)
    assert ds.skipped.counts == {"bad_image": 1, "missing_caption": 1, "bad_json": 1, "bad_shard": 1}
    assert [m["key"] for _, _, m in out][:2] == [keys[0], keys[4]]
    assert 2 < len(out) < 2 + 8  # the samples of the cut shard before the break
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 4


def test_webdataset_rejects_an_empty_pattern(tmp_path):
    with pytest.raises(ValueError, match="no tar shards"):
        ImageTextWebDataset(str(tmp_path / "nothing-*.tar"))


# --- class folders, conversations, GenEval prompts -------------------------------------------------


def test_class_folder(world, tmp_path):
    root = world / "classify" / "color" / "test"
    ds = ClassFolder(root, eval_transform(32))
    assert ds.classes == (world / "classify" / "color" / "classnames.txt").read_text().split()
    assert len(ds) == 2 * len(ds.classes) and ds.targets == sorted(ds.targets)
    img, label = ds[5]
    _check_image(img, 32)
    assert ds.classes[label] == ds.samples[5][0].parent.name

    copy = tmp_path / "classes"
    shutil.copytree(root, copy)
    victim = ds.samples[0][0]
    (copy / victim.parent.name / victim.name).write_bytes(b"not a png")
    broken = ClassFolder(copy)
    _, label = broken[0]
    assert label == 0 and broken.skipped.counts == {"bad_image": 1}


def test_read_conversations(world, tmp_path):
    records = read_conversations(world / "llava" / "train.json")
    assert len(records) == NUM_TRAIN
    bad = [
        *records[:3],
        {
            "id": "x",
            "image": "a.png",
            "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}],
        },
        {
            "id": "y",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "no image token"}, {"from": "gpt", "value": "?"}],
        },
        "not a record",
    ]
    (tmp_path / "conv.json").write_text(json.dumps(bad))
    counter = SkipCounter("test")
    assert len(read_conversations(tmp_path / "conv.json", counter)) == 3
    assert counter.counts == {"bad_conversation": 3}
    (tmp_path / "conv.jsonl").write_text("\n".join([json.dumps(r) for r in records[:2]] + ["{oops"]))
    counter = SkipCounter("test")
    assert len(read_conversations(tmp_path / "conv.jsonl", counter)) == 2 and counter.counts == {
        "bad_json": 1
    }
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_conversations(tmp_path / "broken.json")


def test_read_geneval_prompts(world, tmp_path):
    ours = read_geneval_prompts(world / "geneval" / "evaluation_metadata.jsonl")
    assert {row["tag"] for row in ours} == set(GENEVAL_TAGS)
    if GENEVAL_FILE.exists():
        reference = read_geneval_prompts(GENEVAL_FILE)
        assert len(reference) == 553 and {row["tag"] for row in reference} == set(GENEVAL_TAGS)
    lines = (world / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()[:4]
    lines += ['{"tag": "weird", "include": [], "prompt": "x"}', '{"tag": "counting", "prompt": "x"}', "{bad"]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines))
    counter = SkipCounter("test")
    assert len(read_geneval_prompts(tmp_path / "meta.jsonl", counter)) == 4
    assert counter.counts == {"bad_metadata": 2, "bad_json": 1}


def test_skip_counter_rate_limits_its_warnings(caplog):
    counter = SkipCounter("test", log_first=3)
    with caplog.at_level(logging.WARNING, logger="unitok.data.datasets"):
        for _ in range(1000):
            counter.skip("bad_image", "detail")
    assert counter.total == 1000
    assert len(caplog.records) == 3 + 3  # the first three, then at 10, 100 and 1000


# --- transforms ------------------------------------------------------------------------------------------


def test_transforms_shapes_ranges_and_modes():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 80, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (90, 40), dtype=np.uint8), "L")
    for image in (rgba, gray):
        _check_image(eval_transform(32)(image), 32)
        _check_image(train_transform(32)(image), 32)
    square = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert torch.equal(eval_transform(64)(square), to_pm1(square))
    black, white = Image.new("RGB", (8, 8), 0), Image.new("RGB", (8, 8), (255, 255, 255))
    assert to_pm1(black).eq(-1).all() and to_pm1(white).eq(1).all()
    with pytest.raises(ValueError, match="interpolation"):
        train_transform(32, interpolation="cubic")
    with pytest.raises(ValueError, match="scale"):
        train_transform(32, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="resize_ratio"):
        eval_transform(32, resize_ratio=0.5)


def test_train_transform_crops_randomly_within_scale():
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    smooth = np.stack(
        [ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), 255 - ramp[None, :].repeat(64, 0)], axis=-1
    )
    image = Image.fromarray(smooth.astype(np.uint8))
    torch.manual_seed(0)
    t = train_transform(64)
    a, b = t(image), t(image)
    assert not torch.equal(a, b)
    # Crops keep at least 90% of the area, so a smooth image barely changes.
    assert (a - to_pm1(image)).abs().mean() < 0.1


def test_jpeg_in_shards_decodes_like_the_png(world):
    ds = ImageTextWebDataset(str(world / "shards" / "val-000000.tar"), return_json=True)
    for img, _, meta in ds:
        png = to_pm1(Image.open(world / meta["image"]))
        assert (img - png).abs().mean() < 0.03
