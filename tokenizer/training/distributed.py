"""Process group setup and the two training engines (torch DDP, DeepSpeed ZeRO-1/2).

An engine owns one module with its torch AdamW optimiser and ``LambdaLR`` schedule and hides how
gradients are reduced, scaled, clipped and stepped. The training loop calls, per micro-batch,
``engine(...)`` (the forward) and ``engine.backward(loss)`` inside ``engine.sync(last_micro_batch)``,
then ``engine.step()`` once per optimiser step. ``engine.module`` is the bare module (for forwards
that must not be tracked by DDP, and for saving).

Launch several processes with ``torchrun``; its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables are
read here. A single process needs no launcher and no process group.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import DistributedSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, and whether ``teardown`` must
    destroy the process group (one ``setup`` created for DDP)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes logs, images and checkpoints' shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def setup(section: DistributedSection, device: str) -> DistInfo:
    """Read the torchrun environment, pick the device, and join the process group when there are several
    processes. ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    owns_group = False
    # DeepSpeed needs a process group even for one process; torchrun's rendezvous variables may be absent then.
    wants_group = world_size > 1 or section.engine == "deepspeed"
    if wants_group and not dist.is_initialized():
        backend = section.backend if section.backend != "auto" else ("nccl" if use_cuda else "gloo")
        timeout = datetime.timedelta(minutes=section.timeout_minutes)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
            # DeepSpeed insists on the variable a launcher would have set.
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
        # DeepSpeed keeps module-level references to the groups it derives from this one, so a group made
        # for DeepSpeed lives until the process ends (a later run in the same process reuses it).
        owns_group = section.engine != "deepspeed"
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, torch_device, owns_group)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_main_process() -> bool:
    """True in rank 0 (or without a launcher), whether or not a process group is up."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def teardown(info: DistInfo) -> None:
    """Destroy the process group if ``setup`` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for one process)."""
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over processes (a copy on ``info.device``, which NCCL needs; no-op for one process)."""
    values = values.detach().to(info.device, copy=True)
    if info.distributed:
        dist.all_reduce(values)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class TorchEngine:
    """A module with torch AdamW + ``LambdaLR`` (+ ``GradScaler`` for fp16), DDP-wrapped for several processes.

    ``backward`` divides the loss by ``grad_accum``; ``step`` unscales, clips the gradient norm to
    ``grad_clip`` (0 = no clipping), steps optimiser and schedule, zeroes the gradients and returns the
    pre-clipping gradient norm. ``bf16_grad_compression`` all-reduces DDP's gradients in bf16.

    After each ``step``, ``nonfinite`` is a 0-dim float tensor on the module's device: 1.0 when the step's
    gradient was not finite and its update was skipped, else 0.0. With a fused AdamW (and no fp16 loss
    scaling) the skip happens on the device and ``sync_free`` is True: nothing in ``step`` waits for the
    device. Otherwise ``step`` reads the norm on the host to decide, and ``host_nonfinite`` holds that
    verdict (None with ``sync_free``).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        info: DistInfo,
        grad_clip: float,
        grad_accum: int = 1,
        fp16: bool = False,
        find_unused_parameters: bool = False,
        bf16_grad_compression: bool = False,
    ):
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
        self.sync_free = bool(optimizer.defaults.get("fused")) and not fp16
        self.nonfinite = torch.zeros((), device=info.device)
        self.host_nonfinite: bool | None = None
        self._params = [p for p in module.parameters() if p.requires_grad]
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            # Gradients live in DDP's buckets (no second copy, no copy-out after the all-reduce); buffers
            # are not broadcast before every forward: the only ones that change (the quantizer's usage EMA)
            # are updated from all-reduced counts, so they are equal on every process already.
            ddp = nn.parallel.DistributedDataParallel(
                module,
                device_ids=device_ids,
                find_unused_parameters=find_unused_parameters,
                gradient_as_bucket_view=True,
                broadcast_buffers=False,
            )
            if bf16_grad_compression:
                # Halves the bytes of the gradient all-reduce (worth it across nodes); sums in bf16.
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
            self.forward_module: nn.Module = ddp
        else:
            self.forward_module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_module(*args, **kwargs)

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; gradients are all-reduced only when ``enabled``."""
        if enabled or not isinstance(self.forward_module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.forward_module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss."""
        self.scaler.scale(loss / self.grad_accum).backward()

    # A step with a non-finite gradient is skipped (``nonfinite`` tells the loop).
    can_skip_steps = True

    def step(self) -> torch.Tensor:
        """Clip, step optimiser and schedule, zero the gradients; returns the gradient norm before clipping.

        A non-finite gradient norm (the gradients are already all-reduced, so every process agrees)
        skips the optimiser update but not the schedule, and sets ``nonfinite`` to 1. With ``sync_free``
        the fused AdamW skips it on the device; otherwise deciding costs one host read of the norm.
        """
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        self.nonfinite = (~torch.isfinite(norm)).float()
        if self.sync_free:
            # The fused kernel leaves weights, moments and step counts as they were where found_inf is 1
            # (the attribute GradScaler sets for optimisers that take it).
            self.optimizer.found_inf = self.nonfinite
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            self.host_nonfinite = bool(self.nonfinite)
            if not self.host_nonfinite or self.scaler.is_enabled():
                # fp16's grad scaler skips non-finite steps itself and lowers its scale.
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach()

    @property
    def lr(self) -> float:
        """Learning rate of the next step."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, schedule and grad-scaler states (tensors and plain containers)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict`` (the module's weights are loaded separately)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save_sharded(self, folder: Path, tag: str) -> None:
        """Nothing to do: ``state_dict`` holds the whole state."""

    def load_sharded(self, folder: Path, tag: str) -> None:
        """Nothing to do: ``load_state_dict`` restores the whole state."""


def _broadcast_scalars_for_deepspeed(module: nn.Module) -> None:
    """Keep DeepSpeed from broadcasting 0-dim parameters (UniTok's ``logit_scale``) and broadcast them here.

    DeepSpeed 0.19 broadcasts every parameter as ``p.data.view(torch.uint8)``, which fails for 0-dim
    tensors; it skips parameters that carry ``ds_optim_param`` (its marker for OptimizedLinear weights,
    which otherwise only matters for its parameter offload, not used here).
    """
    for param in module.parameters():
        if param.ndim == 0:
            param.ds_optim_param = True
            if dist.is_initialized():
                dist.broadcast(param.data, src=0)


class DeepSpeedEngine:
    """The same contract on a DeepSpeed engine (ZeRO stage 1 or 2) around the torch AdamW and ``LambdaLR``.

    Parameters stay float32 and the loop's ``torch.autocast`` provides bf16 compute, as with DDP.
    DeepSpeed scales the loss by the accumulation steps, reduces gradients at accumulation boundaries
    and clips to ``grad_clip``. Its partitioned optimiser state is saved and loaded with DeepSpeed's own
    checkpoint functions into ``folder/tag`` (every process writes its partition).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        info: DistInfo,
        grad_clip: float,
        micro_batch_size: int,
        grad_accum: int = 1,
        zero_stage: int = 2,
    ):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip,
            # overlap_comm (GPUs): reduce gradient buckets on a side stream while the backward pass runs.
            # Off on CPUs, where it buys nothing and a resumed run no longer ends bit-identical.
            "zero_optimization": {"stage": zero_stage, "overlap_comm": info.device.type == "cuda"},
            # A plain torch AdamW is what the recipe uses; DeepSpeed calls that "untested" under ZeRO.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        _broadcast_scalars_for_deepspeed(module)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = info.device
        self.nonfinite = torch.zeros((), device=info.device)
        self.host_nonfinite: bool | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """DeepSpeed reduces at accumulation boundaries by itself."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate one micro-batch; DeepSpeed needs ``engine.step()`` after every micro-batch, and the one at
        the accumulation boundary is left to ``step``."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if not boundary:
            self.engine.step()

    # DeepSpeed applies the update before the norm is known: a non-finite step cannot be undone. The norm
    # is read on the host every step (``nonfinite`` is set from it).
    can_skip_steps = False
    sync_free = False

    def step(self) -> float:
        """The optimiser step at the accumulation boundary (clip, AdamW, schedule, zero grads); returns the norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        finite = norm == norm and abs(norm) != float("inf")
        self.host_nonfinite = not finite
        self.nonfinite = torch.tensor(0.0 if finite else 1.0, device=self.device)
        return norm

    @property
    def lr(self) -> float:
        """Learning rate of the next step."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """Empty: DeepSpeed's files (``save_sharded``) hold optimiser and schedule."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to do: ``load_sharded`` restores optimiser and schedule."""

    def save_sharded(self, folder: Path, tag: str) -> None:
        """Every process writes its ZeRO partition (and rank 0 the module) to ``folder/tag``."""
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load_sharded(self, folder: Path, tag: str) -> None:
        """Restore module, ZeRO optimiser partitions and schedule from ``folder/tag``."""
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint {tag!r} under {folder}")
