"""Builders shared by the code-store, mixture and MLLM-trainer tests: tiny image folders, a tiny UniTok checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unitok.tokenizer import TokenizerConfig, UniTok

COLORS = ("red", "green", "blue", "yellow")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread and no launcher rank variables for each test (import it into the module to use it)."""
    torch.set_num_threads(1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def save_tiny_unitok(path: Path, seed: int = 0) -> Path:
    """A random-init ``unitok-tiny`` (64 px, 4x4 grid, K=8, V=256) saved with ``save_pretrained``."""
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        UniTok(TokenizerConfig.preset("unitok-tiny")).save_pretrained(path)
    return path


def write_image(path: Path, index: int) -> None:
    """A 64 px image: a coloured square on a grey background, different per index."""
    rng = np.random.default_rng(index)
    pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
    x, y = rng.integers(0, 40, size=2)
    pixels[y : y + 24, x : x + 24] = rng.integers(0, 256, size=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder(root: Path, n: int) -> Path:
    """The synthetic world's layout: ``images/train/*.png``, ``captions/train.jsonl``, ``llava/train.json``."""
    rows, records = [], []
    for i in range(n):
        image = f"images/train/{i:04d}.png"
        write_image(root / image, i)
        color = COLORS[i % len(COLORS)]
        rows.append({"id": f"{i:04d}", "image": image, "caption": f"a {color} square"})
        records.append(
            {
                "id": f"{i:04d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat colour is the square ?"},
                    {"from": "gpt", "value": color},
                ],
            }
        )
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "llava").mkdir(parents=True, exist_ok=True)
    (root / "llava" / "train.json").write_text(json.dumps(records))
    return root
