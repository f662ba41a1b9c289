"""The demo's model-side functions on a tiny random model: uploads, checkpoint lookup, chat, generation, tokenizer."""

from __future__ import annotations

import itertools
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401
from PIL import Image

from unitok.scripts.demo.backend import DemoBackend, find_checkpoint
from unitok.scripts.demo.uploads import UploadError, UploadLimits, open_image


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` with (almost) no pixel data: a bomb's signature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _image(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB") -> Path:
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


@pytest.fixture(scope="module")
def backend() -> DemoBackend:
    mllm = tiny_mllm(tiny_unitok())
    return DemoBackend(mllm.unitok, mllm)


# ---------------------------------------------------------------- uploads


def test_open_image_returns_rgb_of_any_mode(tmp_path):
    image = open_image(_image(tmp_path / "grey.png", mode="L"))
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("just some text, not pixels") and p, "is not an image"),
        (lambda p: p.write_bytes(b"") or p, "is empty"),
        (lambda p: _png_header_only(p, 30_000, 30_000), "decompression bomb"),
        (lambda p: p.write_bytes(_image(p).read_bytes()[:60]) and p, "could not be decoded"),
    ],
    ids=["text", "empty", "bomb", "truncated"],
)
def test_bad_uploads_raise_a_message(tmp_path, make, message):
    path = make(tmp_path / "upload.png")
    with pytest.raises(UploadError, match=message) as info:
        open_image(path)
    assert str(tmp_path) not in str(info.value), "server paths must not reach the page"


def test_upload_limits_bytes_and_pixels(tmp_path):
    path = _image(tmp_path / "big.png", size=(200, 200))
    with pytest.raises(UploadError, match="over the upload limit"):
        open_image(path, UploadLimits(max_bytes=100))
    with pytest.raises(UploadError, match="200x200 pixels"):
        open_image(path, UploadLimits(max_pixels=100 * 100))
    assert open_image(path, UploadLimits(max_pixels=200 * 200)).size == (200, 200)


def test_formats_outside_the_allowlist_are_refused(tmp_path):
    # PIL would hand EPS to Ghostscript; the allowlist never lets it get that far.
    path = tmp_path / "shape.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    with pytest.raises(UploadError, match="is not an image"):
        open_image(path)


# ---------------------------------------------------------------- checkpoint lookup


def test_find_checkpoint_prefers_an_mllm_and_the_final_one(tmp_path):
    unitok = tiny_unitok()
    unitok.save_pretrained(tmp_path / "tokenizer" / "final")
    assert find_checkpoint(tmp_path).path == tmp_path / "tokenizer" / "final"
    assert find_checkpoint(tmp_path).kind == "tokenizer"
    mllm = tiny_mllm(unitok)
    mllm.save_pretrained(tmp_path / "mllm" / "final")
    # The MLLM trainer's layout: a run folder with its own text tokenizer, resumable checkpoints, then final/.
    mllm.save_pretrained(tmp_path / "mllm" / "checkpoint-1" / "mllm")
    mllm.text_tokenizer.save_pretrained(str(tmp_path / "mllm" / "text_tokenizer"))
    (tmp_path / "mllm" / "run_config.json").write_text("{}")
    found = find_checkpoint(tmp_path)
    assert (found.kind, found.path) == ("mllm", tmp_path / "mllm" / "final")
    # The UniTok saved inside the MLLM checkpoint is a part of it, not a candidate.
    assert find_checkpoint(tmp_path / "mllm" / "final").path == tmp_path / "mllm" / "final"
    loaded = DemoBackend.load(tmp_path)
    assert loaded.mllm is not None and loaded.image_size == unitok.config.image_size
    with pytest.raises(FileNotFoundError, match="make quickstart"):
        find_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MLLM or UniTok checkpoint"):
        find_checkpoint(tmp_path / "empty")


def test_tokenizer_only_backend_refuses_chat_and_generation():
    backend = DemoBackend(tiny_unitok())
    with pytest.raises(RuntimeError, match="tokenizer only"):
        backend.generate("a red circle")
    with pytest.raises(RuntimeError, match="tokenizer only"):
        list(backend.chat_stream([{"role": "user", "content": "what colour"}], None))


# ---------------------------------------------------------------- tokenizer


def test_reconstruct_reports_grid_bits_and_psnr(backend, tmp_path):
    image = open_image(_image(tmp_path / "in.png", size=(90, 70)))
    result = backend.reconstruct(image)
    config = backend.tokenizer.config
    side = config.image_size // 16
    assert result.grid == (side, side, config.num_codebooks)
    assert result.bits == pytest.approx(
        side * side * config.num_codebooks * torch.log2(torch.tensor(float(config.codebook_size))).item()
    )
    assert result.original.size == result.reconstruction.size == (config.image_size, config.image_size)
    assert 0 < result.psnr < 100
    assert f"{side} x {side} x {config.num_codebooks}" in result.summary()


# ---------------------------------------------------------------- text to image


def test_generate_reports_progress_per_position(backend):
    calls = []
    images = backend.generate(
        "a red circle",
        2,
        cfg_scale=2.0,
        temperature=1.0,
        top_k=5,
        top_p=0.9,
        seed=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    size = backend.image_size
    assert [im.size for im in images] == [(size, size)] * 2
    positions = (size // 16) ** 2
    assert calls[-1] == (positions, positions)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    again = backend.generate("a red circle", 2, cfg_scale=2.0, top_k=5, top_p=0.9, seed=3)
    assert [list(a.getdata()) for a in images] == [list(b.getdata()) for b in again], "same seed, same images"


@pytest.mark.parametrize(
    "prompt, n, message", [("  ", 1, "non-empty prompt"), ("a circle", 5, "between 1 and 4")]
)
def test_generate_rejects_bad_requests(backend, prompt, n, message):
    with pytest.raises(ValueError, match=message):
        backend.generate(prompt, n)


# ---------------------------------------------------------------- chat


def test_chat_stream_grows_and_matches_the_one_shot_answer(backend, tmp_path):
    image = open_image(_image(tmp_path / "q.png"))
    messages = [{"role": "user", "content": "what colour is the shape ?"}]
    steps = list(backend.chat_stream(messages, image, max_new_tokens=6))
    assert steps, "the stream yielded nothing"
    assert all(b.startswith(a) for a, b in itertools.pairwise(steps)), "each step extends the answer so far"
    assert steps[-1] == backend.mllm.chat(messages, [image], max_new_tokens=6)
    follow_up = [
        *messages,
        {"role": "assistant", "content": steps[-1]},
        {"role": "user", "content": "how many shapes ?"},
    ]
    assert list(backend.chat_stream(follow_up, image, max_new_tokens=4))
    with pytest.raises(ValueError, match="end with a user turn"):
        list(backend.chat_stream(follow_up[:2], image))


def test_one_request_at_a_time(backend):
    """Two generations started together run one after the other, never interleaved position by position."""
    events = []

    def record(name):
        def progress(done, total):
            events.append(name)
            time.sleep(0.01)  # gives the other thread every chance to cut in

        return progress

    workers = [
        threading.Thread(
            target=backend.generate, args=("a red circle",), kwargs={"seed": i, "progress": record(i)}
        )
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    positions = (backend.image_size // 16) ** 2
    assert sorted(events) == [0] * positions + [1] * positions
    assert events in ([0] * positions + [1] * positions, [1] * positions + [0] * positions)
