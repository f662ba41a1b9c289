"""Trainer checkpoints: atomic writes, keep-last-N, finding the one to resume, and RNG state as tensors.

Layout under ``<output_dir>/checkpoints``::

    step-00001000/
        trainer.pt      # step, data position, config, model/EMA/discriminator weights, optimiser,
                        # scheduler and grad-scaler states, per-rank RNG states (tensors and plain containers)
        deepspeed/      # only with engine: deepspeed (its own per-rank files: ZeRO optimiser partitions)

A checkpoint is written into ``.tmp-step-XXXXXXXX`` and renamed into place only when complete, so a
run killed while saving never leaves a half-written ``step-*`` folder; ``trainer.pt`` itself is written
to a temporary file and ``os.replace``-d. Everything in ``trainer.pt`` loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"
TRAINER_FILE = "trainer.pt"
DEEPSPEED_FOLDER = "deepspeed"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / CHECKPOINT_FOLDER


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimiser steps."""
    return f"step-{step:08d}"


def temporary_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before it is renamed into place."""
    return root / f".tmp-{step_dir_name(step)}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (folders ``step-*`` holding ``trainer.pt``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from.

    ``None`` -> no resume; ``"auto"`` -> the newest complete checkpoint of this run (None when there is
    none yet, so a fresh run and a restarted one share the command line); otherwise a checkpoint
    folder or its ``trainer.pt`` (ValueError when missing).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if path.is_file() and path.name == TRAINER_FILE:
        path = path.parent
    if not (path / TRAINER_FILE).is_file():
        raise ValueError(
            f"--resume {resume!r}: expected 'auto', a checkpoint folder holding {TRAINER_FILE}, or that file"
        )
    return path


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fresh_dir(path: Path) -> Path:
    """Create ``path`` empty (removing leftovers of an interrupted save)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def commit(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a fully written checkpoint folder into place (replacing an older one of the same step)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and stale temporary folders; returns the deleted."""
    root = Path(root)
    deleted = list_checkpoints(root)[:-keep_last]
    deleted += [p for p in root.glob(".tmp-step-*") if p.is_dir()]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def load_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read ``trainer.pt`` of a checkpoint folder onto the CPU (``weights_only=True``)."""
    return torch.load(Path(checkpoint_dir) / TRAINER_FILE, map_location="cpu", weights_only=True)


def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, all as tensors."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_extra": torch.tensor([version, gauss_next is not None], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next or 0.0], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_extra"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    version, has_next = state["python_extra"].tolist()
    gauss_next = float(state["python_gauss"][0]) if has_next else None
    random.setstate((version, tuple(state["python_words"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"].unbind(0))
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint holds %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
