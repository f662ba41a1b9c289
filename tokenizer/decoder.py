"""The UniTok pixel decoder: ViT blocks over the token grid, then four x2 conv upsampling stages.

Module names follow the released checkpoint (``decoder.blocks``, ``decoder.norm``, ``decoder.up_conv1..4``)
so it loads strictly. Upsampling is nearest x2 followed by a 3x3 conv everywhere (also on the expanded
channels inside the inverted-bottleneck blocks); the output is unbounded (callers clamp at inference).
By default each such upsampling runs as the equal stride-2 transposed conv with a 4x4 kernel folded from
the 3x3 one (``Upsample2d``); the parameters stay the 3x3 conv's, so weights and gradients are unchanged.
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


def _fold_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Fold the 3 taps ``(w0, w1, w2)`` along ``dim`` into the 4 taps ``(w2, w1 + w2, w0 + w1, w0)``.

    Why: after a nearest x2 upsample, output row 2i of a 3x3 conv (padding 1) reads input rows (i-1, i, i)
    and row 2i+1 reads (i, i, i+1). A transposed conv with stride 2, padding 1 and 4 taps k gives output
    row 2i - 1 + k from input row i, so output 2i takes tap 3 from row i-1 and tap 1 from row i, output 2i+1
    tap 2 from row i and tap 0 from row i+1; matching the sums above gives these 4 taps. The zero padding
    of the upsampled image is the zero padding of the small one, so borders match too.
    """
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack((w2, w1 + w2, w0 + w1, w0), dim=dim)


def transposed_upsample_kernel(weight_OI33: torch.Tensor) -> torch.Tensor:
    """3x3 conv kernel ``[C_out,C_in,3,3]`` -> the equal stride-2 transposed-conv kernel ``[C_in,C_out,4,4]``.

    ``conv_transpose2d(x, kernel, bias, stride=2, padding=1)`` equals ``conv2d(nearest_x2(x), weight, bias,
    padding=1)`` up to float rounding, on any ``[B,C_in,H,W]``; gradients flow back to ``weight``.
    """
    if weight_OI33.ndim != 4 or tuple(weight_OI33.shape[2:]) != (3, 3):
        raise ValueError(f"expected a 3x3 conv kernel [C_out,C_in,3,3], got {list(weight_OI33.shape)}")
    return _fold_taps(_fold_taps(weight_OI33, 2), 3).transpose(0, 1)


class Upsample2d(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (padding 1): ``[B,C_in,H,W] -> [B,C_out,2H,2W]``.

    The parameters are the 3x3 conv's (``conv.weight``, ``conv.bias``: the released keys). With
    ``transposed=True`` the forward is one stride-2 transposed conv whose 4x4 kernel is folded from
    ``conv.weight`` on every call (``transposed_upsample_kernel``; ~16 C_in C_out additions, nothing next to
    the conv): 16 instead of 36 multiply-adds per input pixel and channel pair, and no 4x-sized upsampled
    input is materialised. ``transposed=False`` runs the literal upsample + conv (the reference path).
    """

    def __init__(self, in_chs: int, out_chs: int, transposed: bool = True, scale: int = 2) -> None:
        super().__init__()
        if scale not in (1, 2):
            raise ValueError(f"scale must be 1 or 2, got {scale!r}")
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1)
        self.transposed = transposed
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return self.conv(x)
        if not self.transposed:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        kernel = transposed_upsample_kernel(self.conv.weight)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)

    def extra_repr(self) -> str:
        return f"transposed={self.transposed}, scale={self.scale}"


class InvMbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck (1x1 expand, [x2 upsample], depthwise 3x3, 1x1 project) with a shortcut.

    ``[B,in,H,W] -> [B,out,sH,sW]`` for ``upsample`` s in {1, 2}; hidden width ``out * 4``.
    """

    def __init__(self, in_chs: int, out_chs: int, upsample: bool, transposed: bool = True) -> None:
        super().__init__()
        mid_chs = make_divisible(out_chs * _EXPAND_RATIO)
        if upsample:
            self.shortcut = Upsample2d(in_chs, out_chs, transposed)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs, eps=_NORM_EPS)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, kernel_size=1)
        self.act1 = nn.GELU()
        self.up = Upsample2d(mid_chs, mid_chs, transposed) if upsample else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid_chs, mid_chs, kernel_size=3, padding=1, groups=mid_chs)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.act1(self.conv1_1x1(self.pre_norm(x))))
        h = self.conv3_1x1(self.act2(self.conv2_kxk(h)))
        return h + self.shortcut(x)


