"""Measure the tokenizer's training step without a GPU: host syncs, ATen ops, FLOPs, activation memory.

    unitok bench train-step [--sections syncs flops memory gan host] [--steps 2] [--memory-configs ...]

Every section prints the code before the efficiency changes ("before": the literal nearest-x2 + 3x3 conv
upsampler, per-sub-codebook ``bincount`` usage counts) next to today's ("after") in one run:

- ``syncs``: one real ``Trainer.train_step`` (``unitok-tiny`` at 32 px on a tiny synthetic world, CPU, LPIPS
  and the discriminator active from step 0); "before" also with AdamW's default kernel (the engines read
  the gradient norm on the host) and the text-id check's CPU branch, "after" with what CUDA runs by default
  (fused AdamW skipping non-finite steps on the device, the device-side text-id assertion); counted
  under a ``TorchDispatchMode`` that counts every ATen op and every
  op that makes the host wait for the device on a GPU: ``_local_scalar_dense`` (``.item()``, ``int(t)``,
  ``bool(t)``, ``if t:``), ops whose output size depends on the data (``nonzero``, ``bincount``, ``unique``,
  ``masked_select``), and Python-side reads (``tolist``, ``numpy``). Each is listed with its line in the
  project's code. On a CPU run every tensor is a host tensor, so a listed read is a device sync on a GPU
  only if its tensor lives on the device there (the list says which).
- ``flops``: ``torch.utils.flop_counter.FlopCounterMode`` over ``unitok-large`` built on the meta device
  (no memory, no arithmetic): decoder GFLOP per 256 px image by part, whole forward and forward + backward.
- ``memory``: peak bytes of the tensors alive during forward + backward of ``unitok-large`` at 256 px under
  bf16 autocast, tracked op by op on fake tensors (``FakeTensorMode``: shapes and dtypes only) with the
  storages' lifetimes followed by weak references. Run at batch 1 and 2, the difference is the activation
  memory per image (parameters, gradients and other batch-independent memory cancel). The loss is
  ``MSE(recon) + VQ + CLIP-like dot product``; LPIPS, the discriminator and the optimiser state are not
  included (they add the same in every configuration). An estimate: the CUDA caching allocator rounds
  blocks and may fragment, and cuDNN/cuBLAS workspaces are not counted.
- ``gan``: GFLOP and CPU seconds of the generator loss's forward + backward with the adaptive GAN weight
  (LPIPS VGG16 + the release's DINOv2-S discriminator at 256 px, random weights), computed in two passes
  ("before": ``adaptive_gan_weight``, then ``backward`` of the total) and in one (``adaptive_gan_grads``).
- ``host``: per-sample seeding and AdamW kernels on the quick start's model (``bench_host_costs``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)
from torch.utils.weak import WeakTensorKeyDictionary

import unitok.tokenizer
import unitok.tokenizer.model
from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.config import CHECKPOINT_PARTS, CHECKPOINT_PRESETS
from unitok.tokenizer.decoder import ViTaminDecoder
from unitok.tokenizer.losses import (
    LPIPS,
    DinoDiscConfig,
    DinoDiscriminator,
    ReconstructionLoss,
    adaptive_gan_grads,
    adaptive_gan_weight,
    generator_loss,
)
from unitok.tokenizer.quantizer import _StackedCodebookQuantizer
from unitok.tokenizer.text import check_text_ids

SECTIONS = ("syncs", "flops", "memory", "gan", "host")
# ATen ops after which the host waits for the device: a scalar read, or an output sized by the data.
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "bincount",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "masked_select",
    }
)
_ROOT = Path(unitok.tokenizer.__file__).resolve().parents[1]
_THIS = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------------------
# the code before the efficiency changes, for side-by-side figures


def _bincount_codes(self: _StackedCodebookQuantizer, codes_KN: torch.Tensor) -> torch.Tensor:
    """The usage counting before the scatter-add: one ``bincount`` (which syncs on a GPU)."""
    flat = (codes_KN + self._offsets[:, None]).flatten()
    return torch.bincount(flat, minlength=self.num_codebooks * self.codebook_size).view(
        self.num_codebooks, self.codebook_size
    )


@contextlib.contextmanager
def before_changes(active: bool) -> Iterator[None]:
    """Within the block, quantizers count usage with ``bincount`` as before (when ``active``)."""
    if not active:
        yield
        return
    original = _StackedCodebookQuantizer._count_codes
    _StackedCodebookQuantizer._count_codes = _bincount_codes
    try:
        yield
    finally:
        _StackedCodebookQuantizer._count_codes = original


def _text_ids_check_on_accelerator(ids: torch.Tensor, context_length: int, vocab_size: int) -> None:
    """The ATen ops of ``check_text_ids`` on an accelerator: a CPU run takes its reading branch
    (``int(ids.min())``), a GPU run the device-side assertion only, which this runs on any device (the
    shape and dtype checks, plain Python, are left out)."""
    torch._assert_async((ids.min() >= 0) & (ids.max() < vocab_size), "text ids out of range")


@contextlib.contextmanager
def gpu_text_check(active: bool) -> Iterator[None]:
    """Within the block (when ``active``), the tokenizer checks text ids as it does on an accelerator."""
    if not active:
        yield
        return
    unitok.tokenizer.model.check_text_ids = _text_ids_check_on_accelerator
    try:
        yield
    finally:
        unitok.tokenizer.model.check_text_ids = check_text_ids


# before: literal upsampler, bincount, AdamW's default kernel (the trainer reads the gradient norm on the host
# every step to skip a non-finite one); after: today's GPU defaults (fused AdamW skips on the device).
MODES = {
    "before": dict(upsample="nearest_conv", fused_adamw=False),
    "after": dict(upsample="transposed", fused_adamw=True),
}


# ----------------------------------------------------------------------------------------------------------
# host syncs and ATen ops


def _site() -> str:
    """``file:line`` of the innermost frame in the project's own code (not this script, not a package)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == _THIS or ".venv" in path.parts or "site-packages" in path.parts:
            continue
        if path.is_relative_to(_ROOT):
            return f"{path.relative_to(_ROOT)}:{frame.lineno}"
    return "(outside the project)"


