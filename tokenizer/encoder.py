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

from .config import TokenizerConfig

# UniTok's GeGLU MLPs use the tanh approximation of GELU (timm's Block would otherwise pass exact GELU).
VIT_ACT_LAYER = "gelu_tanh"


def vitamin_front_end(config: TokenizerConfig) -> MbConvStages:
    """The conv front-end: stem (/2), two MbConv stages (/2 each), strided conv to ``width`` (/2) -> /16."""
    embed_cfg = VitCfg(
        embed_dim=(*config.stage_widths, config.width),
        depths=(*config.stage_depths, 1),
        stem_width=config.stem_width,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    return MbConvStages(cfg=embed_cfg)


class ViTaminEncoder(VisionTransformer):
    """ViTamin trunk of UniTok: ``forward(img_B3HW) -> feats_BLC``, L = (H/16)*(W/16), C = ``config.width``.

    No position embedding: ``pos_embed`` is a frozen zero ``(1,1,C)`` parameter kept only so the
    released checkpoint loads strictly; it broadcasts, so any input size that is a multiple of 16 works.
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
            embed_layer=partial(HybridEmbed, backbone=vitamin_front_end(config), proj=False),
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
        self.set_grad_checkpointing(config.grad_checkpointing)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [-1,1] -> final-LayerNorm'd tokens ``[B,L,C]`` in raster order."""
        return self.forward_features(img_B3HW)
