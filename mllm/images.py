"""Images given to the unified MLLM: pixel tensors checked against the tokenizer's contract, and the released
model's square padding."""

from __future__ import annotations

from typing import Any

import torch


def check_pixels(img: torch.Tensor) -> torch.Tensor:
    """An image tensor [3,H,W] or [1,3,H,W] with finite values in [-1,1] -> [3,H,W] float32; else ``ValueError``."""
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(
            f"expected an image [3,H,W] or [1,3,H,W] in [-1,1] or codes [h,w,K], got {list(img.shape)}"
        )
    if img.numel() == 0:
        raise ValueError(f"expected a non-empty image, got shape {list(img.shape)}")
    img = img.float()
    if not bool(torch.isfinite(img).all()):
        raise ValueError("the image tensor contains NaN or Inf values; expected finite pixels in [-1,1]")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1.01 or hi > 1.01:
        hint = " (it looks like 0-255 pixels: use img / 127.5 - 1)" if hi > 2 else ""
        raise ValueError(f"expected pixel values in [-1,1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return img.clamp(-1, 1)


def expand_to_square(item: Any, background: tuple[int, int, int] = (122, 116, 104)) -> Any:
    """The image padded to a square (centred) with ``background``: the released model's ``expand2square``."""
    from PIL import Image

    from unitok.data.transforms import to_rgb
    from unitok.tokenizer.preprocess import _as_pil

    image = to_rgb(_as_pil(item))
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