class HostSyncCounter(TorchDispatchMode):
    """Counts ATen ops and host reads of tensors (``SYNC_OPS``, ``Tensor.tolist``/``numpy``) by site.

    A read is a device sync on a GPU only when its tensor would live on the device there. On a CPU run the
    counter follows that: tensors passed to ``mark_device`` (parameters, buffers, the batch) are device
    tensors, and so is every output of an op that takes one. Reads of other tensors (random draws of the
    augmentations, the optimiser's step counters, DataLoader outputs) are host reads, counted apart.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self._device = WeakTensorKeyDictionary()
        self._patched: dict[str, object] = {}

    def mark_device(self, *tensors: torch.Tensor) -> None:
        """Treat ``tensors`` as living on the training device."""
        for tensor in tensors:
            self._device[tensor] = True

    def _on_device(self, tree) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self._device for t in tree_flatten(tree)[0])

    def _count(self, name: str, on_device: bool) -> None:
        (self.syncs if on_device else self.host_reads)[f"{name} at {_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        kwargs = kwargs or {}
        on_device = self._on_device((args, kwargs))
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self._count(name, on_device)
        out = func(*args, **kwargs)
        if on_device:
            self.mark_device(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
        return out

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                self._count(_name, tensor in self._device)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


def _tiny_trainer(out: Path, world: Path, upsample: str, fused_adamw: bool = False):
    from unitok.tokenizer.train import Trainer
    from unitok.tokenizer.training import distributed
    from unitok.tokenizer.training.config import load_run_config

    overrides = [
        f"output_dir={out}",
        f"data.path={world}",
        "data.synth=null",
        "data.num_workers=0",
        "model.overrides.image_size=32",
        f"model.overrides.upsample={upsample}",
        "train.device=cpu",
        "train.cpu_threads=1",
        "train.local_batch_size=4",
        "train.total_steps=100",
        f"train.fused_adamw={str(fused_adamw).lower()}",
        "loss.lpips=1.0",
        "loss.lpips_weights=random",
        "disc.enabled=true",
        "disc.preset=tiny",
        "disc.start=0.0",
        "disc.dino_weights=null",
        "logging.log_every=1000",
        "logging.image_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.every_steps=1000",
    ]
    config = load_run_config("unitok-tiny-synth", overrides)
    info = distributed.setup(config.distributed, config.train.device)
    return Trainer(config, info)


def _counting(trainer) -> HostSyncCounter:
    """A counter that knows the trainer's device tensors: weights, buffers, optimiser moments and batches."""
    counter = HostSyncCounter()
    modules = [trainer.model, trainer.disc_module, trainer.recon_loss]
    for module in modules:
        if module is not None:
            counter.mark_device(*module.parameters(), *module.buffers())
    for engine in (trainer.gen, trainer.disc):
        if engine is not None:
            fused = bool(engine.optimizer.defaults.get("fused"))
            for state in engine.optimizer.state.values():
                # AdamW keeps its step counters on the host unless fused or capturable; moments on the device.
                counter.mark_device(
                    *(v for k, v in state.items() if (fused or k != "step") and isinstance(v, torch.Tensor))
                )
    next_batch = trainer.stream.next

    def next_on_device():
        batch = next_batch()
        counter.mark_device(*batch)
        return batch

    trainer.stream.next = next_on_device
    return counter


