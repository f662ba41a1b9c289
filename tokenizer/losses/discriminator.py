"""DINOv2 discriminator: a frozen DINOv2 ViT (timm) with small trainable 1-D conv heads on tapped token features.

Shape legend: B batch, H/W image size in pixels, N patch tokens of the backbone, C backbone width,
T taps (blocks read), so the output is [B, T*N] per-token logits.

The frozen backbone is held in a plain list, so it is neither in ``state_dict()`` nor in ``parameters()`` (the
optimizer, DDP and checkpoints only see the heads), yet gradients flow through it to the input images.
``.to()``/``.cuda()``/``.half()`` still move it (``_apply`` override).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .perceptual import load_weights_file

__all__ = [
    "DISC_PRESETS",
    "DinoDiscConfig",
    "DinoDiscriminator",
    "dinov2_to_timm",
    "resample_pos_embed",
]

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DinoDiscConfig:
    """Discriminator configuration (saved with the trainer's checkpoints via ``to_dict``).

    Attributes:
        backbone: timm model name of the DINOv2 trunk (patch 14).
        image_size: size of the images the discriminator sees; the backbone's grid is built for the largest
            multiple of the patch size not above it (256 -> 252 = 18 x 14), other sizes still work.
        depth, embed_dim, num_heads: backbone shape (release ViT-S/14: 12, 384, 6); smaller for tests.
        taps: blocks whose outputs (patch tokens + class token, before the final norm) feed one head each.
        kernel_size: width of the circular residual conv in each head (odd).
        norm_groups: GroupNorm groups in the heads; must divide ``embed_dim``.
        crop_prob: chance of reaching the backbone size by a random crop instead of area resizing.
        init_gain: xavier-normal gain of the head convs (release 0.5).
    """

    backbone: str = "vit_small_patch14_dinov2"
    image_size: int = 256
    depth: int = 12
    embed_dim: int = 384
    num_heads: int = 6
    taps: tuple[int, ...] = (0, 2, 5, 8, 11)
    kernel_size: int = 9
    norm_groups: int = 32
    norm_eps: float = 1e-6
    crop_prob: float = 0.5
    init_gain: float = 0.5

    def __post_init__(self) -> None:
        self.taps = tuple(int(t) for t in self.taps)
        if self.image_size < 14:
            raise ValueError(f"expected image_size >= 14 (one DINOv2 patch), got {self.image_size}")
        if (
            not self.taps
            or list(self.taps) != sorted(set(self.taps))
            or not 0 <= self.taps[0] <= self.taps[-1] < self.depth
        ):
            raise ValueError(
                f"expected distinct increasing taps within [0, depth={self.depth}), got {self.taps}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.embed_dim % self.norm_groups:
            raise ValueError(f"norm_groups {self.norm_groups} must divide embed_dim {self.embed_dim}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"expected an odd kernel_size, got {self.kernel_size}")
        if not 0.0 <= self.crop_prob <= 1.0:
            raise ValueError(f"expected crop_prob in [0, 1], got {self.crop_prob}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DinoDiscConfig:
        """A named configuration from ``DISC_PRESETS`` with optional field overrides."""
        if name not in DISC_PRESETS:
            raise ValueError(f"unknown discriminator preset {name!r}; expected one of {sorted(DISC_PRESETS)}")
        return replace(DISC_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["taps"] = list(self.taps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DinoDiscConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown discriminator config keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        return cls(**data)


DISC_PRESETS: dict[str, DinoDiscConfig] = {
    # the release: DINOv2 ViT-S/14, 5 taps, 7.39 M trainable parameters in the heads
    "dinov2-small": DinoDiscConfig(),
    # random tiny backbone for tests and the quick start
    "tiny": DinoDiscConfig(
        image_size=32, depth=3, embed_dim=64, num_heads=2, taps=(0, 2), kernel_size=3, norm_groups=8
    ),
}


def resample_pos_embed(
    pos_embed_1LC: torch.Tensor, grid_hw: tuple[int, int], num_prefix_tokens: int = 1, offset: float = 0.1
) -> torch.Tensor:
    """Resize a square absolute position embedding [1, prefix + M*M, C] to ``grid_hw`` the way DINOv2 does.

    Bicubic, no antialiasing, with the scale factor (grid + offset) / M (DINOv2's ``interpolate_offset`` 0.1),
    so loaded weights see the same positions as in the reference discriminator. Prefix (class) tokens are kept.
    Returns the input unchanged when the grid already matches.
    """
    prefix, patch = pos_embed_1LC[:, :num_prefix_tokens], pos_embed_1LC[:, num_prefix_tokens:]
    side = math.isqrt(patch.shape[1])
    if side * side != patch.shape[1]:
        raise ValueError(f"expected a square grid of position embeddings, got {patch.shape[1]} positions")
    if (side, side) == tuple(grid_hw):
        return pos_embed_1LC
    grid = rearrange(patch.float(), "1 (h w) c -> 1 c h w", h=side)
    scale = ((grid_hw[0] + offset) / side, (grid_hw[1] + offset) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(grid.shape[-2:]) != tuple(grid_hw):
        raise ValueError(
            f"position-embedding resize gave {tuple(grid.shape[-2:])}, expected {tuple(grid_hw)}"
        )
    patch = rearrange(grid, "1 c h w -> 1 (h w) c").to(pos_embed_1LC.dtype)
    return torch.cat([prefix, patch], dim=1)


def dinov2_to_timm(state_dict: dict[str, torch.Tensor], grid_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Map a DINOv2 ViT state dict to a timm ``vit_*_patch14_dinov2`` built for the patch grid ``grid_hw``.

    Accepts the official layout (``dinov2_vits14_pretrain.pth``: timm's key names plus ``mask_token``, which is
    dropped) and the timm layout. The position embedding (official: 37 x 37 for 518 px) is resized with
    ``resample_pos_embed``. Checkpoints with registers, SwiGLU MLPs or chunked blocks are not supported.
    """
    unsupported = [
        k for k in state_dict if k == "register_tokens" or ".w12." in k or k.startswith("blocks.0.0.")
    ]
    if unsupported:
        raise ValueError(f"unsupported DINOv2 variant (registers / SwiGLU / block chunks): {unsupported[:3]}")
    mapped = {key: value for key, value in state_dict.items() if key != "mask_token"}
    if "pos_embed" not in mapped:
        raise ValueError(f"not a DINOv2 ViT state dict: no 'pos_embed' among {sorted(mapped)[:4]} ...")
    mapped["pos_embed"] = resample_pos_embed(mapped["pos_embed"], grid_hw)
    return mapped


class _Residual(nn.Module):
    """(fn(x) + x) / sqrt(2)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def _conv_block(channels: int, kernel_size: int, groups: int, eps: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        nn.GroupNorm(groups, channels, eps=eps),
        nn.LeakyReLU(0.2),
    )


def _make_head(config: DinoDiscConfig) -> nn.Sequential:
    """[B, C, N] -> [B, 1, N]. Child names match the reference (``heads.{h}.0.0``, ``.1.fn.0``, ``.2``)."""
    width = config.embed_dim
    return nn.Sequential(
        _conv_block(width, 1, config.norm_groups, config.norm_eps),
        _Residual(_conv_block(width, config.kernel_size, config.norm_groups, config.norm_eps)),
        nn.Conv1d(width, 1, kernel_size=1),
    )


class DinoDiscriminator(nn.Module):
    """Per-token discriminator on a frozen DINOv2 ViT; ``forward(img_B3HW)`` -> logits [B, T*N] float32.

    Args:
        config: ``DinoDiscConfig`` (default: the release, ``DinoDiscConfig.preset("dinov2-small")``).
        backbone_path: DINOv2 weights to load (official ``dinov2_vits14_pretrain.pth`` or timm layout,
            torch or safetensors file); see ``load_backbone``.
        from_hub: download the timm DINOv2 weights instead (only with the release backbone shape).
    Without either, the backbone stays random (fine for tests, useless for training; a warning is logged).

    Input [-1, 1] -> ImageNet normalisation (float32) -> resize to a multiple of 14: a random crop with
    probability ``crop_prob`` when both sides are larger, else area resizing (bicubic when a side is already a
    multiple) -> backbone blocks ``taps`` -> (patch tokens + class token) [B, C, N] -> one head per tap.
    """

    def __init__(
        self,
        config: DinoDiscConfig | None = None,
        backbone_path: str | os.PathLike | None = None,
        from_hub: bool = False,
    ) -> None:
        super().__init__()
        self.config = config = config or DinoDiscConfig()
        if backbone_path is not None and from_hub:
            raise ValueError("pass either backbone_path or from_hub=True, not both")
        backbone = timm.create_model(
            config.backbone,
            pretrained=from_hub,
            num_classes=0,
            img_size=config.image_size // 14 * 14,
            depth=config.depth,
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            dynamic_img_size=True,
        )
        patch = backbone.patch_embed.patch_size
        if tuple(patch) != (14, 14):
            raise ValueError(
                f"expected a patch-14 DINOv2 backbone, {config.backbone!r} has patch size {patch}"
            )
        backbone.requires_grad_(False)
        backbone.eval()
        # a plain list hides the frozen backbone from state_dict(), parameters(), DDP and the optimizer
        self._backbone: list[nn.Module] = [backbone]
        if backbone_path is not None:
            self.load_backbone(backbone_path)
        elif not from_hub:
            logger.warning(
                "DinoDiscriminator backbone is randomly initialised (no backbone_path, from_hub=False)"
            )

        self.register_buffer("x_scale", (0.5 / torch.tensor(_IMAGENET_STD)).view(1, 3, 1, 1))
        self.register_buffer(
            "x_shift", ((0.5 - torch.tensor(_IMAGENET_MEAN)) / torch.tensor(_IMAGENET_STD)).view(1, 3, 1, 1)
        )
        self.heads = nn.ModuleList(_make_head(config) for _ in config.taps)
        self._init_heads()

    @property
    def backbone(self) -> nn.Module:
        """The frozen timm DINOv2 ViT (not a registered submodule)."""
        return self._backbone[0]

    def _init_heads(self) -> None:
        for module in self.heads.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.xavier_normal_(module.weight, gain=self.config.init_gain)
                nn.init.zeros_(module.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DinoDiscriminator:
        # torch routes .to()/.cuda()/.half()/.float() through _apply; the hidden backbone must follow
        super()._apply(fn, recurse)
        self.backbone._apply(fn, recurse)
        return self

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Load DINOv2 weights strictly into the frozen backbone (mapped by ``dinov2_to_timm``)."""
        grid = self.backbone.patch_embed.grid_size
        state_dict = dinov2_to_timm(load_weights_file(path), tuple(grid))
        self.backbone.load_state_dict(state_dict, strict=True)
        self.backbone.requires_grad_(False)
        logger.info("loaded DINOv2 backbone weights from %s", path)

    def _to_backbone_input(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        x = img_B3HW.float() * self.x_scale + self.x_shift
        height, width = x.shape[-2:]
        target_h, target_w = height // 14 * 14, width // 14 * 14
        if (target_h, target_w) == (height, width):
            return x
        if height > target_h and width > target_w:
            if torch.rand(()).item() < self.config.crop_prob:
                top = int(torch.randint(0, height - target_h + 1, ()))
                left = int(torch.randint(0, width - target_w + 1, ()))
                return x[..., top : top + target_h, left : left + target_w]
            return F.interpolate(x, size=(target_h, target_w), mode="area")
        return F.interpolate(x, size=(target_h, target_w), mode="bicubic")

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3 or min(img_B3HW.shape[-2:]) < 14:
            raise ValueError(
                f"expected images [B,3,H,W] in [-1,1] with H, W >= 14, got {list(img_B3HW.shape)}"
            )
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            x = self._to_backbone_input(img_B3HW)
        taps = self.backbone.get_intermediate_layers(
            x, n=list(self.config.taps), return_prefix_tokens=True, norm=False
        )
        logits = []
        for (patch_BNC, cls_B1C), head in zip(taps, self.heads):
            tokens_BCN = rearrange(patch_BNC.float() + cls_B1C.float(), "b n c -> b c n")
            logits.append(rearrange(head(tokens_BCN), "b 1 n -> b n"))
        return torch.cat(logits, dim=1).float()
