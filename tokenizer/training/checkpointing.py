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

A run owns its folder's checkpoint lineage: ``check_lineage`` refuses to start at step ``s`` over a
folder holding checkpoints newer than ``s`` (they belong to another continuation) unless told to
overwrite them or to set them aside (``branch``), and ``prune`` only deletes checkpoints older than
the one just written. ``RunLock`` keeps two processes from training into one folder at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"
TRAINER_FILE = "trainer.pt"
DEEPSPEED_FOLDER = "deepspeed"
LOCK_FILE = ".lock"
SUPERSEDED_PREFIX = "superseded-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingError(RuntimeError):
    """A run that cannot start or go on as configured (held lock, foreign checkpoints, non-finite
    training, changed config on resume, unreadable data); the message says what to do."""


def checkpoint_step(path: Path) -> int:
    """The step number of a ``step-N`` checkpoint folder."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder named step-N")
    return int(match.group(1))


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
    folder or its ``trainer.pt`` (ValueError when missing). ``load_resumable`` also reads it and falls
    back past unreadable ones.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    return _explicit_checkpoint(resume)


def _explicit_checkpoint(resume: str) -> Path:
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


def prune(root: str | Path, keep_last: int, current: Path | None = None) -> list[Path]:
    """Delete old checkpoints and stale temporary folders; returns the deleted.

    Keeps the newest ``keep_last`` checkpoints up to and including ``current`` (the one just written),
    and never deletes ``current`` or anything newer than it: step numbers order checkpoints only
    within one lineage, so a newer one is never assumed to be garbage.
    """
    root = Path(root)
    found = list_checkpoints(root)
    if current is not None:
        limit = checkpoint_step(current)
        found = [p for p in found if checkpoint_step(p) <= limit]
    deleted = found[:-keep_last]
    deleted += [p for p in root.glob(".tmp-step-*") if p.is_dir()]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def load_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read ``trainer.pt`` of a checkpoint folder onto the CPU (``weights_only=True``).

    Raises ValueError naming the file when it is truncated, empty or not a trainer checkpoint.
    """
    path = Path(checkpoint_dir) / TRAINER_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch reports a cut zip as RuntimeError, an empty file as EOFError, ...
        size = path.stat().st_size if path.is_file() else 0
        raise ValueError(
            f"checkpoint file {path} ({size} bytes) is unreadable, probably truncated: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path} is not a trainer checkpoint (expected a dict with a 'step')")
    return state


def load_resumable(
    resume: str | None, output_dir: str | Path
) -> tuple[Path | None, dict[str, Any] | None, list[Path]]:
    """The checkpoint to resume from, its state, and the unreadable checkpoints passed over.

    ``resume`` as in ``resolve_resume``. With ``auto``, an unreadable newest checkpoint (a truncated
    ``trainer.pt``) is passed over with a warning naming it, and the newest readable one is used
    (``(None, None, bad)`` when none is). An explicit path must be readable (ValueError).
    """
    if resume is None:
        return None, None, []
    if resume != "auto":
        path = _explicit_checkpoint(resume)
        return path, load_trainer_state(path), []
    bad = []
    for path in reversed(list_checkpoints(checkpoint_root(output_dir))):
        try:
            return path, load_trainer_state(path), bad
        except ValueError as err:
            log.warning("cannot resume from %s, trying the checkpoint before it: %s", path, err)
            bad.append(path)
    return None, None, bad


def set_aside(paths: list[Path]) -> list[Path]:
    """Rename unreadable checkpoints ``step-N`` to ``corrupt-step-N`` (kept for inspection, never resumed)."""
    moved = []
    for path in paths:
        target = path.with_name(f"corrupt-{path.name}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        log.warning("set the unreadable checkpoint %s aside as %s", path, target)
        moved.append(target)
    return moved


def check_lineage(
    output_dir: str | Path, start_step: int, newer: str, act: bool = True, ignore: list[Path] = ()
) -> list[Path]:
    """Make sure no checkpoint of another continuation sits above ``start_step`` in ``output_dir``.

    Args:
        start_step: the step this run starts from (0 fresh, else the resumed checkpoint's step).
        newer: ``refuse`` (TrainingError listing them), ``overwrite`` (delete them and ``final/``) or
            ``branch`` (move them to ``checkpoints/superseded-<time>/``, where nothing resumes or prunes
            them).
        act: delete or move (the main process); False only checks (the other processes).
        ignore: checkpoints to leave out (the unreadable ones ``load_resumable`` passed over).

    Returns:
        The newer checkpoints found (deleted or moved unless refused).
    """
    root = checkpoint_root(output_dir)
    found = [p for p in list_checkpoints(root) if checkpoint_step(p) > start_step and p not in ignore]
    if not found:
        return []
    names = ", ".join(p.name for p in found)
    if newer == "refuse":
        raise TrainingError(
            f"{root} holds checkpoints newer than step {start_step} that this run did not write ({names}); "
            "continue them with --resume auto, or pass --on-newer branch (move them aside) or "
            "--on-newer overwrite (delete them)"
        )
    if not act:
        return found
    if newer == "overwrite":
        for path in found:
            shutil.rmtree(path)
        final = Path(output_dir) / "final"
        if final.exists():
            shutil.rmtree(final)
        log.warning("deleted checkpoints newer than step %d: %s", start_step, names)
    elif newer == "branch":
        aside = root / f"{SUPERSEDED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir(parents=True)
        for path in found:
            os.replace(path, aside / path.name)
        log.warning("moved checkpoints newer than step %d to %s: %s", start_step, aside, names)
    else:
        raise ValueError(f"expected newer in ('refuse', 'overwrite', 'branch'), got {newer!r}")
    return found


class RunLock:
    """An exclusive lock on a run folder (``<output_dir>/.lock``, ``fcntl.flock``), held while training.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale file never blocks a
    restart; the file records the holder's pid and host for the error message of a second run.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.handle: Any = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the run: the lock lives with it)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "{}"
            handle.close()
            try:
                who = json.loads(holder)
            except json.JSONDecodeError:
                who = {}
            raise TrainingError(
                f"{self.path.parent} is in use by another training run (process {who.get('pid', '?')} on "
                f"{who.get('host', '?')}, lock file {self.path}); wait for it or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


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
