"""Quantization error: how far the quantized latent lies from the latent the quantizer was given.

Both UniTok quantizers (MCQ and the RQ baseline) first split the projected latent ``z [..., D]`` into K
chunks of ``d = D / K`` channels and L2-normalise each chunk; the MCQ then replaces every chunk by its
nearest (unit-norm) sub-codebook entry, the RQ approximates the whole normalised vector by a sum of K
residual codebook rows. The error measured here is the mean squared error, per latent element, between
that normalised latent and ``codes_to_vectors(codes)``: the quantity the paper compares between MCQ and RQ.

Shape legend: B batch, L positions, D latent width, K sub-codebooks (MCQ) / levels (RQ), d = D / K, N vectors.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .context import autocast, eval_mode


def normalized_latent(z_ND: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """``[..., D]`` latent -> the same shape with each of its K chunks of ``D / K`` channels L2-normalised.

    This is the vector both quantizers approximate (chunk i = channels ``i*d .. i*d+d-1``).
    """
    if z_ND.shape[-1] % num_codebooks:
        raise ValueError(
            f"expected a latent width divisible by num_codebooks={num_codebooks}, got {list(z_ND.shape)}"
        )
    chunks = F.normalize(rearrange(z_ND.float(), "... (k d) -> ... k d", k=num_codebooks), dim=-1)
    return rearrange(chunks, "... k d -> ... (k d)")


@torch.no_grad()
def latent_quantization_error(quantizer: nn.Module, z_ND: torch.Tensor) -> tuple[float, float, int]:
    """Squared quantization error of one batch of latents.

    Args:
        quantizer: a ``MultiCodebookQuantizer`` or ``ResidualQuantizer`` (``quantize``, ``codes_to_vectors``,
            ``num_codebooks``).
        z_ND: ``[..., D]`` latents as the quantizer receives them (after ``quant_proj``, before normalisation).

    Returns:
        ``(sum of squared errors, sum of squared normalised-latent values, number of elements)``, so that
        sums over batches give the exact mean over a whole set.
    """
    target = normalized_latent(z_ND, quantizer.num_codebooks)
    vectors = quantizer.codes_to_vectors(quantizer.quantize(z_ND)).float()
    return float((vectors - target).square().sum()), float(target.square().sum()), target.numel()


@torch.no_grad()
def quantization_error(
    model: nn.Module,
    loader: Iterable,
    max_images: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Mean squared quantization error of a UniTok over the images of ``loader``.

    The latent is ``quant_proj(encoder(img))`` in fp32 (what ``UniTok.encode`` quantizes), normalised per
    chunk as the quantizer sees it (:func:`normalized_latent`), compared with its quantized vector.

    Args:
        model: a UniTok (``encoder``, ``quant_proj``, ``quantizer``); put in eval mode for the pass and restored.
        loader: yields images ``[B,3,H,W]`` in [-1,1], tuples whose first item is that, or ``{"images"}`` dicts.
        max_images: stop after this many images.
        autocast_dtype: run the encoder under autocast with this dtype (``None``: fp32).

    Returns:
        ``{"mse": mean over latent elements, "relative_mse": mse / mean squared normalised latent (fraction of
        the signal energy lost), "num_images", "num_vectors", "seconds"}``.
    """
    device = next(model.parameters()).device
    squared_error = energy = 0.0
    elements = seen = vectors = 0
    start = time.perf_counter()
    with eval_mode(model):
        for batch in loader:
            img_B3HW = batch["images"] if isinstance(batch, dict) else batch
            img_B3HW = img_B3HW[0] if isinstance(img_B3HW, tuple | list) else img_B3HW
            if img_B3HW is None:
                continue
            if max_images is not None:
                img_B3HW = img_B3HW[: max_images - seen]
            img_B3HW = img_B3HW.to(device).float()
            with autocast(device, autocast_dtype):
                feats_BLC = model.encoder(img_B3HW)
            z_BLD = model.quant_proj(feats_BLC.float())
            batch_error, batch_energy, batch_elements = latent_quantization_error(model.quantizer, z_BLD)
            squared_error += batch_error
            energy += batch_energy
            elements += batch_elements
            vectors += z_BLD.shape[0] * z_BLD.shape[1]
            seen += img_B3HW.shape[0]
            if max_images is not None and seen >= max_images:
                break
    if seen == 0:
        raise ValueError("quantization_error got no images from the loader")
    return {
        "mse": squared_error / elements,
        "relative_mse": squared_error / energy,
        "num_images": seen,
        "num_vectors": vectors,
        "seconds": time.perf_counter() - start,
    }
