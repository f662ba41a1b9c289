"""Image conversion for UniTok and the checks at its boundary.

Pixels enter the model as float ``[B,3,H,W]`` in [-1,1] (mean 0.5 / std 0.5 per channel, not CLIP's
statistics), with H = W a multiple of 16. ``load_image`` produces that from a file, a PIL image or a
numpy array; ``to_pil`` turns model output back into 8-bit RGB images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unitok.data.transforms import to_rgb

ImageLike = str | os.PathLike | Image.Image | np.ndarray

_PATCH = 16
# Pixels may overshoot [-1,1] a little after a bicubic or antialiased resize of a tensor; beyond this they
# are in another range (0-255, or unnormalised), which the encoder would quantize to garbage without a sign.
PIXEL_RANGE_TOLERANCE = 0.25


def _as_pil(source: ImageLike) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 array [H,W] or [H,W,C] with C in (1,3,4), got dtype {source.dtype}"
            )
        if source.ndim == 3 and source.shape[2] == 1:
            source = source[..., 0]
        if not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))):
            raise ValueError(
                f"expected a uint8 array [H,W] or [H,W,C] with C in (1,3,4), got shape {list(source.shape)}"
            )
        return Image.fromarray(source)
    if isinstance(source, str | os.PathLike):
        with Image.open(Path(source)) as opened:
            opened.load()
            return opened.copy()
    raise ValueError(f"expected a path, a PIL image or a numpy array, got {type(source).__name__}")


def load_image(source: ImageLike, size: int = 256) -> torch.Tensor:
    """One image -> FloatTensor ``[3,size,size]`` in [-1,1].

    Converts to RGB, resizes the short side to ``size`` (bicubic) and centre-crops the long side.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int (a multiple of {_PATCH} for UniTok), got {size!r}")
    image = to_rgb(_as_pil(source))
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(img: torch.Tensor) -> list[Image.Image]:
    """``[3,H,W]`` or ``[B,3,H,W]`` in [-1,1] (clamped) -> list of RGB PIL images."""
    if img.ndim == 3:
        img = img.unsqueeze(0)
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"expected images of shape [3,H,W] or [B,3,H,W], got {list(img.shape)}")
    pixels = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def check_images(img: torch.Tensor, square: bool = False, multiple: int = _PATCH) -> None:
    """Raise ValueError unless ``img`` is a float ``[B,3,H,W]`` with H, W multiples of ``multiple`` (the
    tokenizer's patch size, 16 in the release) and H == W if ``square``."""
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"expected a tensor of images [B,3,H,W], got {type(img).__name__}")
    shape = list(img.shape)
    if img.ndim != 4 or shape[1] != 3 or shape[2] % multiple or shape[3] % multiple or 0 in shape:
        raise ValueError(
            f"expected images of shape [B,3,H,W] with H and W multiples of {multiple}, got {_fmt(shape)}"
        )
    if not img.is_floating_point():
        hint = " (0-255 pixels: img.float() / 127.5 - 1)" if img.dtype == torch.uint8 else ""
        raise ValueError(f"expected floating-point images in [-1,1], got dtype {img.dtype}{hint}")
    if square and shape[2] != shape[3]:
        raise ValueError(
            f"expected square images (H == W), got {_fmt(shape)}; the decoder assumes a square "
            f"code grid: resize or crop first (e.g. with unitok.tokenizer.preprocess.load_image)"
        )


def check_pixel_values(img: torch.Tensor) -> None:
    """Raise ValueError if ``img`` holds NaN/Inf or values outside [-1,1] by more than ``PIXEL_RANGE_TOLERANCE``.

    One NaN pixel spreads through the attention of every position and zeroes the whole code grid, and
    0-255 pixels quantize to garbage; both are refused with a message saying what was found.
    """
    finite = torch.isfinite(img)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"expected finite pixel values in [-1,1], got {bad} NaN/Inf value(s) in images of shape {_fmt(list(img.shape))}"
        )
    if img.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(img.detach()))
    limit = 1.0 + PIXEL_RANGE_TOLERANCE
    if low < -limit or high > limit:
        hint = (
            "; these look like 0-255 pixels: use img / 127.5 - 1 (or unitok.tokenizer.preprocess.load_image)"
            if low >= 0 and high > 2
            else ""
        )
        raise ValueError(f"expected pixel values in [-1,1], got values in [{low:.4g}, {high:.4g}]{hint}")


def check_codes(codes: torch.Tensor, num_codebooks: int, codebook_size: int) -> None:
    """Raise ValueError unless ``codes`` is an integer ``[B,h,w,K]`` with h == w and values in [0, V)."""
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"expected a LongTensor of codes [B,h,w,K], got {type(codes).__name__}")
    shape = list(codes.shape)
    if codes.ndim != 4 or shape[-1] != num_codebooks:
        raise ValueError(f"expected codes of shape [B,h,w,K] with K = {num_codebooks}, got {_fmt(shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
    if shape[1] != shape[2]:
        raise ValueError(f"expected a square code grid (h == w), got {_fmt(shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"codes out of range: expected values in [0, {codebook_size}), "
            f"got min {int(codes.min())}, max {int(codes.max())}"
        )


def _fmt(shape: list[int]) -> str:
    return "[" + ",".join(str(n) for n in shape) + "]"
