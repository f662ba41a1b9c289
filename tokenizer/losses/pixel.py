"""Pixel reconstruction losses and the reconstruction objective L_nll = w1 L1 + w2 L2 + wp LPIPS.

Shape legend: B batch, H/W image size in pixels. Images are in [-1, 1]; losses are float32 scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import LPIPS

__all__ = ["PixelLoss", "ReconstructionLoss", "ReconstructionOutput", "pixel_loss"]


def _check_pair(rec_B3HW: torch.Tensor, img_B3HW: torch.Tensor) -> None:
    if rec_B3HW.ndim != 4 or rec_B3HW.shape != img_B3HW.shape:
        raise ValueError(
            f"expected reconstructions and images of the same shape [B,C,H,W], got {list(rec_B3HW.shape)} "
            f"and {list(img_B3HW.shape)}"
        )


class PixelLoss(NamedTuple):
    """``total`` = l1_weight * ``l1`` + l2_weight * ``l2``; all float32 scalars (means over every element)."""

    total: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor


def pixel_loss(
    rec_B3HW: torch.Tensor, img_B3HW: torch.Tensor, l1_weight: float = 0.2, l2_weight: float = 1.0
) -> PixelLoss:
    """Mean absolute and mean squared error between reconstructions and targets, in float32, and their mix."""
    _check_pair(rec_B3HW, img_B3HW)
    rec, img = rec_B3HW.float(), img_B3HW.float()
    l1 = F.l1_loss(rec, img)
    l2 = F.mse_loss(rec, img)
    return PixelLoss(l1_weight * l1 + l2_weight * l2, l1, l2)


class ReconstructionOutput(NamedTuple):
    """``total`` = l1_weight * ``l1`` + l2_weight * ``l2`` + lpips_weight * ``lpips`` (float32 scalars)."""

    total: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    lpips: torch.Tensor


class ReconstructionLoss(nn.Module):
    """The reconstruction objective of the tokenizer: l1_weight L1 + l2_weight L2 + lpips_weight LPIPS.

    Release weights: (0.2, 1.0, 1.0); LPIPS is skipped below its ``min_size`` (release 48 px) by ``LPIPS`` itself.
    ``lpips`` may be None only when ``lpips_weight`` is 0. Call as ``loss(rec_B3HW, img_B3HW)``.
    """

    def __init__(
        self,
        l1_weight: float = 0.2,
        l2_weight: float = 1.0,
        lpips_weight: float = 1.0,
        lpips: LPIPS | None = None,
    ) -> None:
        super().__init__()
        if min(l1_weight, l2_weight, lpips_weight) < 0:
            raise ValueError(
                f"expected non-negative weights, got l1 {l1_weight}, l2 {l2_weight}, lpips {lpips_weight}"
            )
        if lpips_weight > 0 and lpips is None:
            raise ValueError(
                "lpips_weight > 0 needs an LPIPS module: pass lpips=LPIPS(...) or set lpips_weight=0"
            )
        self.l1_weight, self.l2_weight, self.lpips_weight = l1_weight, l2_weight, lpips_weight
        self.lpips = lpips if lpips_weight > 0 else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], lpips: LPIPS | None = None) -> ReconstructionLoss:
        """Build from a run-config mapping with any of the keys ``l1_weight``, ``l2_weight``, ``lpips_weight``."""
        known = {"l1_weight", "l2_weight", "lpips_weight"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(
                f"unknown reconstruction-loss keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        return cls(**{key: float(value) for key, value in config.items()}, lpips=lpips)

    def forward(self, rec_B3HW: torch.Tensor, img_B3HW: torch.Tensor) -> ReconstructionOutput:
        pixel = pixel_loss(rec_B3HW, img_B3HW, self.l1_weight, self.l2_weight)
        if self.lpips is None:
            perceptual = pixel.total.new_zeros(())
        else:
            perceptual = self.lpips(rec_B3HW, img_B3HW)
        return ReconstructionOutput(
            pixel.total + self.lpips_weight * perceptual, pixel.l1, pixel.l2, perceptual
        )
