"""Differentiable augmentation for the discriminator inputs (DiffAugment policy as used by StyleGAN-T / UniTok).

Every operation is differentiable with respect to the image, so the generator still receives gradients through
the augmented fakes. Shape legend: B batch, C channels, H/W image height/width in pixels.

Policy (release values): with probability ``prob`` each (one coin per call for the whole batch, random amounts
per sample): integer translation by up to ``translation`` x size with zero fill; colour (brightness + U(-0.5, 0.5),
saturation x U(0, 2), contrast x U(0.5, 1.5)); cutout of a ``cutout`` x size rectangle. An optional separable
Gaussian-like blur runs first; its width fades out during the discriminator warm-up (see ``gan.blur_fade_schedule``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "adjust_color",
    "blur_kernel",
    "blur_sigma_from_fade",
    "cutout",
    "diff_augment",
    "gaussian_blur",
    "translate",
]


def _check_images(img_BCHW: torch.Tensor, name: str = "img_BCHW") -> None:
    if img_BCHW.ndim != 4:
        raise ValueError(f"expected {name} of shape [B,C,H,W], got {list(img_BCHW.shape)}")


def _check_per_sample(value_B: torch.Tensor, batch: int, name: str) -> None:
    if value_B.shape != (batch,):
        raise ValueError(
            f"expected {name} of shape [{batch}] (one value per sample), got {list(value_B.shape)}"
        )


def blur_sigma_from_fade(image_size: int, fade: float) -> float:
    """Blur width in pixels for a discriminator input of height ``image_size``: sqrt(image_size / 2) * fade.

    ``fade`` in [0, 1] comes from ``gan.blur_fade_schedule`` (1 at the discriminator start, 0 after it faded out).
    """
    if image_size <= 0:
        raise ValueError(f"expected a positive image_size, got {image_size}")
    if not 0.0 <= fade <= 1.0:
        raise ValueError(f"expected fade in [0, 1], got {fade}")
    return math.sqrt(image_size / 2) * fade


def blur_kernel(sigma: float) -> torch.Tensor:
    """1-D blur kernel [2r+1] proportional to 2^(-(x/sigma)^2) for integer x in [-r, r], r = floor(3 sigma).

    Sums to 1. For r == 0 (sigma < 1/3, including 0) it is the identity kernel ``tensor([1.])``.
    """
    if sigma < 0:
        raise ValueError(f"expected a non-negative blur sigma, got {sigma}")
    radius = math.floor(3 * sigma)
    if radius == 0:
        return torch.ones(1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp2(-((x / sigma) ** 2))
    return kernel / kernel.sum()


def gaussian_blur(img_BCHW: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable blur with ``blur_kernel(sigma)`` along H then W, reflect padding; same shape as the input.

    Raises ValueError when the kernel radius is not smaller than H and W (reflect padding needs it).
    """
    _check_images(img_BCHW)
    kernel = blur_kernel(sigma).to(device=img_BCHW.device, dtype=img_BCHW.dtype)
    radius = (kernel.numel() - 1) // 2
    if radius == 0:
        return img_BCHW
    channels, height, width = img_BCHW.shape[1:]
    if radius >= min(height, width):
        raise ValueError(
            f"blur radius {radius} (sigma {sigma:g}) must be smaller than the image size {height}x{width}"
        )
    padded = F.pad(img_BCHW, (radius, radius, radius, radius), mode="reflect")
    kernel_h = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    kernel_w = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    blurred = F.conv2d(padded, kernel_h, groups=channels)
    return F.conv2d(blurred, kernel_w, groups=channels)


def translate(img_BCHW: torch.Tensor, shift_h_B: torch.Tensor, shift_w_B: torch.Tensor) -> torch.Tensor:
    """Shift each image by an integer number of pixels, filling uncovered pixels with 0.

    ``out[b, :, i, j] = img[b, :, i - shift_h[b], j - shift_w[b]]`` (content moves down/right for positive
    shifts). ``shift_h_B``/``shift_w_B``: integer tensors [B].
    """
    _check_images(img_BCHW)
    batch, _, height, width = img_BCHW.shape
    _check_per_sample(shift_h_B, batch, "shift_h_B")
    _check_per_sample(shift_w_B, batch, "shift_w_B")
    device = img_BCHW.device
    src_rows_BH = torch.arange(height, device=device)[None, :] - shift_h_B.to(device).long()[:, None]
    src_cols_BW = torch.arange(width, device=device)[None, :] - shift_w_B.to(device).long()[:, None]
    valid_BHW = ((src_rows_BH >= 0) & (src_rows_BH < height))[:, :, None] & (
        (src_cols_BW >= 0) & (src_cols_BW < width)
    )[:, None, :]
    batch_idx = torch.arange(batch, device=device)[:, None, None]
    gathered_BHWC = img_BCHW[
        batch_idx,
        :,
        src_rows_BH.clamp(0, height - 1)[:, :, None],
        src_cols_BW.clamp(0, width - 1)[:, None, :],
    ]
    return rearrange(gathered_BHWC, "b h w c -> b c h w") * valid_BHW[:, None].to(img_BCHW.dtype)


