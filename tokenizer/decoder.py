"""The UniTok pixel decoder: ViT blocks over the token grid, then four x2 conv upsampling stages.

Module names follow the released checkpoint (``decoder.blocks``, ``decoder.norm``, ``decoder.up_conv1..4``)
so it loads strictly. Upsampling is nearest x2 followed by a 3x3 conv everywhere (also on the expanded
channels inside the inverted-bottleneck blocks); the output is unbounded (callers clamp at inference).
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import LayerNorm, LayerNorm2d, calculate_drop_path_rates, make_divisible
from timm.models.vision_transformer import Block
from timm.models.vitamin import GeGluMlp
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .config import TokenizerConfig
from .encoder import VIT_ACT_LAYER

_NORM_EPS = 1e-6
_EXPAND_RATIO = 4.0


class Upsample2d(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: ``[B,C_in,H,W] -> [B,C_out,2H,2W]``."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class InvMbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck (1x1 expand, [x2 upsample], depthwise 3x3, 1x1 project) with a shortcut.

    ``[B,in,H,W] -> [B,out,sH,sW]`` for ``upsample`` s in {1, 2}; hidden width ``out * 4``.
    """

    def __init__(self, in_chs: int, out_chs: int, upsample: bool) -> None:
        super().__init__()
        mid_chs = make_divisible(out_chs * _EXPAND_RATIO)
        if upsample:
            self.shortcut = Upsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs, eps=_NORM_EPS)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, kernel_size=1)
        self.act1 = nn.GELU()
        self.up = Upsample2d(mid_chs, mid_chs) if upsample else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid_chs, mid_chs, kernel_size=3, padding=1, groups=mid_chs)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.act1(self.conv1_1x1(self.pre_norm(x))))
        h = self.conv3_1x1(self.act2(self.conv2_kxk(h)))
        return h + self.shortcut(x)


class InvStem(nn.Module):
    """Last stage: x2 upsample conv, LayerNorm2d + GELU, 3x3 conv to RGB: ``[B,C,H,W] -> [B,3,2H,2W]``."""

    def __init__(self, in_chs: int, out_chs: int = 3) -> None:
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs)
        self.norm1 = LayerNorm2d(in_chs, eps=_NORM_EPS)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x))))


def _upsample_stage(in_chs: int, out_chs: int, depth: int) -> nn.Sequential:
    """``depth`` blocks; the first doubles the resolution (and changes the width)."""
    return nn.Sequential(
        *[InvMbConvBlock(in_chs if i == 0 else out_chs, out_chs, upsample=i == 0) for i in range(depth)]
    )


class ViTaminDecoder(nn.Module):
    """``forward(feats_BLC, grid=(h, w)) -> img_B3HW`` with H = 16h, W = 16w, C = ``config.width``.

    ``decoder_depth`` ViT blocks (GeGLU MLP, no position embedding), LayerNorm, then
    up_conv1 (x2, width -> w0), up_conv2 (x2, w0), up_conv3 (x2, w0 -> w1), up_conv4 (x2, w1 -> 3)
    with ``(w0, w1) = config.upsampler_widths``.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths, depths = config.upsampler_widths, config.upsampler_depths
        drop_path = calculate_drop_path_rates(config.drop_path, config.decoder_depth)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=config.width,
                    num_heads=config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=True,
                    drop_path=drop_path[i],
                    norm_layer=LayerNorm,
                    act_layer=VIT_ACT_LAYER,
                    mlp_layer=GeGluMlp,
                )
                for i in range(config.decoder_depth)
            ]
        )
        self.norm = LayerNorm(config.width, eps=_NORM_EPS)
        self.up_conv1 = Upsample2d(config.width, widths[0])
        self.up_conv2 = _upsample_stage(widths[0], widths[0], depths[0])
        self.up_conv3 = _upsample_stage(widths[0], widths[1], depths[1])
        self.up_conv4 = InvStem(widths[1])
        self.grad_checkpointing = config.grad_checkpointing

    def forward(self, feats_BLC: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B,h*w,C]`` in raster order -> image ``[B,3,16h,16w]`` (unbounded)."""
        h, w = grid
        if feats_BLC.ndim != 3 or feats_BLC.shape[1] != h * w:
            raise ValueError(
                f"expected decoder tokens [B,{h * w},C] for a {h}x{w} grid, got {list(feats_BLC.shape)}"
            )
        x = feats_BLC
        for block in self.blocks:
            x = self._run(block, x)
        x = rearrange(self.norm(x), "b (h w) c -> b c h w", h=h, w=w)
        for stage in (self.up_conv1, *self.up_conv2, *self.up_conv3, self.up_conv4):
            x = self._run(stage, x)
        return x

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Activation checkpointing trades recompute for memory; only useful when building a graph.
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def last_layer(self) -> nn.Parameter:
        """The weight of the final RGB conv (``up_conv4.conv2.weight``), used by the adaptive GAN weight."""
        return self.up_conv4.conv2.weight
