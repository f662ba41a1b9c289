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

With ``checkpoint.format: dcp`` the large tensors (weights, EMA, discriminator, optimiser moments) go to
``step-N/dcp/`` through ``torch.distributed.checkpoint``: every process writes its share of them
(``assign_shares``: the tensors are replicated over the processes, so each copies and writes only the
ones assigned to it) and, with ``checkpoint.async_save``, writes them from a background thread while
training goes on (``DcpSaver``). ``trainer.pt`` then holds everything else, with ``{"__dcp__": key}`` in
place of each tensor; ``load_trainer_state`` puts the tensors back, so both formats read the same. Such a checkpoint is assembled in the same ``.tmp-step-N``
folder and renamed into place only once every process has written its files, and older checkpoints are
pruned only after that.

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
import pickle
import random
import re
import shutil
import socket
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"
TRAINER_FILE = "trainer.pt"
DEEPSPEED_FOLDER = "deepspeed"
DCP_FOLDER = "dcp"
# The parts of the trainer state whose tensors a dcp checkpoint writes with torch.distributed.checkpoint.
DCP_PARTS = ("model", "ema", "disc", "gen_engine", "disc_engine")
_DCP_REF = "__dcp__"
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
    """Read ``trainer.pt`` of a checkpoint folder onto the CPU (``weights_only=True``); in the ``dcp``
    format with its tensors put back from ``dcp/`` (read by this process alone).

    Raises ValueError naming the file when it is truncated, empty or not a trainer checkpoint, or the
    ``dcp`` folder when its files are incomplete or unreadable.
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
    if state.get("format") == "dcp":
        folder = Path(checkpoint_dir) / DCP_FOLDER
        try:
            tensors = read_dcp_tensors(folder)
            state = merge_tensors(state, tensors)
        # A missing .metadata, a cut .distcp file, a key the files lack, ...
        except (Exception, _checkpoint_exception()) as err:
            raise ValueError(
                f"the torch.distributed.checkpoint files of {folder} are unreadable, probably incomplete "
                f"or truncated: {_cause(err)}"
            ) from err
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


def _checkpoint_exception() -> type[BaseException]:
    """DCP's error type, which derives from BaseException (so ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _cause(err: BaseException) -> str:
    """One line per failure: DCP wraps the errors of every process in a CheckpointException (with tracebacks)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        return "; ".join(
            f"process {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in failures.items()
        )
    return f"{type(err).__name__}: {err}"


def split_tensors(
    state: dict[str, Any], parts: tuple[str, ...] = DCP_PARTS
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: ``state`` with every tensor under ``parts`` replaced by ``{"__dcp__": key}``,
    and those tensors by key. A key is the tensor's path joined with ``/``, e.g.
    ``model/encoder.blocks.0.norm1.weight`` or ``gen_engine/optimizer/state/3/exp_avg``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, torch.Tensor):
            key = "/".join(path)
            if key in tensors:
                raise ValueError(f"two tensors of the trainer state map to the checkpoint key {key!r}")
            tensors[key] = node
            return {_DCP_REF: key}
        if isinstance(node, dict):
            return {name: walk(value, (*path, str(name))) for name, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(value, (*path, str(i))) for i, value in enumerate(node))
        return node

    skeleton = {name: walk(value, (name,)) if name in parts else value for name, value in state.items()}
    return skeleton, tensors


def merge_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors``: the placeholders of ``skeleton`` replaced by the tensors they name
    (KeyError naming a key that ``tensors`` lacks)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_DCP_REF}:
            key = skeleton[_DCP_REF]
            if key not in tensors:
                raise KeyError(f"the checkpoint files hold no tensor {key!r}")
            return tensors[key]
        return {name: merge_tensors(value, tensors) for name, value in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(merge_tensors(value, tensors) for value in skeleton)
    return skeleton


def assign_shares(tensors: dict[str, torch.Tensor], world_size: int) -> list[list[str]]:
    """Split the keys of ``tensors`` into ``world_size`` shares of about equal bytes (largest first, each to
    the lightest share so far); the same on every process for the same tensors."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    by_size = sorted(tensors, key=lambda key: (-tensors[key].numel() * tensors[key].element_size(), key))
    for key in by_size:
        lightest = loads.index(min(loads))
        shares[lightest].append(key)
        loads[lightest] += tensors[key].numel() * tensors[key].element_size()
    return shares


# What the pickled ``.metadata`` of a torch.distributed.checkpoint folder may refer to: DCP's own
# metadata classes, torch sizes, dtypes and layouts, paths. Anything else is refused, so reading a
# checkpoint never runs code named in its files.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_GLOBALS.get(module, ())
        if module == "torch.distributed.checkpoint.metadata" or name in allowed:
            return super().find_class(module, name)
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


