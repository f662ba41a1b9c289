"""The UniTok image encoder: a timm ViTamin (hybrid conv + ViT) without position embedding.

Built from timm's own ViTamin parts (``MbConvStages`` front-end inside ``HybridEmbed``, ``GeGluMlp``
blocks inside ``VisionTransformer``) with the sizes of a ``TokenizerConfig``, so that at the release
sizes the module tree and state-dict keys are those of timm's ``vitamin_large_256`` and of the released
checkpoint (``encoder.patch_embed.backbone.*``, ``encoder.blocks.N.*``, ``encoder.norm.*``, ``encoder.pos_embed``).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vitamin import GeGluMlp, MbConvStages, VitCfg, VitConvCfg
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TokenizerConfig

# UniTok's GeGLU MLPs use the tanh approximation of GELU (timm's Block would otherwise pass exact GELU).
VIT_ACT_LAYER = "gelu_tanh"


def vitamin_front_end(config: TokenizerConfig) -> MbConvStages:
    """The conv front-end: stem (/2), two MbConv stages (/2 each), strided conv to ``width`` (/2) -> /16.

    With ``config.patch_size`` 8 the last conv runs at stride 1 (same parameters) -> /8.
    """
    embed_cfg = VitCfg(
        embed_dim=(*config.stage_widths, config.width),
        depths=(*config.stage_depths, 1),
        stem_width=config.stem_width,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    front = MbConvStages(cfg=embed_cfg)
    if config.patch_size == 8:
        front.pool.proj.stride = (1, 1)
    return front


class ConvFrontEnd(HybridEmbed):
    """timm's ``HybridEmbed`` (conv backbone -> tokens ``[B,L,C]``) whose whole forward can be recomputed.

    timm's own switch checkpoints only the MbConv stages; the stem's full-resolution activations are the
    largest of the front-end, so ``recompute`` covers stem, stages and the strided conv together. Same
    submodules and state-dict keys as ``HybridEmbed``.
    """

    recompute: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


class ViTaminEncoder(VisionTransformer):
    """ViTamin trunk of UniTok: ``forward(img_B3HW) -> feats_BLC``, L = (H/p)*(W/p), p = ``config.patch_size``
    (16 in the release), C = ``config.width``.

    No position embedding: ``pos_embed`` is a frozen zero ``(1,1,C)`` parameter kept only so the
    released checkpoint loads strictly; it broadcasts, so any input size that is a multiple of p works.
    Stochastic depth rises linearly from 0 to ``config.drop_path`` over the blocks.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(
            img_size=config.image_size,
            patch_size=1,
            num_classes=0,
            global_pool="",
            fc_norm=False,
            class_token=False,
            pos_embed="none",
            embed_layer=partial(ConvFrontEnd, backbone=vitamin_front_end(config), proj=False),
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            mlp_layer=GeGluMlp,
            act_layer=VIT_ACT_LAYER,
            drop_rate=0.0,
            drop_path_rate=config.drop_path,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, config.width), requires_grad=False)
        # Set directly: timm's set_grad_checkpointing would switch the front-end along with the blocks.
        self.grad_checkpointing = config.checkpoints("encoder_blocks")
        self.patch_embed.recompute = config.checkpoints("encoder_front")
        self.channels_last = config.channels_last

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [-1,1] -> final-LayerNorm'd tokens ``[B,L,C]`` in raster order."""
        if self.channels_last:
            img_B3HW = img_B3HW.contiguous(memory_format=torch.channels_last)
        return self.forward_features(img_B3HW)
