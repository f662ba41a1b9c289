"""Projections between the encoder/decoder width C and the quantizer latent width D (release ``AttnProjection``).

``quant_proj`` maps tokens ``[B, L, C] -> [B, L, D]`` (heads averaged), ``post_quant_proj`` maps
``[B, L, D] -> [B, L, C]`` (heads concatenated). Key names and shapes match the released checkpoint
(``norm1``, ``norm2``, ``norm3``, ``attn.{qkv.weight, q_bias, v_bias, zero_k_bias, proj.*}``, ``proj.*``,
``mlp.{norm, w0, w1, w2}.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vitamin import GeGluMlp
from torch import nn

__all__ = ["AttnProjection", "ProjectionAttention", "build_projection"]

_NORM_EPS = 1e-5  # release uses nn.LayerNorm defaults here (the MLP's own LayerNorm is 1e-6, set by timm)
# The release's GeGluMlp hard-codes tanh-approximated GELU; timm's class takes it as an argument.
_MLP_ACT = "gelu_tanh"


class ProjectionAttention(nn.Module):
    """Multi-head attention that changes width (release ``PlainAttention``).

    Works at width ``W = max(in_dim, out_dim)`` with ``num_heads`` heads of ``W // num_heads`` channels. The qkv
    bias is ``[q_bias, 0, v_bias]`` (no key bias; ``zero_k_bias`` is a saved zero buffer, as in the release).
    When ``in_dim > out_dim`` the head outputs are averaged (then average-pooled to ``out_dim`` channels if a head
    is wider than ``out_dim``); otherwise they are concatenated. A final ``proj`` Linear(out_dim, out_dim).

    Input ``x_BLC [B, L, in_dim]`` -> ``[B, L, out_dim]``. Full bidirectional attention unless ``causal``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False) -> None:
        super().__init__()
        width = max(in_dim, out_dim)
        if num_heads < 1 or width % num_heads:
            raise ValueError(
                f"expected num_heads >= 1 dividing max(in_dim, out_dim) = {width}, got {num_heads}"
            )
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        self.head_dim = width // num_heads
        self.average_heads = in_dim > out_dim
        self.qkv = nn.Linear(in_dim, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.qkv.weight, bias)
        q, k, v = rearrange(qkv, "b l (three h e) -> three b h l e", three=3, h=self.num_heads).unbind(0)
        out_BHLE = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        if self.average_heads:
            out = out_BHLE.mean(dim=1)
            if self.head_dim != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = rearrange(out_BHLE, "b h l e -> b l (h e)")
        return self.proj(out)

    def extra_repr(self) -> str:
        mode = "mean" if self.average_heads else "concat"
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}, heads={mode}, causal={self.causal}"


class AttnProjection(nn.Module):
    """Release ``AttnProjection``: an attention block that maps ``[B, L, in_dim] -> [B, L, out_dim]``.

    ``y = proj(norm3(x)) + attn(norm1(x))``; ``out = y + mlp(norm2(y))`` with a GeGLU MLP of hidden width
    ``mlp_ratio * out_dim`` (timm ``GeGluMlp``: its own LayerNorm eps 1e-6, tanh GELU). Norms 1-3 are LayerNorm
    with eps 1e-5. Heads are averaged when ``in_dim > out_dim`` and concatenated otherwise (see
    :class:`ProjectionAttention`). ``causal=True`` gives the first release's causal attention.

    Release shapes: ``quant_proj = AttnProjection(1024, 64, 16)``, ``post_quant_proj = AttnProjection(64, 1024, 16)``.
    Linear weights are initialised trunc-normal(std 0.02), biases 0 (the release's ``init_weights``).
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_heads: int, mlp_ratio: float = 2.0, causal: bool = False
    ) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"expected positive in_dim and out_dim, got {in_dim} and {out_dim}")
        if mlp_ratio <= 0:
            raise ValueError(f"expected mlp_ratio > 0, got {mlp_ratio}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = nn.LayerNorm(in_dim, eps=_NORM_EPS)
        self.attn = ProjectionAttention(in_dim, out_dim, num_heads, causal=causal)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim, eps=_NORM_EPS)
        self.norm2 = nn.LayerNorm(out_dim, eps=_NORM_EPS)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio), act_layer=_MLP_ACT)
        self.apply(_init_linear)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """``x_BLC [B, L, in_dim]`` -> ``[B, L, out_dim]``."""
        if x_BLC.ndim != 3 or x_BLC.shape[-1] != self.in_dim:
            raise ValueError(f"expected tokens of shape [B, L, {self.in_dim}], got {list(x_BLC.shape)}")
        y = self.proj(self.norm3(x_BLC)) + self.attn(self.norm1(x_BLC))
        return y + self.mlp(self.norm2(y))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_projection(kind: str, in_dim: int, out_dim: int, num_heads: int, **kwargs) -> nn.Module:
    """The release's ``quant_proj`` switch: ``"attn"`` -> :class:`AttnProjection`, ``"linear"`` -> ``nn.Linear``.

    ``kwargs`` (``mlp_ratio``, ``causal``) go to :class:`AttnProjection`; both map ``[..., in_dim] -> [..., out_dim]``
    (the attention one needs ``[B, L, in_dim]``).
    """
    if kind == "attn":
        return AttnProjection(in_dim, out_dim, num_heads, **kwargs)
    if kind == "linear":
        if kwargs:
            raise ValueError(f"a linear projection takes no extra options, got {sorted(kwargs)}")
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"expected projection kind 'attn' or 'linear', got {kind!r}")
