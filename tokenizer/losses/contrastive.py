"""CLIP contrastive loss between image and text embeddings, local-loss form with features gathered across
processes with gradients (open_clip's ``ClipLoss``; rank and world size are passed explicitly).

Shape legend: B local batch, E CLIP embedding width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss as _OpenClipLoss
from torch.nn import functional as F

__all__ = ["ClipLoss", "hard_negative_loss"]


class ClipLoss(_OpenClipLoss):
    """Symmetric InfoNCE: (CE(s I T_all^T, labels) + CE(s T I_all^T, labels)) / 2 on this process's rows.

    With ``world_size > 1`` the features of all processes are all-gathered (with gradients when
    ``gather_with_grad``) and the labels of rank r are ``arange(B) + B r``. The mean of the per-rank losses then
    equals the full-batch loss, and after DDP's gradient averaging the parameter gradients are those of the
    full-batch loss. Every rank must use the same local batch size. Release: local_loss=True,
    gather_with_grad=True.

    ``forward(image_features_BE, text_features_BE, logit_scale)`` -> scalar; features are expected to be
    L2-normalised; ``logit_scale`` is the already exponentiated temperature (tensor or float).
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_loss: bool = True, gather_with_grad: bool = True
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def forward(
        self,
        image_features_BE: torch.Tensor,
        text_features_BE: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        if image_features_BE.ndim != 2 or image_features_BE.shape != text_features_BE.shape:
            raise ValueError(
                f"expected image and text features of the same shape [B,E], got {list(image_features_BE.shape)} "
                f"and {list(text_features_BE.shape)}"
            )
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"ClipLoss(world_size={self.world_size}) needs an initialised torch.distributed process group"
            )
        return super().forward(image_features_BE, text_features_BE, logit_scale)


def hard_negative_loss(
    image_features_BE: torch.Tensor,
    text_features_BE: torch.Tensor,
    negative_features_BE: torch.Tensor,
    valid_B: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Two-way cross-entropy of each image between its caption and that caption's hard negative (NegCLIP).

    ``-log softmax(s [<I_i,T_i>, <I_i,N_i>])[0]`` averaged over the rows where ``valid_B`` is true (a caption
    that had a word to swap); 0 (with gradients of zero) when no row is valid. The features are expected to
    be L2-normalised, ``logit_scale`` already exponentiated. Every row is local to this process.
    """
    if not image_features_BE.shape == text_features_BE.shape == negative_features_BE.shape:
        raise ValueError(
            "expected image, caption and negative features of one shape [B,E], got "
            f"{list(image_features_BE.shape)}, {list(text_features_BE.shape)}, {list(negative_features_BE.shape)}"
        )
    if valid_B.shape != image_features_BE.shape[:1] or valid_B.dtype != torch.bool:
        raise ValueError(
            f"expected a bool mask [{image_features_BE.shape[0]}], got {valid_B.dtype} {list(valid_B.shape)}"
        )
    positive = (image_features_BE * text_features_BE).sum(-1)
    negative = (image_features_BE * negative_features_BE).sum(-1)
    # -log softmax([p, n])[0] = softplus(s (n - p))
    per_row = F.softplus(logit_scale * (negative - positive))
    weights = valid_B.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp_min(1)