def _dcp_reader(folder: Path) -> Any:
    """A ``FileSystemReader`` of ``folder`` whose ``read_metadata`` unpickles only ``_METADATA_GLOBALS``."""
    from torch.distributed.checkpoint import FileSystemReader

    class CheckedReader(FileSystemReader):
        def read_metadata(self) -> Any:
            with open(Path(self.path) / ".metadata", "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(str(folder))


def read_dcp_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch.distributed.checkpoint folder, by key, on the CPU, read by this process
    alone (no process group needed; the files of all processes are read)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    reader = _dcp_reader(folder)
    entries = reader.read_metadata().state_dict_metadata
    other = [key for key, entry in entries.items() if not isinstance(entry, TensorStorageMetadata)]
    if other:
        raise ValueError(f"{folder} holds entries that are not tensors: {other[:5]}")
    tensors = {
        key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for key, entry in entries.items()
    }
    with warnings.catch_warnings():
        # DCP warns that it assumes one process when no process group is up: that is the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


class DcpSaver:
    """Writes a run's ``dcp`` checkpoints and commits them (see the module docstring).

    Every process calls ``start`` for each checkpoint and ``wait`` before it exits; the main process also
    writes ``trainer.pt`` and, once the files of all processes are written, renames the staging folder
    into place and prunes (in ``poll``, called after every training step, or in ``wait``). A save waits
    for the previous one first, so at most one is in flight.

    Args:
        is_main: whether this is the process that writes ``trainer.pt``, commits and prunes.
        keep_last: checkpoints kept by ``prune``.
        async_save: write from a background thread (``dcp.async_save``); False writes before returning.

    Under a process group the saves coordinate over a gloo group of their own (made here, so every process
    must build its ``DcpSaver`` at the same point): a background save then never interleaves its messages
    with the training step's, and a CPU group is what an asynchronous save needs next to NCCL. The tensors
    saved must be equal on every process (DDP and ZeRO-1/2 replicate weights, EMA and optimiser moments
    of the torch engine): each process stages and writes only its share (``assign_shares``).
    """

    def __init__(self, is_main: bool, keep_last: int, async_save: bool):
        import torch.distributed as dist

        self.is_main = is_main
        self.keep_last = keep_last
        self.async_save = async_save
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.rank = 0 if self.group is None else dist.get_rank(self.group)
        self.world_size = 1 if self.group is None else dist.get_world_size(self.group)
        if self.group is None:
            import warnings

            # DCP warns on every save without a process group that it assumes one process (it runs in the
            # writer thread, out of reach of ``catch_warnings``); one process is what is meant here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        self.pending: Future | None = None
        self._paths: tuple[Path, Path] | None = None

    def start(self, state: dict[str, Any], tmp: Path, final: Path) -> None:
        """Write ``state`` (the trainer state of ``trainer.pt``) as the checkpoint ``final``, assembled in the
        existing, empty folder ``tmp``; returns once the tensors are copied (asynchronous) or written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        self.wait()
        skeleton, tensors = split_tensors(state)
        skeleton["format"] = "dcp"
        tensors = {key: tensors[key] for key in assign_shares(tensors, self.world_size)[self.rank]}
        if self.is_main:
            atomic_save(skeleton, tmp / TRAINER_FILE)
        options = {
            "storage_writer": FileSystemWriter(str(tmp / DCP_FOLDER)),
            "process_group": self.group,
            "no_dist": self.group is None,
        }
        self._paths = (tmp, final)
        if self.async_save:
            response = dcp.async_save(tensors, **options)
            self.pending = getattr(response, "upload_completion", response)
            return
        try:
            dcp.save(tensors, **options)
        except (Exception, _checkpoint_exception()) as err:
            raise self._failed(err) from err
        self._done()

    def poll(self) -> Path | None:
        """Commit the save in flight if its files are written; returns the checkpoint committed, if any."""
        if self.pending is None or not self.pending.done():
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is written, then commit it; returns its checkpoint.

        Raises TrainingError when writing failed (its staging folder is left for the next save to remove).
        """
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        try:
            pending.result()
        except (Exception, _checkpoint_exception()) as err:
            raise self._failed(err) from err
        return self._done()

    def _failed(self, err: BaseException) -> TrainingError:
        tmp, final = self._paths
        self._paths = None
        return TrainingError(f"writing checkpoint {final} (staged in {tmp}) failed: {_cause(err)}")

    def _done(self) -> Path:
        tmp, final = self._paths
        self._paths = None
        if self.is_main:
            commit(tmp, final)
            prune(final.parent, self.keep_last, current=final)
            log.info("saved checkpoint %s", final)
        return final
