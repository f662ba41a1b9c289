"""Run configuration of the MLLM trainer: a YAML/JSON file (or a named preset) plus ``--set key=value``.

Tree::

    output_dir: runs/mllm            # checkpoints (checkpoint-N/), TensorBoard (runs/), final/ export
    stage: full                      # alignment | full | lora
    resume: auto                     # auto | null | a checkpoint-N folder
    model:
      preset: tiny                   # MLLM_PRESETS name
      config: {...}                  # MLLMConfig field overrides (loss_weighting, z_loss_weight, lora_r, ...)
      init_from: null                # an MLLM checkpoint to start from (e.g. the alignment stage's final/)
      build_text_tokenizer: false    # train a word-level tokenizer on the data (tiny models only)
    data:
      stores: [...]                  # code stores written by `unitok extract-codes`
      texts: [...]                   # JSON lines {"text": ...} for text-only samples
      mixture: {understanding: 1.0, generation: 1.0, text: 0.0}
      samples_per_epoch: null        # default: all usable samples
      group_by_length: true
      group_batches: 16
      seed: 0
    training: {...}                  # transformers.TrainingArguments fields, passed through
                                     # (deepspeed: a shipped name zero2 | zero3 | zero3_offload, or a path)

Presets are the files ``unitok/scripts/configs/mllm/*.yaml``. Unknown keys and wrong types raise
``ValueError`` naming the key; ``training`` is validated by ``TrainingArguments`` itself.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from unitok.data.mllm_data import KINDS
from unitok.tokenizer.training.config import apply_overrides

CONFIG_PACKAGE = "unitok.scripts"
PRESET_FOLDER = ("configs", "mllm")
DEEPSPEED_FOLDER = ("configs", "deepspeed")
SUFFIXES = (".yaml", ".yml", ".json")
STAGES = ("alignment", "full", "lora")


@dataclass
class ModelSection:
    """Which MLLM to train: a size preset, config overrides, and optionally weights to start from."""

    preset: str = "tiny"
    config: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    build_text_tokenizer: bool = False


@dataclass
class DataSection:
    """Where the samples come from and how they are mixed and batched (see ``unitok.data.mllm_data``)."""

    stores: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    mixture: dict[str, float] = field(default_factory=lambda: {"understanding": 1.0, "generation": 1.0})
    samples_per_epoch: int | None = None
    group_by_length: bool = True
    group_batches: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mixture) - set(KINDS))
        if unknown:
            raise ValueError(f"data.mixture has unknown kinds {unknown}; expected among {list(KINDS)}")
        if not self.stores and not self.texts:
            raise ValueError("data.stores and data.texts are both empty; give at least one source")
        if self.group_batches < 1:
            raise ValueError(f"data.group_batches must be >= 1, got {self.group_batches}")


@dataclass
class RunConfig:
    """One MLLM training run (see the module docstring)."""

    output_dir: str = "runs/mllm"
    stage: Literal["alignment", "full", "lora"] = "full"
    resume: str | None = "auto"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=lambda: DataSection(stores=["runs/codes"]))
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        if "output_dir" in self.training:
            raise ValueError("set output_dir at the top level of the run config, not under training")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate from a nested dict; unknown keys and wrong types raise ValueError."""
        return _build(cls, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    label = where or "the run config"
    if not isinstance(data, dict):
        raise ValueError(f"{label} must be a mapping of keys to values, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) {[f'{where}.{k}' if where else k for k in unknown]} in {label}; known: {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()})


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(hint)
    if expected is None:
        return value
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise ValueError(f"{where} must be of type {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def _folder(parts: tuple[str, ...]) -> Any:
    folder = resources.files(CONFIG_PACKAGE)
    for part in parts:
        folder = folder / part
    return folder


def preset_names() -> list[str]:
    """Names of the shipped run-config presets."""
    return sorted(
        p.name.rsplit(".", 1)[0] for p in _folder(PRESET_FOLDER).iterdir() if p.name.endswith(SUFFIXES)
    )


def _read(name_or_path: str, parts: tuple[str, ...], what: str, names: list[str]) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(), path.suffix
    for suffix in SUFFIXES:
        candidate = _folder(parts) / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate.read_text(), suffix
    raise ValueError(f"no {what} file {name_or_path!r} and no shipped one of that name; shipped: {names}")


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset (by name) or a YAML/JSON file, with ``key.sub=value`` overrides applied, validated."""
    text, suffix = _read(name_or_path, PRESET_FOLDER, "run config", preset_names())
    tree = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    if not isinstance(tree, dict):
        raise ValueError(f"run config {name_or_path!r} must hold a mapping at the top level")
    return RunConfig.from_dict(apply_overrides(tree, overrides or []))


def deepspeed_names() -> list[str]:
    """Names of the shipped DeepSpeed configs (``zero2``, ``zero3``, ``zero3_offload``)."""
    return sorted(
        p.name[: -len(".json")] for p in _folder(DEEPSPEED_FOLDER).iterdir() if p.name.endswith(".json")
    )


def load_deepspeed_config(name_or_path: str | dict[str, Any]) -> dict[str, Any]:
    """A shipped DeepSpeed config by name, a JSON file, or a dict (returned as is)."""
    if isinstance(name_or_path, dict):
        return name_or_path
    text, _ = _read(name_or_path, DEEPSPEED_FOLDER, "DeepSpeed config", deepspeed_names())
    return json.loads(text)
