"""Image transforms: PIL image -> FloatTensor [3, S, S] in [-1, 1] (UniTok's normalisation, mean = std = 0.5).

``train_transform`` follows UniTok's CLIP-style training crop (RandomResizedCrop with scale
(0.9, 1.0), bicubic); ``eval_transform`` resizes the short side and centre-crops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

_INTERPOLATIONS: dict[str, T.InterpolationMode] = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
    "lanczos": T.InterpolationMode.LANCZOS,
}

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _interpolation(name: str) -> T.InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {name!r}")
    return _INTERPOLATIONS[name]


# Pillow's high-bit-depth greyscale modes; ``convert("RGB")`` clips them at 255 (a 16-bit image turns white).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels (RGBA, LA, palette with transparency) over white.

    16-bit greyscale (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs) is scaled from [0, 65535] to
    8 bits; float greyscale (``F``) from [0, 1], or from [0, 255] when its values exceed 1.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode != "F" else (255.0 if values.max(initial=0.0) <= 1.0 else 1.0)
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def to_pm1(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> FloatTensor [3, H, W] in [-1, 1], no resizing."""
    return T.functional.to_tensor(to_rgb(image)).mul_(2.0).sub_(1.0)


def train_transform(
    size: int, scale: tuple[float, float] = (0.9, 1.0), interpolation: str = "bicubic"
) -> ImageTransform:
    """RandomResizedCrop(size, scale, aspect ratio 3/4..4/3) -> [3, size, size] in [-1, 1]."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(size, scale=scale, interpolation=_interpolation(interpolation)),
            to_pm1,
        ]
    )


def eval_transform(size: int, resize_ratio: float = 1.0, interpolation: str = "bicubic") -> ImageTransform:
    """Resize the short side to ``round(size * resize_ratio)``, centre-crop ``size`` -> [3, size, size] in [-1, 1]."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if resize_ratio < 1.0:
        raise ValueError(f"resize_ratio must be >= 1 (the crop must fit), got {resize_ratio}")
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize(round(size * resize_ratio), interpolation=_interpolation(interpolation)),
            T.CenterCrop(size),
            to_pm1,
        ]
    )