def measure_syncs(steps: int) -> list[dict]:
    """Syncs and ATen ops per ``Trainer.train_step`` (after one warm-up step) in each mode."""
    from unitok.data.synth import SynthConfig, generate_world

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_world(
            world, SynthConfig(num_images=48, size=32, classify_per_class=0, shard_size=16), workers=1
        )
        for mode, options in MODES.items():
            torch.manual_seed(0)
            with before_changes(mode == "before"), gpu_text_check(mode == "after"):
                trainer = _tiny_trainer(Path(tmp) / mode, world, options["upsample"], options["fused_adamw"])
                trainer.train_step()
                counter = _counting(trainer)
                with counter:
                    for _ in range(steps):
                        trainer.train_step()
            trainer.monitor.close()
            rows.append(
                {
                    "mode": mode,
                    "ops": counter.ops / steps,
                    "syncs": sum(counter.syncs.values()) / steps,
                    "host_reads": sum(counter.host_reads.values()) / steps,
                    "sites": {site: n / steps for site, n in sorted(counter.syncs.items())},
                    "host_sites": {site: n / steps for site, n in sorted(counter.host_reads.items())},
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------------------
# FLOPs


def _meta_model(config: TokenizerConfig) -> UniTok:
    with torch.device("meta"):
        model = UniTok(config).train()
    # A range check of the text ids reads values, which meta tensors do not have; the bench skips it.
    model._text_ids = lambda texts: texts
    return model


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP table has the CUDA attention kernels only; the whole-model counts run on (fake) CPU tensors.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _flop_table(counter: FlopCounterMode) -> dict[str, int]:
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def measure_flops(preset: str) -> list[dict]:
    """GFLOP per image (batch 1) of ``preset`` at its image size, in each mode (2 FLOP per multiply-add)."""
    rows = []
    for mode, options in MODES.items():
        config = TokenizerConfig.preset(preset, upsample=options["upsample"])
        grid = config.grid_size
        with torch.device("meta"):
            decoder = ViTaminDecoder(config).eval()
            feats = torch.empty(1, grid * grid, config.width)
        with FlopCounterMode(display=False) as counter:
            decoder(feats, (grid, grid))
        parts = _flop_table(counter)
        # The decoder loops over its blocks and stages itself, so the counter sees each block, not the lists.
        blocks = sum(parts.get(f"ViTaminDecoder.blocks.{i}", 0) for i in range(config.decoder_depth))
        # The whole model on fake CPU tensors: its autocast switches need a real device type.
        model = _meta_model(config)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu")
            img = torch.empty(1, 3, config.image_size, config.image_size)
            ids = torch.zeros(1, config.text_context_length, dtype=torch.long)
            with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as forward:
                out = model(img, ids)
            loss = out.recon.square().mean() + out.vq_loss + (out.image_features * out.text_features).sum()
            with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as backward:
                loss.backward()
        rows.append(
            {
                "mode": mode,
                "decoder": counter.get_total_flops() / 1e9,
                "decoder_blocks": blocks / 1e9,
                "upsampler": (counter.get_total_flops() - blocks) / 1e9,
                "forward": forward.get_total_flops() / 1e9,
                "encoder": _flop_table(forward).get("UniTok.encoder", 0) / 1e9,
                "text": _flop_table(forward).get("UniTok.text_encoder", 0) / 1e9,
                "train_step": (forward.get_total_flops() + backward.get_total_flops()) / 1e9,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# activation memory


class PeakMemory(TorchDispatchMode):
    """Live bytes of the storages that ops create (each counted once, released when it is freed) and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            ref = self._refs.get(key)
            if ref is not None and ref() is storage:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._release(key, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def _part_modules(model: UniTok) -> dict[str, list[torch.nn.Module]]:
    """The modules of each checkpointable part whose forward calls the tracker brackets."""
    decoder = model.decoder
    return {
        "encoder_front": [model.encoder.patch_embed],
        "encoder_blocks": list(model.encoder.blocks),
        "decoder_blocks": list(decoder.blocks),
        "upsampler": [decoder.up_conv1, *decoder.up_conv2, *decoder.up_conv3, decoder.up_conv4],
        "text": [model.text_encoder],
    }


@contextlib.contextmanager
def _attribute_parts(model: UniTok, tracker: PeakMemory, kept: dict[str, int]) -> Iterator[None]:
    """Add to ``kept[part]`` the bytes each forward of the part leaves alive (its saved activations and
    output): the memory that checkpointing the part would give back until the backward pass."""
    handles = []
    for part, modules in _part_modules(model).items():
        for module in modules:

            def pre(_module, _args, _part=part):
                kept[_part] = kept.get(_part, 0) - tracker.live

            def post(_module, _args, _out, _part=part):
                kept[_part] += tracker.live

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _peak_bytes(model: UniTok, batch: int, kept: dict[str, int]) -> tuple[int, int]:
    """(peak live bytes over forward + backward, live bytes at the end of the forward)."""
    size, context = model.config.image_size, model.config.text_context_length
    img = torch.rand(batch, 3, size, size) * 2 - 1
    ids = torch.randint(1, 1000, (batch, context))
    tracker = PeakMemory()
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16), _attribute_parts(model, tracker, kept):
            out = model(img, ids)
        loss = (
            out.recon.float().square().mean()
            + out.vq_loss
            + (out.image_features.float() * out.text_features.float()).sum()
        )
        del out
        after_forward = tracker.live
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return tracker.peak, after_forward


def measure_memory(preset: str, configs: list[tuple[str, dict]], batches: tuple[int, int]) -> list[dict]:
    """Per image (difference between the two batch sizes, divided by theirs): peak GiB and GiB kept after
    the forward, by part; and the peak at the larger batch, for each named configuration."""
    small, large = batches
    if not 0 < small < large:
        raise ValueError(f"expected two batch sizes 0 < small < large, got {batches}")
    rows = []
    for label, options in configs:
        start = time.perf_counter()
        model = _meta_model(TokenizerConfig.preset(preset, **options))
        kept_one: dict[str, int] = {}
        kept_two: dict[str, int] = {}
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu").train()
            (peak_one, fwd_one), (peak_two, fwd_two) = (
                _peak_bytes(model, small, kept_one),
                _peak_bytes(model, large, kept_two),
            )
        per_image = 2**30 * (large - small)
        rows.append(
            {
                "config": label,
                "per_image_gib": (peak_two - peak_one) / per_image,
                "forward_gib": (fwd_two - fwd_one) / per_image,
                "peak_large_gib": peak_two / 2**30,
                "parts_gib": {part: (kept_two[part] - kept_one[part]) / per_image for part in kept_one},
                "seconds": time.perf_counter() - start,
            }
        )
        logging.getLogger(__name__).info("%s: %.2f GiB per image", label, rows[-1]["per_image_gib"])
    return rows


def memory_configs(names: list[str]) -> list[tuple[str, dict]]:
    """``before`` (literal upsampler, nothing checkpointed), each preset of ``CHECKPOINT_PRESETS`` and each
    single part (``part:NAME``), as requested by ``names``."""
    table: dict[str, dict] = {"before": dict(upsample="nearest_conv")}
    table.update({f"preset:{name}": dict(checkpoint_parts=name) for name in CHECKPOINT_PRESETS})
    table.update({f"part:{part}": dict(checkpoint_parts=(part,)) for part in CHECKPOINT_PARTS})
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown memory configs {unknown}; choose from {sorted(table)}")
    return [(name, table[name]) for name in names]


# ----------------------------------------------------------------------------------------------------------
# the adaptive GAN weight: two passes (before) vs one pass through LPIPS and the discriminator (after)


def _generator_loss_backward(model, recon_loss, disc, img, one_pass: bool) -> None:
    """Forward + backward of ``nll + vq + 0.4 * w * G`` with the adaptive weight ``w``, as the trainer does
    it today (``adaptive_gan_grads``, one pass) or did before (``adaptive_gan_weight``, then a second
    backward through LPIPS and the discriminator with the total)."""
    out = model(img)
    recon = out.recon.detach().requires_grad_() if one_pass else out.recon
    rec = recon_loss(recon, img)
    g_loss = generator_loss(disc, recon, blur_sigma=0.0)
    last_layer = model.decoder_last_layer()
    if one_pass:
        grads = adaptive_gan_grads(rec.total, g_loss, recon, out.recon, last_layer)
        recon_grad = grads.nll_grad + 0.4 * grads.weight * grads.g_grad
        (out.vq_loss + (out.recon * recon_grad).sum()).backward()
    else:
        weight = adaptive_gan_weight(rec.total, g_loss, last_layer)
        (rec.total + out.vq_loss + 0.4 * weight * g_loss).backward()


class _FlopTotal(TorchDispatchMode):
    """Total FLOPs of the ATen ops run inside, by torch's FLOP formulas, without ``FlopCounterMode``'s module
    tracking (its backward hooks on module inputs refuse ``autograd.grad`` towards a leaf input, which is
    what the one-pass adaptive weight does)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self._formulas = {**flop_registry, **{k: shape_wrapper(f) for k, f in _CPU_ATTENTION.items()}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def measure_gan(image_size: int = 256, repeats: int = 3) -> list[dict]:
    """GFLOP and CPU seconds per image of the generator loss's forward + backward with the adaptive GAN weight:
    LPIPS (VGG16) and the release's DINOv2-S discriminator at ``image_size`` (random weights: same cost), the
    unitok-tiny tokenizer in front (so that the loss networks dominate), batch 1, float32."""
    torch.manual_seed(0)
    model = UniTok(TokenizerConfig.preset("unitok-tiny", image_size=image_size)).train()
    recon_loss = ReconstructionLoss(0.2, 1.0, 1.0, lpips=LPIPS(pretrained=False))
    disc = DinoDiscriminator(DinoDiscConfig.preset("dinov2-small", image_size=image_size)).requires_grad_(
        False
    )
    img = torch.rand(1, 3, image_size, image_size) * 2 - 1
    rows = []
    for mode, one_pass in (("before", False), ("after", True)):
        with _FlopTotal() as counter:
            _generator_loss_backward(model, recon_loss, disc, img, one_pass)
        model.zero_grad(set_to_none=True)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            _generator_loss_backward(model, recon_loss, disc, img, one_pass)
            seconds.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        rows.append({"mode": mode, "gflop": counter.flops / 1e9, "seconds": min(seconds)})
    return rows


# ----------------------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, default=2, help="training steps counted (after one warm-up)")
    parser.add_argument("--preset", default="unitok-large", help="model of the flops and memory sections")
    parser.add_argument(
        "--memory-batches",
        nargs=2,
        type=int,
        default=[32, 64],
        help="two batch sizes; per image = difference / their difference (fake tensors: any size is cheap)",
    )
    parser.add_argument(
        "--memory-configs",
        nargs="+",
        default=["before", *(f"preset:{name}" for name in CHECKPOINT_PRESETS)],
        help="'before', 'preset:NAME' (a CHECKPOINT_PRESETS key) or 'part:NAME' (one checkpointed part)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU only\n")
    if "syncs" in args.sections:
        rows = measure_syncs(args.steps)
        print("## Host syncs and ATen ops per training step (unitok-tiny, 32 px, batch 4, LPIPS + GAN)\n")
        print(
            "| code | ATen ops / step | device syncs / step (on a GPU) | host-only reads / step |\n"
            "|---|---:|---:|---:|"
        )
        for row in rows:
            print(f"| {row['mode']} | {row['ops']:.0f} | {row['syncs']:g} | {row['host_reads']:g} |")
        for row in rows:
            print(f"\n{row['mode']}: device syncs")
            for site, count in row["sites"].items():
                print(f"- {count:g} x {site}")
            print(f"\n{row['mode']}: host-only reads (no device sync)")
            for site, count in row["host_sites"].items():
                print(f"- {count:g} x {site}")
        print()
    if "flops" in args.sections:
        rows = measure_flops(args.preset)
        print(f"## GFLOP per image ({args.preset}, meta device, FlopCounterMode; 2 FLOP per multiply-add)\n")
        print(
            "| code | decoder | decoder ViT blocks | upsampler (+ final norm) | encoder | text tower | whole forward "
            "| forward + backward |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        )
        for row in rows:
            print(
                f"| {row['mode']} | {row['decoder']:.1f} | {row['decoder_blocks']:.1f} | {row['upsampler']:.1f} "
                f"| {row['encoder']:.1f} | {row['text']:.1f} | {row['forward']:.1f} | {row['train_step']:.1f} |"
            )
        print()
    if "memory" in args.sections:
        small, large = args.memory_batches
        rows = measure_memory(args.preset, memory_configs(args.memory_configs), (small, large))
        print(f"## Activation memory per image ({args.preset}, bf16 autocast, fake tensors)\n")
        print(
            f"Per image: (value at batch {large} - value at batch {small}) / {large - small}. Peak: peak live bytes "
            "over forward + backward. After forward: live bytes when the forward ends. Per part: bytes the part's "
            "forward leaves alive until the backward (saved activations + output).\n"
        )
        header = " | ".join(CHECKPOINT_PARTS)
        print(
            f"| configuration | peak GiB per image | after forward GiB per image | {header} "
            f"| peak at batch {large} (GiB) | seconds |"
        )
        print("|---|---:|---:|" + "---:|" * len(CHECKPOINT_PARTS) + "---:|---:|")
        for row in rows:
            parts = " | ".join(f"{row['parts_gib'].get(part, 0.0):.3f}" for part in CHECKPOINT_PARTS)
            print(
                f"| {row['config']} | {row['per_image_gib']:.3f} | {row['forward_gib']:.3f} | {parts} "
                f"| {row['peak_large_gib']:.1f} | {row['seconds']:.0f} |"
            )
        print()
    if "gan" in args.sections:
        rows = measure_gan()
        print(
            "## Generator loss with the adaptive GAN weight (LPIPS VGG16 + DINOv2-S discriminator, 256 px, "
            "batch 1, unitok-tiny, float32 CPU)\n"
        )
        print("| code | GFLOP forward + backward | CPU seconds (best of 3) |\n|---|---:|---:|")
        for row in rows:
            print(f"| {row['mode']} | {row['gflop']:.1f} | {row['seconds']:.2f} |")
        print()
    if "host" in args.sections:
        from unitok.scripts.bench_host_costs import measure_host

        host = measure_host()
        print(
            f"## Host-side costs of a CPU training step (unitok-tiny-synth: {host['tensors']} parameter tensors, "
            f"{host['parameters'] / 1e6:.2f} M parameters)\n"
        )
        print("| per-sample seeding | microseconds per sample |\n|---|---:|")
        for name, value in host["seeding_us"].items():
            print(f"| {name} | {value:.1f} |")
        print("\n| AdamW kernel | ms per step | max difference to the per-tensor update |\n|---|---:|---:|")
        for name, value in host["adamw_ms"].items():
            print(f"| {name} | {value:.1f} | {host['max_diff'][name]:.1e} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
