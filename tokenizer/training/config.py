"""Run configuration of the tokenizer trainer: typed sections, YAML/JSON loading, presets, overrides.

A run config is a tree of small dataclasses (``RunConfig`` at the root). Files are YAML or JSON with
the same tree; every key is checked against the dataclass fields (an unknown key is an error that names
it) and every value against the field's type. ``--set section.key=value`` overrides are applied to
the raw tree before validation, so they obey the same rules. Named presets are the files under
``unitok/scripts/configs/`` (``unitok-large-datacomp``, ``unitok-tiny-synth``).

Lengths and schedule points are fractions of the run (``optim.warmup``, ``disc.start``, ...) so one
recipe serves any run length; the run length itself is ``train.total_steps`` or
``train.total_samples`` (divided by the global batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from unitok.tokenizer.config import TokenizerConfig

CONFIG_PACKAGE = "unitok.scripts"
CONFIG_FOLDER = "configs"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelSection:
    """The tokenizer to train: a named size (``TokenizerConfig.PRESETS``) plus field overrides.

    ``init_from`` optionally starts from existing weights (a ``save_pretrained`` directory or the
    released ``.pth``) instead of random initialisation; the architecture must match.
    ``clip_weights`` initialises encoder and text tower from an open_clip ViTamin checkpoint (UniTok-dagger).
    The entropy loss weight is the model's ``entropy_weight`` (``overrides: {entropy_weight: ...}``).
    """

    preset: str = "unitok-large"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    clip_weights: str | None = None

    def tokenizer_config(self) -> TokenizerConfig:
        """The ``TokenizerConfig`` this section describes (raises ValueError for bad overrides)."""
        return TokenizerConfig.preset(self.preset, **self.overrides)


@dataclass
class DataSection:
    """Where the image-text pairs come from and how they are prepared.

    ``format: folder`` reads ``<path>/captions/<split>.jsonl`` (an image file + caption per line);
    ``format: webdataset`` reads tar shards in DataComp layout (``path`` is a directory of ``.tar``
    files, a glob, or a brace pattern like ``shards/{00000..00099}.tar``). Images get a random resized
    crop of ``crop_scale`` of the area (``interpolation``) to the model's ``image_size``. ``jpeg_draft``
    decodes JPEGs at the smallest of the decoder's scales (1/2, 1/4, 1/8) that keeps both sides at least
    twice ``image_size`` (several times faster for large photos; the pixels differ slightly from a full
    decode).

    ``negative_words`` gives every caption a hard negative for ``loss.clip_negatives``: the caption with one
    word swapped for another of its group (``unitok.data.negatives``: ``synth-shape``, ``synth-color``,
    ``synth``, or a text file with one group of interchangeable words per line); vocabularies joined by ``+``
    give one negative each.

    ``samples_per_epoch`` fixes the epoch length of the web dataset (default: one pass counted from the
    shards); the folder reader's epoch is its length. ``resume: exact`` fast-forwards the data stream
    to the checkpoint's position (exact, but a web dataset must re-read the consumed samples);
    ``reseed`` starts a freshly shuffled stream instead (what a multi-day run wants).
    """

    format: Literal["folder", "webdataset"] = "webdataset"
    path: str = ""
    split: str = "train"
    num_workers: int = 8
    crop_scale: tuple[float, float] = (0.9, 1.0)
    interpolation: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"
    jpeg_draft: bool = False
    shuffle_buffer: int = 5000
    samples_per_epoch: int | None = None
    resume: Literal["exact", "reseed"] = "exact"
    synth: dict[str, Any] | None = None
    negative_words: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path must name the image folder or the shards")
        if self.negative_words:
            from unitok.data.negatives import load_word_swaps

            try:
                load_word_swaps(self.negative_words)
            except ValueError as err:
                raise ValueError(f"data.negative_words: {err}") from None
        if self.synth is not None:
            from unitok.data.synth import SynthConfig

            known = {f.name for f in dataclasses.fields(SynthConfig)}
            unknown = sorted(set(self.synth) - known)
            _check(not unknown, f"unknown key(s) {unknown} in data.synth; known keys: {sorted(known)}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        low, high = self.crop_scale
        _check(
            0 < low <= high <= 1, f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}"
        )
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        _check(
            self.samples_per_epoch is None or self.samples_per_epoch > 0,
            f"data.samples_per_epoch must be > 0 or null, got {self.samples_per_epoch}",
        )


@dataclass
class TrainSection:
    """Batch, run length, seed, precision and EMA.

    ``local_batch_size`` is the micro-batch of one process; the global batch is
    ``local_batch_size * world_size * grad_accum``. ``recon_batch_size`` (the reference's
    ``vae_local_bs``) limits the reconstruction losses to the first images of each micro-batch.
    ``stop_at_step`` ends this invocation early (schedules still span the whole run); ``--resume``
    continues it. ``cpu_threads`` sets torch's intra-op threads when training on the CPU; null picks
    ``cores / processes - data workers`` (at least 1) unless ``OMP_NUM_THREADS`` is set: OpenMP threads
    that must share cores with the DataLoader workers spin and slow a step down several times.
    A step whose loss or gradient is not finite is skipped (no weight update); ``max_nonfinite_steps``
    such steps in a row stop the run with an error. ``fused_adamw`` (null: on CUDA) uses AdamW's fused
    kernel, which skips such a step on the device: the trainer then reads the count of skipped steps only
    when it logs or checkpoints, so a run may stop up to ``logging.log_every`` steps after the limit (the
    skipped steps change no weight). ``compile`` compiles the encoder's and decoder's transformer blocks
    with ``torch.compile`` (the state dict keeps its keys).
    """

    local_batch_size: int = 64
    recon_batch_size: int | None = None
    grad_accum: int = 1
    total_steps: int | None = None
    total_samples: int | None = None
    stop_at_step: int | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    tf32: bool = True
    cpu_threads: int | None = None
    ema_decay: float | None = None
    max_nonfinite_steps: int = 5
    fused_adamw: bool | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        _check(
            self.max_nonfinite_steps > 0,
            f"train.max_nonfinite_steps must be > 0, got {self.max_nonfinite_steps}",
        )
        _check(self.local_batch_size > 0, f"train.local_batch_size must be > 0, got {self.local_batch_size}")
        _check(
            self.recon_batch_size is None or 0 < self.recon_batch_size <= self.local_batch_size,
            f"train.recon_batch_size must be in [1, local_batch_size={self.local_batch_size}] or null, "
            f"got {self.recon_batch_size}",
        )
        _check(self.grad_accum > 0, f"train.grad_accum must be > 0, got {self.grad_accum}")
        _check(
            (self.total_steps is None) != (self.total_samples is None),
            "set exactly one of train.total_steps and train.total_samples, got "
            f"total_steps={self.total_steps}, total_samples={self.total_samples}",
        )
        _check(
            self.total_steps is None or self.total_steps > 0,
            f"train.total_steps must be > 0, got {self.total_steps}",
        )
        _check(
            self.total_samples is None or self.total_samples > 0,
            f"train.total_samples must be > 0, got {self.total_samples}",
        )
        _check(
            self.stop_at_step is None or self.stop_at_step > 0,
            f"train.stop_at_step must be > 0 or null, got {self.stop_at_step}",
        )
        _check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}",
        )

    def global_batch_size(self, world_size: int) -> int:
        """Samples per optimiser step over all processes."""
        return self.local_batch_size * world_size * self.grad_accum

    def num_steps(self, world_size: int) -> int:
        """Optimiser steps of the whole run."""
        if self.total_steps is not None:
            return self.total_steps
        steps = self.total_samples // self.global_batch_size(world_size)
        if steps < 1:
            raise ValueError(
                f"train.total_samples={self.total_samples} is smaller than one global batch "
                f"({self.global_batch_size(world_size)})"
            )
        return steps


@dataclass
class OptimSection:
    """AdamW of the tokenizer and its learning-rate schedule (per optimiser step).

    Parameters with fewer than 2 dims (biases, norms, ``logit_scale``) get no weight decay. The
    schedule warms up linearly from ``start_ratio * lr`` over the first ``warmup`` fraction of the run,
    then follows a cosine (or stays constant) down to ``end_ratio * lr``.
    """

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    eps: float = 1e-6
    grad_clip: float = 10.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = 0.01
    start_ratio: float = 0.0
    end_ratio: float = 0.1

    def __post_init__(self) -> None:
        _check_optim(self, "optim")


@dataclass
class LossSection:
    """Weights of the generator loss terms (reference names in brackets).

    total = l1 * L1 + l2 * MSE + lpips * LPIPS + vq * VQ + entropy + clip * CLIP (+ the GAN term of
    ``disc``); the quantizer's entropy term comes already weighted by the model's ``entropy_weight``.
    LPIPS runs only on images at least ``lpips_min_size`` pixels wide. ``lpips_weights`` is a weights
    file (the reference's ``lpips_with_vgg.pth`` or torchvision VGG16 weights), ``torchvision`` (ImageNet
    VGG16 through torchvision's cache, downloading once) or ``random`` (an untrained trunk: tests only).
    ``lpips_precision: bf16`` runs the VGG trunk under bf16 autocast instead of float32 (the release), and
    ``lpips_channels_last`` keeps it NHWC (see ``unitok.tokenizer.losses.LPIPS``).
    ``clip: 0`` freezes the text tower and the CLIP head and skips them. ``clip_negatives`` weighs a
    hard-negative term (NegCLIP): each image must score its caption above the caption with one word swapped
    (``data.negative_words``; one such negative per vocabulary), a cross-entropy over the caption and its
    negatives at the CLIP temperature, averaged over the images whose caption had a word to swap.
    """

    l1: float = 0.2
    l2: float = 1.0
    lpips: float = 1.0
    lpips_min_size: int = 48
    lpips_weights: str | None = None
    lpips_precision: Literal["fp32", "bf16"] = "fp32"
    lpips_channels_last: bool = False
    vq: float = 1.0
    clip: float = 1.0
    clip_negatives: float = 0.0

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "lpips", "vq", "clip", "clip_negatives"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        _check(
            self.lpips == 0 or self.lpips_weights is not None,
            "loss.lpips > 0 needs loss.lpips_weights: a weights file, 'torchvision' or 'random' (or set loss.lpips: 0)",
        )


@dataclass
class DiscSection:
    """The DINOv2 discriminator: when it starts, how strongly it counts, and its own AdamW.

    It starts at the ``start`` fraction of the run, its GAN term ramps in over ``warmup`` (fraction of
    the run) and the blur of its inputs fades out over twice that. The generator's GAN term is
    ``warm * weight * adaptive * G-loss``; ``adaptive`` rescales it by the gradient-norm ratio at the
    decoder's last layer, clamped to ``adaptive_clamp``. ``bcr`` weighs the consistency regulariser.
    ``preset`` names a ``DinoDiscConfig`` (``dinov2-small`` = the release, ``tiny`` for tests) and
    ``options`` overrides its fields (its ``image_size`` follows the model's unless given).
    ``dino_weights`` is the DINOv2 ViT-S/14 file, ``hub`` (timm download) or null (a random frozen trunk,
    with a warning). ``enabled: false`` or ``weight: 0`` trains without a discriminator.
    """

    enabled: bool = True
    preset: str = "dinov2-small"
    weight: float = 0.4
    adaptive: bool = True
    adaptive_clamp: tuple[float, float] = (0.015, 1e4)
    start: float = 0.375
    warmup: float = 0.03
    blur: bool = True
    bcr: float = 4.0
    bcr_cutout: float = 0.2
    aug_prob: float = 1.0
    lr: float = 2e-5
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.2
    eps: float = 1e-6
    grad_clip: float = 10.0
    schedule: Literal["cosine", "constant"] = "cosine"
    start_ratio: float = 0.0
    end_ratio: float = 0.1
    dino_weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.weight >= 0 and self.bcr >= 0,
            f"disc.weight and disc.bcr must be >= 0, got {self.weight}, {self.bcr}",
        )
        _check(0 <= self.start <= 1, f"disc.start must be a fraction of the run in [0, 1], got {self.start}")
        low, high = self.adaptive_clamp
        _check(
            0 <= low <= high, f"disc.adaptive_clamp must satisfy 0 <= low <= high, got {self.adaptive_clamp}"
        )
        _check(
            0 <= self.aug_prob <= 1 and 0 <= self.bcr_cutout < 1,
            f"disc.aug_prob must be in [0, 1] and disc.bcr_cutout in [0, 1), got {self.aug_prob}, {self.bcr_cutout}",
        )
        _check_optim(self, "disc")


@dataclass
class DistributedSection:
    """How processes cooperate. Launch several with ``torchrun``; one process needs no launcher.

    ``engine: ddp`` wraps the models in ``DistributedDataParallel``; ``deepspeed`` builds DeepSpeed
    engines (ZeRO ``zero_stage`` 1 or 2) around the same torch AdamW optimisers. ``backend: auto`` is
    nccl on GPUs and gloo on CPUs. ``bf16_grad_compression`` (ddp) all-reduces the gradients in bf16:
    half the bytes, worth it between nodes; the sums are rounded to bf16.
    """

    engine: Literal["ddp", "deepspeed"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    zero_stage: Literal[1, 2] = 2
    find_unused_parameters: bool = False
    bf16_grad_compression: bool = False
    timeout_minutes: int = 30


@dataclass
class CheckpointSection:
    """Checkpoints under ``<output_dir>/checkpoints``: every ``every_steps`` and at the end, keeping the
    last ``keep_last``. ``resume`` is ``auto`` (the newest readable one there, if any), a checkpoint
    path, or null. With EMA on, ``export_ema`` exports the EMA weights to ``<output_dir>/final``.

    ``on_newer`` says what to do when the folder holds checkpoints newer than the step this run starts
    from (another continuation's): ``refuse`` (the default), ``branch`` (move them aside) or
    ``overwrite`` (delete them). A resumed run whose config differs from the checkpoint's in a field
    that changes the training (learning rate, batch, losses, ...) stops with the list of changes unless
    ``allow_config_change``; then the new values apply and are logged.

    ``format``: ``torch`` (the default: the main process writes one ``trainer.pt``) or ``dcp`` (the weights
    and optimiser state through ``torch.distributed.checkpoint``, every process writing its share; with
    ``async_save`` from a background thread while training goes on). Resuming reads either format.
    """

    every_steps: int = 1000
    keep_last: int = 3
    resume: str | None = None
    export_ema: bool = True
    on_newer: Literal["refuse", "branch", "overwrite"] = "refuse"
    allow_config_change: bool = False
    format: Literal["torch", "dcp"] = "torch"
    async_save: bool = False

    def __post_init__(self) -> None:
        _check(
            self.every_steps > 0 and self.keep_last > 0,
            f"checkpoint.every_steps and checkpoint.keep_last must be > 0, got {self.every_steps}, {self.keep_last}",
        )
        _check(
            not self.async_save or self.format == "dcp",
            "checkpoint.async_save needs checkpoint.format dcp (the torch format is written synchronously)",
        )


@dataclass
class LoggingSection:
    """A log line, TensorBoard scalars and ``metrics.jsonl`` every ``log_every`` steps; a PNG grid of
    ``num_images`` originals over their reconstructions every ``image_every`` steps (0 turns it off)."""

    log_every: int = 50
    image_every: int = 500
    num_images: int = 8
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "unitok"
    wandb_run_name: str | None = None

    def __post_init__(self) -> None:
        _check(self.log_every > 0, f"logging.log_every must be > 0, got {self.log_every}")
        _check(
            self.image_every >= 0 and self.num_images > 0,
            f"logging.image_every must be >= 0 and logging.num_images > 0, got {self.image_every}, {self.num_images}",
        )


@dataclass
class EvalSection:
    """Held-out evaluation while training, every ``every_steps`` optimiser steps and at the end (0: off),
    on the main process; results go to ``eval.jsonl``, the log and TensorBoard (``eval/*``).

    Reconstruction PSNR/SSIM (and rFID with ``rfid: true``; ``inception`` is the FID Inception weights
    file, ``download``, or null for torch-fidelity's cached weights) on at most ``max_images`` images of
    ``data`` (default: ``data.path``; an image folder, an image-text folder read at ``split``, or
    shards), centre-cropped to the model's size; zero-shot accuracy on the class folder ``zero_shot``
    (``{class}/*.png``) with the ``templates`` prompt set.
    """

    every_steps: int = 0
    data: str | None = None
    split: str = "val"
    max_images: int = 256
    batch_size: int = 32
    rfid: bool = False
    inception: str | None = None
    zero_shot: str | None = None
    templates: str = "simple"

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"eval.every_steps must be >= 0 (0 = off), got {self.every_steps}")
        _check(
            self.max_images > 0 and self.batch_size > 0,
            f"eval.max_images and eval.batch_size must be > 0, got {self.max_images}, {self.batch_size}",
        )


@dataclass
class RunConfig:
    """One training run of the tokenizer (see the module docstring and each section's docstring)."""

    output_dir: str = "runs/tokenizer"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(total_steps=1000))
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    disc: DiscSection = field(default_factory=DiscSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir must not be empty")
        _check(
            self.loss.clip_negatives == 0 or (self.loss.clip > 0 and bool(self.data.negative_words)),
            "loss.clip_negatives > 0 needs loss.clip > 0 and data.negative_words (a swap vocabulary: "
            "synth-shape, synth-color, synth or a text file of word groups)",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists): YAML/JSON-ready and safe for ``torch.load(weights_only=True)``."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate from a nested dict; unknown keys and wrong types raise ValueError."""
        return _build(cls, data, "")

    def replace(self, overrides: list[str]) -> RunConfig:
        """A copy with ``key.sub=value`` overrides applied (values parsed as YAML)."""
        return RunConfig.from_dict(apply_overrides(self.to_dict(), overrides))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_optim(section: OptimSection | DiscSection, name: str) -> None:
    _check(section.lr > 0, f"{name}.lr must be > 0, got {section.lr}")
    _check(all(0 <= b < 1 for b in section.betas), f"{name}.betas must lie in [0, 1), got {section.betas}")
    _check(
        section.weight_decay >= 0 and section.eps > 0,
        f"{name}.weight_decay must be >= 0 and {name}.eps > 0, got {section.weight_decay}, {section.eps}",
    )
    _check(
        section.grad_clip >= 0, f"{name}.grad_clip must be >= 0 (0 = no clipping), got {section.grad_clip}"
    )
    _check(
        0 <= section.warmup <= 1,
        f"{name}.warmup must be a fraction of the run in [0, 1], got {section.warmup}",
    )
    _check(
        0 <= section.start_ratio <= 1 and 0 <= section.end_ratio <= 1,
        f"{name}.start_ratio and {name}.end_ratio must lie in [0, 1], got {section.start_ratio}, {section.end_ratio}",
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    label = where or "the run config"
    if not isinstance(data, dict):
        raise ValueError(f"{label} must be a mapping of keys to values, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = [f"{where}.{key}" if where else key for key in unknown]
        raise ValueError(f"unknown key(s) {names} in {label}; known keys: {sorted(known)}")
    return cls(**convert_fields(cls, data, where))


def convert_fields(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``data`` (field name -> value, as YAML reads it) with each value converted to the field's type hint of the
    dataclass ``cls``; a value that does not fit raises ValueError naming ``where.field``."""
    hints = typing.get_type_hints(cls)
    return {
        name: _convert(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in data.items()
    }


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where} must not be null")
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        return _to_int(value, where)
    if hint is float:
        return to_float(value, where)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported run-config field type {hint!r} at {where}")


def to_float(value: Any, where: str) -> float:
    """``value`` as a finite float (numbers, or numbers written as strings); ValueError naming ``where``."""
    # YAML 1.1 reads ``1e-3`` (no dot) as a string, so numeric strings are accepted too.
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return number


def _to_int(value: Any, where: str) -> int:
    number = to_float(value, where)
    if not number.is_integer():
        raise ValueError(f"{where} must be an integer, got {value!r}")
    return int(number)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (a copy); values are parsed as YAML scalars/lists."""
    tree = json.loads(json.dumps(tree))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected an override like section.key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = tree
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    return tree


# Fields a resumed run may change freely: where things are, how often it reports, how it is launched.
RESUME_FREE_FIELDS: tuple[str, ...] = (
    "output_dir",
    "checkpoint.",
    "logging.",
    "eval.",
    "train.stop_at_step",
    "train.cpu_threads",
    "train.device",
    "train.compile",
    "loss.lpips_channels_last",
    "data.num_workers",
    "data.path",
    "data.synth",
    "distributed.timeout_minutes",
    "distributed.backend",
)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Differences between two ``RunConfig.to_dict()`` trees as ``key: old -> new`` lines:
    ``(changes that alter the training, changes in RESUME_FREE_FIELDS)``. Keys that ``old`` lacks (a
    config saved before the field existed) count as their default."""
    # A key this version no longer knows leaves the tree as it is.
    with contextlib.suppress(ValueError):
        old = RunConfig.from_dict(old).to_dict()
    flat_old, flat_new = _flatten(old), _flatten(new)
    relevant, free = [], []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, "<unset>"), flat_new.get(key, "<unset>")
        if before != after:
            line = f"{key}: {before!r} -> {after!r}"
            is_free = any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FREE_FIELDS)
            (free if is_free else relevant).append(line)
    return relevant, free


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def preset_names() -> list[str]:
    """Names of the run-config presets shipped in ``unitok/scripts/configs``."""
    folder = resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith(CONFIG_SUFFIXES))


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """The raw tree of a config file (a path to .yaml/.json) or of a preset by name.

    Raises ValueError naming the file (and the line, for syntax errors) when it is missing, unreadable
    or not a mapping.
    """
    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read config file {path}: {err}") from None
        label, suffix = str(path), path.suffix
    elif path.exists():
        raise ValueError(f"config {name_or_path!r} is not a file")
    else:
        folder = resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER
        matches = [folder / f"{name_or_path}{suffix}" for suffix in CONFIG_SUFFIXES]
        found = [m for m in matches if m.is_file()]
        if not found:
            raise ValueError(
                f"no config file {name_or_path!r} and no preset of that name; presets: {preset_names()}"
            )
        text, suffix, label = found[0].read_text(), Path(found[0].name).suffix, f"preset {name_or_path}"
    try:
        tree = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark is not None else label
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"config {label} must hold a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a preset (by name) or a YAML/JSON file, apply ``key=value`` overrides, validate."""
    return RunConfig.from_dict(apply_overrides(read_config_file(name_or_path), overrides or []))
