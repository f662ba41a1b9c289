"""Bad data against the readers, the trainer's data stream, the evaluation reader and the synthetic-world
writer. The corpus of bad files is generated here: a PNG declaring 100000 x 100000 pixels, a 16-bit
greyscale PNG, a JSON-lines file with a byte-order mark, tar shards cut on a 512-byte boundary, shards
that are not tar files at all, and half-written synthetic worlds.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unitok.data.datasets import (
    ClassFolder,
    ImageTextFolder,
    ImageTextWebDataset,
    SkipCounter,
    iter_tar_samples,
)
from unitok.data.formats import encode_jpeg, encode_png, write_tar_shard
from unitok.data.synth import COMMIT_MARKER, OUTPUT_ENTRIES, STAGING_PREFIX, SynthConfig, generate_world
from unitok.data.transforms import to_pm1
from unitok.eval.image_files import ImageFiles
from unitok.eval.tokenizer_eval import build_image_dataset, make_loader
from unitok.tokenizer.training.checkpointing import TrainingError
from unitok.tokenizer.training.config import DataSection, load_run_config
from unitok.tokenizer.training.data import DataPosition, build_stream, prepare_synth_world
from unitok.tokenizer.training.distributed import DistInfo


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width x height`` RGB pixels (with one tiny, wrong IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_folder(root: Path, images: dict[str, bytes], split: str = "train", bom: bool = False) -> Path:
    (root / "captions").mkdir(parents=True)
    lines = []
    for name, payload in images.items():
        (root / name).write_bytes(payload)
        lines.append(json.dumps({"image": name, "caption": f"a picture {name}"}))
    text = "\n".join(lines) + "\n"
    (root / "captions" / f"{split}.jsonl").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return root


def samples(keys: range, bad: set[int] = frozenset()) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (
            f"{k:06d}",
            {"jpg": bomb_png() if k in bad else encode_jpeg(image(k)), "txt": f"caption {k}".encode()},
        )
        for k in keys
    ]


CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)


# ----------------------------------------------------------------------------------------------
# image decoding


def test_a_decompression_bomb_is_skipped_and_counted_by_every_reader(tmp_path):
    folder = write_folder(tmp_path / "f", {"good.png": encode_png(image(0)), "bomb.png": bomb_png()})
    train = ImageTextFolder(folder)
    assert [train[i][1] for i in range(2)] == ["a picture good.png", "a picture good.png"]
    assert train.skipped.counts["bad_image"] == 1
    evaluation = ImageTextFolder(folder, replace_bad=False)
    assert evaluation[1] is None and evaluation[0] is not None

    classes = tmp_path / "classes" / "cat"
    classes.mkdir(parents=True)
    (classes / "a.png").write_bytes(bomb_png())
    (classes / "b.png").write_bytes(encode_png(image(1)))
    assert ClassFolder(classes.parent)[0][1] == 0

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "bomb.png").write_bytes(bomb_png())
    assert ImageFiles(tmp_path / "plain", 32)[0] is None

    write_tar_shard(tmp_path / "s.tar", samples(range(4), bad={2}))
    shards = ImageTextWebDataset(str(tmp_path / "s.tar"))
    assert len(list(shards)) == 3 and shards.skipped.counts["bad_image"] == 1


def test_16_bit_greyscale_keeps_its_grey_levels():
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert loaded.mode.startswith("I")
    pixels = to_pm1(loaded)
    expected = torch.from_numpy(np.rint(ramp / 257.0)).float().div(255).mul(2).sub(1)
    assert torch.allclose(pixels[0], expected, atol=1e-6) and torch.equal(pixels[0], pixels[2])
    assert pixels.min() == -1 and 0.45 < (pixels < 0).float().mean() < 0.55  # not all white


def test_a_jsonl_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    folder = write_folder(tmp_path, {"a.png": encode_png(image(0)), "b.png": encode_png(image(1))}, bom=True)
    dataset = ImageTextFolder(folder)
    assert len(dataset) == 2 and dataset.skipped.total == 0


# ----------------------------------------------------------------------------------------------
# tar shards


def test_a_shard_cut_on_a_member_boundary_is_reported(tmp_path):
    path = tmp_path / "cut.tar"
    write_tar_shard(path, samples(range(3)))
    raw = path.read_bytes()
    # Cut right after the second sample's last member: a multiple of 512 bytes, so tarfile sees a clean end.
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    end_of_second = members[3].offset_data + members[3].size
    end_of_second += -end_of_second % 512
    path.write_bytes(raw[:end_of_second])
    counter = SkipCounter("test")
    keys = [key for key, _ in iter_tar_samples(str(path), counter)]
    assert counter.counts["bad_shard"] == 1
    assert keys == ["000000"]  # the sample at the cut may be incomplete: dropped


def test_remote_shards_open_through_gopen(tmp_path):
    write_tar_shard(tmp_path / "s.tar", samples(range(3)))
    url = f"pipe:cat {tmp_path / 's.tar'}"
    dataset = ImageTextWebDataset(url)
    assert dataset.shards == [url]
    assert [caption for _, caption in dataset] == ["caption 0", "caption 1", "caption 2"]


def stream_section(path: Path, **extra) -> DataSection:
    return DataSection(format="webdataset", path=str(path), num_workers=0, shuffle_buffer=0, **extra)


def open_stream(section: DataSection, batch: int = 4):
    return build_stream(
        section,
        image_size=32,
        context_length=16,
        local_batch_size=batch,
        grad_accum=1,
        seed=0,
        info=CPU,
        position=DataPosition(0, 0),
        resumed=False,
    )


def test_a_skip_on_the_last_sample_of_a_shard_reaches_the_trainer_count(tmp_path):
    write_tar_shard(tmp_path / "s.tar", samples(range(9), bad={8}))
    stream = open_stream(stream_section(tmp_path / "s.tar", samples_per_epoch=12))
    stream.next(), stream.next()
    assert stream.skipped() == 0
    stream.next()  # the pass ended after sample 8 (bad): its skip arrives with the restart
    assert stream.skipped() == 1


def test_unreadable_shards_stop_the_stream_instead_of_spinning(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"this is not a tar file" * 40)
    stream = open_stream(stream_section(tmp_path / "bad-{0..1}.tar", samples_per_epoch=1000))
    with pytest.raises(TrainingError, match="not one batch of 4 samples"):
        stream.next()


# ----------------------------------------------------------------------------------------------
# the synthetic world as training data


def test_the_tiny_preset_generates_a_world_only_when_asked(tmp_path):
    missing = tmp_path / "typo"
    section = load_run_config("unitok-tiny-synth", [f"data.path={missing}"]).data
    assert section.synth is None
    with pytest.raises(FileNotFoundError, match=r"data\.synth"):
        prepare_synth_world(section, CPU)
    assert not missing.exists()
    pattern = tmp_path / "shards" / "train-{000000..000001}.tar"
    section = DataSection(format="webdataset", path=str(pattern), synth={"num_images": 8})
    with pytest.raises(ValueError, match="shard pattern"):
        prepare_synth_world(section, CPU)
    assert not (tmp_path / "shards").exists()
    asked = DataSection(
        format="webdataset",
        path=str(tmp_path / "world"),
        num_workers=0,
        synth={"num_images": 8, "size": 32, "classify_per_class": 0},
    )
    prepare_synth_world(asked, CPU)
    stream = open_stream(asked, batch=2)
    assert stream.next()[0].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# evaluation reader


def test_evaluation_counts_unreadable_images_once_and_rejects_a_mistyped_split(tmp_path):
    images = {f"{i}.png": encode_png(image(i)) for i in range(5)}
    images["2.png"] = bomb_png()
    folder = write_folder(tmp_path / "w", images, split="val")
    (folder / "train").mkdir()
    (folder / "train" / "x.png").write_bytes(encode_png(image(9)))
    dataset, kind = build_image_dataset(str(folder), 32, split="val")
    assert kind == "image-text"
    batches = list(make_loader(dataset, batch_size=2, num_workers=0))
    assert sum(b["images"].shape[0] for b in batches if b["images"] is not None) == 4
    assert sum(b["skipped"] for b in batches) == 1
    with pytest.raises(ValueError, match=r"--split 'vall'.*\['val'\]"):
        build_image_dataset(str(folder), 32, split="vall")


# ----------------------------------------------------------------------------------------------
# synthetic-world writer

TINY = SynthConfig(num_images=4, size=32, classify_per_class=0)


def test_overwrite_never_deletes_folders_no_world_manifest_claims(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="no synthetic-world manifest"):
        generate_world(tmp_path, TINY, workers=1, overwrite=True)
    assert (tmp_path / "images" / "holiday.jpg").read_bytes() == b"precious"


def test_a_half_written_world_is_detected_and_regenerated(tmp_path):
    # A run killed while generating: only its staging folder is left.
    (tmp_path / f"{STAGING_PREFIX}12345" / "images").mkdir(parents=True)
    generate_world(tmp_path, TINY, workers=1)
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))
    # A run killed while moving the world into place: the marker names what was moved.
    (tmp_path / "metadata.json").unlink()
    (tmp_path / COMMIT_MARKER).write_text(json.dumps({"entries": list(OUTPUT_ENTRIES)}))
    generate_world(tmp_path, TINY, workers=1)
    assert json.loads((tmp_path / "metadata.json").read_text())["counts"]["images"]["train"] == 4
    assert not (tmp_path / COMMIT_MARKER).exists()
    # A replaced world is swapped whole; what it never listed stays.
    (tmp_path / "notes.txt").write_text("mine")
    generate_world(
        tmp_path, SynthConfig(num_images=3, size=32, classify_per_class=0), workers=1, overwrite=True
    )
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3 and (tmp_path / "notes.txt").exists()


def test_the_synth_command_rejects_bad_worker_counts(tmp_path, capsys):
    from unitok.data.synth import main

    assert main(["--out", str(tmp_path), "--workers", "-1", "--no-progress"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err


def test_unitok_data_help_exits_zero(capsys):
    from unitok.scripts.cli import main

    assert main(["data", "--help"]) == 0
    assert "synth" in capsys.readouterr().out
    assert main(["data"]) == 2
