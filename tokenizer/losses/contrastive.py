"""CLIP contrastive loss between image and text embeddings, local-loss form with features gathered across
processes with gradients (open_clip's ``ClipLoss``; rank and world size are passed explicitly).

Shape legend: B local batch, E CLIP embedding width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss as _OpenClipLoss

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
    negative_features_BNE: torch.Tensor,
    valid_BN: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Cross-entropy of each image over its caption and that caption's hard negatives (NegCLIP).

    ``-log softmax(s [<I_i,T_i>, <I_i,N_i1>, ..., <I_i,N_iN>])[0]`` with the negatives where ``valid_BN`` is
    false left out (a caption that had no word to swap), averaged over the rows with at least one valid
    negative; 0 (with gradients of zero) when there is none. One negative per row may come as ``[B,E]`` with
    a ``[B]`` mask. The features are expected to be L2-normalised, ``logit_scale`` already exponentiated.
    Every row is local to this process.
    """
    if negative_features_BNE.ndim == 2:
        negative_features_BNE, valid_BN = negative_features_BNE.unsqueeze(1), valid_BN.unsqueeze(1)
    batch, width = image_features_BE.shape if image_features_BE.ndim == 2 else (None, None)
    if (
        batch is None
        or text_features_BE.shape != image_features_BE.shape
        or negative_features_BNE.ndim != 3
        or negative_features_BNE.shape[0] != batch
        or negative_features_BNE.shape[2] != width
    ):
        raise ValueError(
            "expected image and caption features [B,E] and negative features [B,N,E] (or [B,E]), got "
            f"{list(image_features_BE.shape)}, {list(text_features_BE.shape)}, {list(negative_features_BNE.shape)}"
        )
    if valid_BN.shape != negative_features_BNE.shape[:2] or valid_BN.dtype != torch.bool:
        raise ValueError(
            f"expected a bool mask {list(negative_features_BNE.shape[:2])}, got {valid_BN.dtype} {list(valid_BN.shape)}"
        )
    positive_B = (image_features_BE * text_features_BE).sum(-1)
    negative_BN = torch.einsum("be,bne->bn", image_features_BE, negative_features_BNE)
    logits = logit_scale * torch.cat([positive_B[:, None], negative_BN], dim=1)
    keep = torch.cat([valid_BN.new_ones(batch, 1), valid_BN], dim=1)
    per_row = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=1) - logits[:, 0]
    weights = valid_BN.any(dim=1).to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp_min(1)
