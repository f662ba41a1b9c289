"""unitok.data: datasets, formats, transforms and the built-in synthetic world.

Public names are imported on first use, so ``import unitok.data`` stays light (no torch until a
dataset or transform is touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "SynthConfig": "synth",
    "generate_world": "synth",
    "Scene": "world",
    "SceneObject": "world",
    "SHAPE_NAMES": "world",
    "COLOR_NAMES": "world",
    "COLORS": "world",
    "sample_scene": "world",
    "relations": "world",
    "Detection": "detect",
    "detect_objects": "detect",
    "GENEVAL_TAGS": "geneval",
    "make_geneval_prompts": "geneval",
    "scene_from_metadata": "geneval",
    "render_from_metadata": "geneval",
    "ImageTextFolder": "datasets",
    "ImageTextWebDataset": "datasets",
    "ClassFolder": "datasets",
    "SkipCounter": "datasets",
    "read_conversations": "datasets",
    "read_geneval_prompts": "datasets",
    "train_transform": "transforms",
    "eval_transform": "transforms",
}

__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "GENEVAL_TAGS",
    "SHAPE_NAMES",
    "ClassFolder",
    "Detection",
    "ImageTextFolder",
    "ImageTextWebDataset",
    "Scene",
    "SceneObject",
    "SkipCounter",
    "SynthConfig",
    "detect_objects",
    "eval_transform",
    "generate_world",
    "make_geneval_prompts",
    "read_conversations",
    "read_geneval_prompts",
    "relations",
    "render_from_metadata",
    "sample_scene",
    "scene_from_metadata",
    "train_transform",
]

if TYPE_CHECKING:
    from .datasets import (
        ClassFolder,
        ImageTextFolder,
        ImageTextWebDataset,
        SkipCounter,
        read_conversations,
        read_geneval_prompts,
    )
    from .detect import Detection, detect_objects
    from .geneval import GENEVAL_TAGS, make_geneval_prompts, render_from_metadata, scene_from_metadata
    from .synth import SynthConfig, generate_world
    from .transforms import eval_transform, train_transform
    from .world import COLOR_NAMES, COLORS, SHAPE_NAMES, Scene, SceneObject, relations, sample_scene


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unitok.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
