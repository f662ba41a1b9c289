"""Pieces shared by the MLLM evaluation harnesses (``eval-vqa``, ``eval-geneval``, ``eval-gen-fid``).

- :func:`load_mllm`: a checkpoint folder -> :class:`~unitok.mllm.UniTokMLLM` in eval mode, with a clear error
  for a folder that is not a complete checkpoint.
- :data:`PAPER`: the paper's figures the reports are printed beside.
- :func:`write_json_atomic` and :func:`markdown_table`: the ``results.json`` / markdown report writers.
- :func:`run_cli`: the commands' shared run step (logging set up, input errors reported as exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# UniTok MLLM on Llama-2-7B (arXiv 2502.20321): understanding and generation figures.
PAPER: dict[str, float] = {
    "vqav2": 76.8,
    "gqa": 61.1,
    "textvqa": 51.6,
    "mme": 1448.0,
    "geneval": 0.59,
}


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_mllm_dir(path: str | Path) -> Path:
    """Raise ``FileNotFoundError``/``ValueError`` naming what is missing unless ``path`` is an MLLM checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {path} does not exist (expected an MLLM save_pretrained folder)"
        )
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if not (path / "llm").is_dir() and not (path / "adapter").is_dir():
        missing.append("llm/ (or adapter/)")
    if missing:
        raise ValueError(
            f"{path} is not a complete MLLM checkpoint: missing {', '.join(missing)} "
            "(expected the folder written by UniTokMLLM.save_pretrained)"
        )
    return path


def load_mllm(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> Any:
    """Load an MLLM checkpoint folder onto ``device`` in eval mode (``dtype``: ``float32``/``bfloat16``/``float16``)."""
    from unitok.mllm import UniTokMLLM

    model = UniTokMLLM.from_pretrained(check_mllm_dir(path))
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.to(device).eval()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A number for a report table; ``—`` when missing."""
    return "—" if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_cli(
    run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any] | None:
    """Run an evaluation command's ``run(args)`` with INFO logging set up.

    Returns the report, or None after printing ``error: ...`` to stderr when the inputs are wrong
    (``ValueError`` or ``FileNotFoundError``); the command then exits with status 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