def adjust_color(
    img_BCHW: torch.Tensor, brightness_B: torch.Tensor, saturation_B: torch.Tensor, contrast_B: torch.Tensor
) -> torch.Tensor:
    """Per-sample colour jitter, in this order: add ``brightness``; scale the deviation from the per-pixel channel
    mean by ``saturation``; scale the deviation from the per-image mean (over C, H, W) by ``contrast``.

    The three factors are float tensors [B]; (0, 1, 1) is the identity.
    """
    _check_images(img_BCHW)
    batch = img_BCHW.shape[0]
    for name, value in (
        ("brightness_B", brightness_B),
        ("saturation_B", saturation_B),
        ("contrast_B", contrast_B),
    ):
        _check_per_sample(value, batch, name)
    out = img_BCHW + brightness_B.view(-1, 1, 1, 1)
    pixel_mean = out.mean(dim=1, keepdim=True)
    out = (out - pixel_mean) * saturation_B.view(-1, 1, 1, 1) + pixel_mean
    image_mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - image_mean) * contrast_B.view(-1, 1, 1, 1) + image_mean


def cutout(
    img_BCHW: torch.Tensor, center_h_B: torch.Tensor, center_w_B: torch.Tensor, size_hw: tuple[int, int]
) -> torch.Tensor:
    """Zero a ``size_hw`` rectangle per image: rows [c_h - s_h // 2, c_h - s_h // 2 + s_h) and the same for
    columns, clipped to the image. ``center_h_B``/``center_w_B``: integer tensors [B]."""
    _check_images(img_BCHW)
    batch, _, height, width = img_BCHW.shape
    _check_per_sample(center_h_B, batch, "center_h_B")
    _check_per_sample(center_w_B, batch, "center_w_B")
    device = img_BCHW.device
    top_B = center_h_B.to(device).long() - size_hw[0] // 2
    left_B = center_w_B.to(device).long() - size_hw[1] // 2
    rows_BH = torch.arange(height, device=device)[None, :] - top_B[:, None]
    cols_BW = torch.arange(width, device=device)[None, :] - left_B[:, None]
    inside_BHW = ((rows_BH >= 0) & (rows_BH < size_hw[0]))[:, :, None] & (
        (cols_BW >= 0) & (cols_BW < size_hw[1])
    )[:, None, :]
    return img_BCHW * (~inside_BHW)[:, None].to(img_BCHW.dtype)


def diff_augment(
    img_BCHW: torch.Tensor,
    blur_sigma: float = 0.0,
    prob: float = 1.0,
    cutout_ratio: float = 0.2,
    translation_ratio: float = 0.125,
) -> torch.Tensor:
    """Blur (when ``blur_sigma`` > 0) then randomly translate, colour-jitter and cut out, in float32.

    Args:
        img_BCHW: images [B,C,H,W] in [-1, 1]; any float dtype (computed in float32, like the reference).
        blur_sigma: blur width in pixels (``blur_sigma_from_fade(H, fade)``); 0 disables the blur.
        prob: probability of applying each of translation / colour / cutout (one draw per call).
        cutout_ratio: side of the cut-out rectangle as a fraction of H and W (release 0.2; 0 disables it).
        translation_ratio: largest shift as a fraction of H and W (release 0.125).
    Returns:
        float32 tensor [B,C,H,W]; the random draws use torch's global generator.
    """
    _check_images(img_BCHW)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"expected prob in [0, 1], got {prob}")
    if not 0.0 <= cutout_ratio <= 1.0 or not 0.0 <= translation_ratio <= 1.0:
        raise ValueError(
            f"expected ratios in [0, 1], got cutout {cutout_ratio}, translation {translation_ratio}"
        )
    out = img_BCHW.float()
    if blur_sigma > 0:
        out = gaussian_blur(out, blur_sigma)
    use_translation, use_color, use_cutout = (torch.rand(3) < prob).tolist()
    batch, _, height, width = out.shape
    device = out.device
    if use_translation:
        max_h, max_w = round(height * translation_ratio), round(width * translation_ratio)
        shift_h = torch.randint(-max_h, max_h + 1, (batch,), device=device)
        shift_w = torch.randint(-max_w, max_w + 1, (batch,), device=device)
        out = translate(out, shift_h, shift_w)
    if use_color:
        brightness, saturation, contrast = torch.rand(3, batch, device=device)
        out = adjust_color(out, brightness - 0.5, saturation * 2, contrast + 0.5)
    cut_h, cut_w = round(height * cutout_ratio), round(width * cutout_ratio)
    if use_cutout and cut_h > 0 and cut_w > 0:
        # one more centre position for even sizes, so the hole overlaps the top/left and bottom/right borders equally
        center_h = torch.randint(0, height + 1 - cut_h % 2, (batch,), device=device)
        center_w = torch.randint(0, width + 1 - cut_w % 2, (batch,), device=device)
        out = cutout(out, center_h, center_w, (cut_h, cut_w))
    return out
