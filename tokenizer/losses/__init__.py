"""Training losses of the UniTok tokenizer (reference section 3): pixel L1/L2, LPIPS, CLIP contrastive loss,
hinge GAN losses with the adaptive weight and schedules, the DINOv2 discriminator and DiffAugment.

All weights are arguments; the trainer passes them from its run config. Nothing here touches a process group
or downloads anything at import time.
"""

from .contrastive import ClipLoss, hard_negative_loss
from .diffaug import (
    adjust_color,
    blur_kernel,
    blur_sigma_from_fade,
    cutout,
    diff_augment,
    gaussian_blur,
    translate,
)
from .discriminator import DISC_PRESETS, DinoDiscConfig, DinoDiscriminator, dinov2_to_timm, resample_pos_embed
from .gan import (
    AdaptiveGanGrads,
    DiscriminatorLoss,
    adaptive_gan_grads,
    adaptive_gan_weight,
    blur_fade_schedule,
    discriminator_loss,
    gan_schedule,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
)
from .perceptual import LPIPS, load_weights_file, torchvision_to_lpips_trunk
from .pixel import PixelLoss, ReconstructionLoss, ReconstructionOutput, pixel_loss

__all__ = [
    "DISC_PRESETS",
    "LPIPS",
    "AdaptiveGanGrads",
    "ClipLoss",
    "DinoDiscConfig",
    "DinoDiscriminator",
    "DiscriminatorLoss",
    "PixelLoss",
    "ReconstructionLoss",
    "ReconstructionOutput",
    "adaptive_gan_grads",
    "adaptive_gan_weight",
    "adjust_color",
    "blur_fade_schedule",
    "blur_kernel",
    "blur_sigma_from_fade",
    "cutout",
    "diff_augment",
    "dinov2_to_timm",
    "discriminator_loss",
    "gan_schedule",
    "gaussian_blur",
    "generator_loss",
    "hard_negative_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "load_weights_file",
    "pixel_loss",
    "resample_pos_embed",
    "torchvision_to_lpips_trunk",
    "translate",
]