class InvStem(nn.Module):
    """Last stage: x2 upsample conv, LayerNorm2d + GELU, 3x3 conv to RGB: ``[B,C,H,W] -> [B,3,2H,2W]``."""

    def __init__(self, in_chs: int, out_chs: int = 3, transposed: bool = True) -> None:
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs, transposed)
        self.norm1 = LayerNorm2d(in_chs, eps=_NORM_EPS)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x))))


def _upsample_stage(in_chs: int, out_chs: int, depth: int, transposed: bool) -> nn.Sequential:
    """``depth`` blocks; the first doubles the resolution (and changes the width)."""
    return nn.Sequential(
        *[
            InvMbConvBlock(in_chs if i == 0 else out_chs, out_chs, upsample=i == 0, transposed=transposed)
            for i in range(depth)
        ]
    )


class ViTaminDecoder(nn.Module):
    """``forward(feats_BLC, grid=(h, w)) -> img_B3HW`` with H = p h, W = p w (p = ``config.patch_size``),
    C = ``config.width``.

    ``decoder_depth`` ViT blocks (GeGLU MLP, no position embedding), LayerNorm, then
    up_conv1 (x2, width -> w0), up_conv2 (x2, w0), up_conv3 (x2, w0 -> w1), up_conv4 (x2, w1 -> 3)
    with ``(w0, w1) = config.upsampler_widths``; at patch size 8 up_conv1 is a plain 3x3 conv (x1).
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
        transposed = config.upsample == "transposed"
        self.up_conv1 = Upsample2d(config.width, widths[0], transposed, scale=config.patch_size // 8)
        self.up_conv2 = _upsample_stage(widths[0], widths[0], depths[0], transposed)
        self.up_conv3 = _upsample_stage(widths[0], widths[1], depths[1], transposed)
        self.up_conv4 = InvStem(widths[1], transposed=transposed)
        self.checkpoint_blocks = config.checkpoints("decoder_blocks")
        self.checkpoint_upsampler = config.checkpoints("upsampler")
        self.channels_last = config.channels_last

    def forward(self, feats_BLC: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B,h*w,C]`` in raster order -> image ``[B,3,p h,p w]`` (unbounded)."""
        h, w = grid
        if feats_BLC.ndim != 3 or feats_BLC.shape[1] != h * w:
            raise ValueError(
                f"expected decoder tokens [B,{h * w},C] for a {h}x{w} grid, got {list(feats_BLC.shape)}"
            )
        x = feats_BLC
        for block in self.blocks:
            x = self._run(block, x, self.checkpoint_blocks)
        x = rearrange(self.norm(x), "b (h w) c -> b c h w", h=h, w=w)
        if self.channels_last:
            # The rearranged tokens already lie in NHWC order (a free view); this pins it for every stage.
            x = x.contiguous(memory_format=torch.channels_last)
        for stage in (self.up_conv1, *self.up_conv2, *self.up_conv3, self.up_conv4):
            x = self._run(stage, x, self.checkpoint_upsampler)
        return x

    def _run(self, module: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
        # Activation checkpointing trades recompute for memory; only useful when building a graph.
        if recompute and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def last_layer(self) -> nn.Parameter:
        """The weight of the final RGB conv (``up_conv4.conv2.weight``), used by the adaptive GAN weight."""
        return self.up_conv4.conv2.weight
