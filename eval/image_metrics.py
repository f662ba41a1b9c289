"""Per-image reconstruction metrics: PSNR and SSIM (LPIPS comes from ``unitok.tokenizer.losses``).

Both take images in the project's range [-1,1] with ``data_range=2.0`` by default. PSNR and SSIM are
invariant to a common affine rescaling of images and range (SSIM's constants scale with the
range), so the values equal those computed on [0,1] images with range 1 or on uint8 images with
range 255.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"{name} expects two image batches of one shape [B,C,H,W], got {list(a.shape)} and {list(b.shape)}"
        )


def psnr(img_a_B3HW: torch.Tensor, img_b_B3HW: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: ``10 log10(range^2 / MSE)``.

    Args:
        img_a_B3HW, img_b_B3HW: image batches [B,C,H,W] (default range [-1,1]).
        data_range: max - min of the pixel range (2 for [-1,1], 1 for [0,1], 255 for uint8).

    Returns:
        [B] float64; ``inf`` for identical images.
    """
    _check_pair(img_a_B3HW, img_b_B3HW, "psnr")
    mse = (img_a_B3HW.double() - img_b_B3HW.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    img_a_B3HW: torch.Tensor,
    img_b_B3HW: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), averaged over channels and positions.

    Gaussian window 11x11 with sigma 1.5, ``C1 = (0.01 range)^2``, ``C2 = (0.03 range)^2``, population
    (biased) local variances, and only the positions where the window fits inside the image (the
    same numbers as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False, channel_axis=0)``).

    Args:
        img_a_B3HW, img_b_B3HW: image batches [B,C,H,W] with H, W >= window_size.
        data_range: max - min of the pixel range (2 for [-1,1]).

    Returns:
        [B] float64 in [-1,1]; 1 for identical images.
    """
    _check_pair(img_a_B3HW, img_b_B3HW, "ssim")
    if min(img_a_B3HW.shape[-2:]) < window_size:
        raise ValueError(
            f"ssim needs images of at least {window_size}x{window_size}, got {list(img_a_B3HW.shape)}"
        )
    a, b = img_a_B3HW.double(), img_b_B3HW.double()
    # The five local moments in one separable Gaussian pass (depthwise, no padding): along H, then W.
    moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    channels = moments.shape[1]
    g = _gaussian_window(window_size, sigma).to(moments.device)
    moments = F.conv2d(moments, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    moments = F.conv2d(moments, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    mu_a, mu_b, e_aa, e_bb, e_ab = moments.chunk(5, dim=1)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov_ab = e_ab - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)
