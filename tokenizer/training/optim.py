"""AdamW with the reference's weight-decay groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters of ``module``.

    Parameters with fewer than 2 dims (biases, norm scales, ``logit_scale``) get no weight decay; every
    matrix, convolution kernel, embedding and codebook gets ``weight_decay`` (as in the reference).
    """
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(
    module: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``param_groups(module, weight_decay)``.

    ``fused``: the fused kernel (one launch per step instead of a few per parameter tensor, and it can skip
    a non-finite step on the device); None picks it when every trainable parameter is on CUDA. On the CPU
    the fused kernel rounds differently from the default one, so it stays opt-in there; otherwise the
    multi-tensor (``foreach``) update runs, bit-identical to the per-tensor loop and twice as fast on CPU
    (torch picks it by itself only for CUDA tensors).
    """
    groups = param_groups(module, weight_decay)
    params = [p for group in groups for p in group["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True
    )


class WarmupCosine:
    """Learning-rate multiplier per optimiser step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Zero before ``start_step``; then a linear warm-up from ``start_ratio`` to 1 over ``warmup_steps``;
    then a cosine from 1 down to ``end_ratio`` at the last step (``total_steps - 1``), or a constant 1
    when ``cosine`` is False. Steps count from 0 (the first optimiser step uses ``self(0)``).
    Its attributes are plain numbers, so ``LambdaLR.state_dict()`` stores them.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        start_ratio: float = 0.0,
        end_ratio: float = 0.1,
        cosine: bool = True,
        start_step: int = 0,
    ):
        if total_steps <= start_step:
            raise ValueError(f"expected total_steps > start_step, got {total_steps} and {start_step}")
        if warmup_steps < 0:
            raise ValueError(f"expected warmup_steps >= 0, got {warmup_steps}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start_ratio = start_ratio
        self.end_ratio = end_ratio
        self.cosine = cosine
        self.start_step = start_step

    def __call__(self, step: int) -> float:
        local = step - self.start_step
        if local < 0:
            return 0.0
        if local < self.warmup_steps:
            return self.start_ratio + (1.0 - self.start_ratio) * local / self.warmup_steps
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - self.start_step - self.warmup_steps - 1)
        progress = min(1.0, (local - self.warmup_steps) / span)
        return self.end_ratio + (1.0 - self.end_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, multiplier: WarmupCosine
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepping ``multiplier`` once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
