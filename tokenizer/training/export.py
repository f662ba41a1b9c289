"""Trainer checkpoints as tokenizers: ``unitok export CHECKPOINT [--out DIR]`` and the helpers behind it.

A trainer checkpoint (``<run>/checkpoints/step-N/trainer.pt``) holds the run config and the weights
(and the EMA weights when the run keeps them); in the ``dcp`` format the tensors lie in ``step-N/dcp/``
and ``checkpointing.load_trainer_state`` puts them back, so everything here reads both formats. ``load_checkpoint_model`` builds the ``UniTok`` it
describes, so intermediate checkpoints can be evaluated (``unitok eval-tokenizer --model <run>/checkpoints/step-N``)
and ``export_checkpoint`` writes the ``save_pretrained`` folder that ``UniTok.from_pretrained`` loads,
the same way the trainer writes ``<run>/final``: assembled beside the target, renamed into place,
with the usual file permissions, and never with non-finite weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from unitok.tokenizer import UniTok
from unitok.tokenizer.checkpoint import save_directory

from . import checkpointing
from .config import RunConfig

log = logging.getLogger(__name__)

EXPORTS_FOLDER = "exports"
_TMP_INFIX = ".tmp-"


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def export_weights(target: str | Path, model_config: Any, weights: dict[str, torch.Tensor]) -> Path:
    """Write a ``save_pretrained`` folder atomically: assembled in ``.<name>.tmp-<pid>`` beside ``target``,
    files given the usual permissions (``0o666`` minus the umask), then renamed into place. Refuses
    non-finite weights (``TrainingError``)."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise checkpointing.TrainingError(
            f"refusing to export {len(bad)} non-finite weight tensor(s) to {target} ({', '.join(bad[:5])}, ...)"
        )
    target = Path(target)
    staging = target.with_name(f".{target.name}{_TMP_INFIX}{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    save_directory(staging, model_config, weights)
    umask = os.umask(0)
    os.umask(umask)
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)
    staging.chmod(0o777 & ~umask)
    previous = target.with_name(f".{target.name}{_TMP_INFIX}old-{os.getpid()}")
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    if previous.exists():
        shutil.rmtree(previous)
    return target


def remove_stale_exports(target: str | Path) -> list[Path]:
    """Delete the staging folders of ``target`` that a killed export left (``.<name>.tmp-*``)."""
    target = Path(target)
    stale = list(target.parent.glob(f".{target.name}{_TMP_INFIX}*"))
    for path in stale:
        log.warning("removing %s, left by an interrupted export", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder behind ``path``: a ``step-N`` folder, its ``trainer.pt``, or a run folder
    (its newest readable checkpoint). ValueError when there is none."""
    path = Path(path)
    if path.is_file() and path.name == checkpointing.TRAINER_FILE:
        return path.parent
    if (path / checkpointing.TRAINER_FILE).is_file():
        return path
    found, _, _ = checkpointing.load_resumable("auto", path)
    if found is None:
        raise ValueError(
            f"{path} is neither a trainer checkpoint (a folder holding {checkpointing.TRAINER_FILE}) nor a run "
            f"folder with readable checkpoints under {checkpointing.CHECKPOINT_FOLDER}/"
        )
    return found


def is_trainer_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a trainer checkpoint, its ``trainer.pt``, or a run folder holding checkpoints."""
    path = Path(path)
    return (
        (path.is_file() and path.name == checkpointing.TRAINER_FILE)
        or (path / checkpointing.TRAINER_FILE).is_file()
        or bool(checkpointing.list_checkpoints(checkpointing.checkpoint_root(path)))
    )


def checkpoint_weights(path: str | Path, ema: bool | None = None) -> tuple[Any, dict[str, torch.Tensor], str]:
    """``(TokenizerConfig, weights, "ema" | "model")`` of a trainer checkpoint.

    ``ema``: True needs EMA weights, False takes the raw ones, None takes the EMA weights when the run
    kept them and exports them (``checkpoint.export_ema``), as its ``final`` export would.
    """
    folder = resolve_checkpoint(path)
    state = checkpointing.load_trainer_state(folder)
    config = RunConfig.from_dict(state["config"])
    use_ema = (state.get("ema") is not None and config.checkpoint.export_ema) if ema is None else ema
    if use_ema and state.get("ema") is None:
        raise ValueError(f"checkpoint {folder} holds no EMA weights (the run had train.ema_decay unset)")
    return (
        config.model.tokenizer_config(),
        state["ema"] if use_ema else state["model"],
        "ema" if use_ema else "model",
    )


def load_checkpoint_model(path: str | Path, ema: bool | None = None) -> UniTok:
    """The ``UniTok`` of a trainer checkpoint (see ``checkpoint_weights``), loaded strictly, in eval mode."""
    folder = resolve_checkpoint(path)
    model_config, weights, kind = checkpoint_weights(folder, ema)
    model = UniTok(model_config)
    model.load_state_dict(weights)
    log.info("loaded the %s weights of %s", kind, folder)
    return model.eval()


def export_checkpoint(path: str | Path, out: str | Path | None = None, ema: bool | None = None) -> Path:
    """Export a trainer checkpoint as a ``save_pretrained`` folder; returns it.

    ``out`` defaults to ``<run>/exports/step-N``.
    """
    folder = resolve_checkpoint(path)
    target = Path(out) if out is not None else folder.parent.parent / EXPORTS_FOLDER / folder.name
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(target)
    model_config, weights, kind = checkpoint_weights(folder, ema)
    export_weights(target, model_config, weights)
    log.info("exported the %s weights of %s to %s", kind, folder, target)
    return target


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``unitok export``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a trainer checkpoint (checkpoints/step-N, or a run folder: its newest) as a "
        "tokenizer folder that UniTok.from_pretrained and unitok eval-tokenizer load.",
    )
    parser.add_argument("checkpoint", help="a checkpoints/step-N folder, its trainer.pt, or a run folder")
    parser.add_argument("--out", help="target folder (default: <run>/exports/step-N)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--ema", dest="ema", action="store_true", default=None, help="export the EMA weights"
    )
    weights.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok export``; prints the folder written."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(export_checkpoint(args.checkpoint, args.out, args.ema))
    return 0
