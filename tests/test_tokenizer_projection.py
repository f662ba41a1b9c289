"""Tests of unitok.tokenizer.projection: release keys and shapes, the attention-projection math, head modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unitok.tokenizer.projection import AttnProjection, ProjectionAttention, build_projection

# quant_proj.* and post_quant_proj.* rows of /work/shared/reference/unitok-release-keys.tsv, in release order.
RELEASE_PROJECTION_KEYS = {
    "quant_proj.norm1.weight": (1024,),
    "quant_proj.norm1.bias": (1024,),
    "quant_proj.attn.q_bias": (1024,),
    "quant_proj.attn.v_bias": (1024,),
    "quant_proj.attn.zero_k_bias": (1024,),
    "quant_proj.attn.qkv.weight": (3072, 1024),
    "quant_proj.attn.proj.weight": (64, 64),
    "quant_proj.attn.proj.bias": (64,),
    "quant_proj.proj.weight": (64, 1024),
    "quant_proj.proj.bias": (64,),
    "quant_proj.norm3.weight": (1024,),
    "quant_proj.norm3.bias": (1024,),
    "quant_proj.norm2.weight": (64,),
    "quant_proj.norm2.bias": (64,),
    "quant_proj.mlp.norm.weight": (64,),
    "quant_proj.mlp.norm.bias": (64,),
    "quant_proj.mlp.w0.weight": (128, 64),
    "quant_proj.mlp.w0.bias": (128,),
    "quant_proj.mlp.w1.weight": (128, 64),
    "quant_proj.mlp.w1.bias": (128,),
    "quant_proj.mlp.w2.weight": (64, 128),
    "quant_proj.mlp.w2.bias": (64,),
    "post_quant_proj.norm1.weight": (64,),
    "post_quant_proj.norm1.bias": (64,),
    "post_quant_proj.attn.q_bias": (1024,),
    "post_quant_proj.attn.v_bias": (1024,),
    "post_quant_proj.attn.zero_k_bias": (1024,),
    "post_quant_proj.attn.qkv.weight": (3072, 64),
    "post_quant_proj.attn.proj.weight": (1024, 1024),
    "post_quant_proj.attn.proj.bias": (1024,),
    "post_quant_proj.proj.weight": (1024, 64),
    "post_quant_proj.proj.bias": (1024,),
    "post_quant_proj.norm3.weight": (64,),
    "post_quant_proj.norm3.bias": (64,),
    "post_quant_proj.norm2.weight": (1024,),
    "post_quant_proj.norm2.bias": (1024,),
    "post_quant_proj.mlp.norm.weight": (1024,),
    "post_quant_proj.mlp.norm.bias": (1024,),
    "post_quant_proj.mlp.w0.weight": (2048, 1024),
    "post_quant_proj.mlp.w0.bias": (2048,),
    "post_quant_proj.mlp.w1.weight": (2048, 1024),
    "post_quant_proj.mlp.w1.bias": (2048,),
    "post_quant_proj.mlp.w2.weight": (1024, 2048),
    "post_quant_proj.mlp.w2.bias": (1024,),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _release_projections() -> nn.Module:
    parent = nn.Module()
    parent.quant_proj = AttnProjection(1024, 64, 16)
    parent.post_quant_proj = AttnProjection(64, 1024, 16)
    return parent


def test_keys_shapes_and_order_match_the_release_tsv():
    parent = _release_projections()
    state = parent.state_dict()
    assert list(state) == list(RELEASE_PROJECTION_KEYS)
    assert {key: tuple(value.shape) for key, value in state.items()} == RELEASE_PROJECTION_KEYS
    assert "zero_k_bias" in dict(parent.quant_proj.attn.named_buffers())
    assert "zero_k_bias" not in dict(parent.quant_proj.attn.named_parameters())
    # Parameter counts quoted in the reference notes: 3.25 M and 7.62 M.
    assert sum(p.numel() for p in parent.quant_proj.parameters()) == 3_246_784
    assert sum(p.numel() for p in parent.post_quant_proj.parameters()) == 7_615_744


def test_release_named_state_dict_loads_strictly():
    parent = _release_projections()
    released = {key: torch.randn(shape) for key, shape in RELEASE_PROJECTION_KEYS.items()}
    parent.load_state_dict(released, strict=True)
    assert torch.equal(parent.post_quant_proj.mlp.w2.bias, released["post_quant_proj.mlp.w2.bias"])
    with pytest.raises(RuntimeError, match="Missing key"):
        _release_projections().load_state_dict(
            {k: v for k, v in released.items() if k != "quant_proj.attn.zero_k_bias"}, strict=True
        )


def _reference_forward(
    module: AttnProjection, x: torch.Tensor, heads: int, causal: bool = False
) -> torch.Tensor:
    """The release formulas written out by hand from the module's weights."""
    attn = module.attn
    width = max(module.in_dim, module.out_dim)
    head_dim = width // heads
    batch, length, _ = x.shape

    def layer_norm(t, norm, eps):
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias

    h = layer_norm(x, module.norm1, 1e-5)
    qkv = h @ attn.qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(width), attn.v_bias])
    q, k, v = qkv.split(width, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    out = scores.softmax(-1) @ v  # [B, H, L, head_dim]
    if module.in_dim > module.out_dim:
        out = out.mean(1)
        if head_dim != module.out_dim:
            out = F.adaptive_avg_pool1d(out, module.out_dim)
    else:
        out = out.transpose(1, 2).reshape(batch, length, width)
    y = out @ attn.proj.weight.T + attn.proj.bias
    y = y + layer_norm(x, module.norm3, 1e-5) @ module.proj.weight.T + module.proj.bias
    m = layer_norm(layer_norm(y, module.norm2, 1e-5), module.mlp.norm, 1e-6)
    pre = m @ module.mlp.w0.weight.T + module.mlp.w0.bias
    gelu_tanh = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
    hidden = gelu_tanh * (m @ module.mlp.w1.weight.T + module.mlp.w1.bias)
    return y + hidden @ module.mlp.w2.weight.T + module.mlp.w2.bias


def _randomise(module: nn.Module) -> None:
    """Non-trivial values everywhere (the init leaves biases and norms at 0/1, hiding mistakes)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn_like(param) * (0.2 if "weight" in name else 0.5))


@pytest.mark.parametrize(
    ("in_dim", "out_dim", "heads", "causal"),
    [
        (64, 16, 4, False),
        (64, 8, 4, False),
        (16, 64, 4, False),
        (32, 32, 4, False),
        (16, 64, 4, True),
        (64, 16, 4, True),
    ],
)
def test_forward_matches_hand_written_release_math(in_dim, out_dim, heads, causal):
    module = AttnProjection(in_dim, out_dim, heads, causal=causal)
    _randomise(module)
    x = torch.randn(2, 7, in_dim)
    torch.testing.assert_close(module(x), _reference_forward(module, x, heads, causal), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("in_dim", "out_dim", "heads", "average", "head_dim"),
    [
        (64, 16, 4, True, 16),
        (64, 8, 4, True, 16),
        (128, 32, 2, True, 64),
        (16, 64, 4, False, 16),
        (32, 32, 8, False, 4),
    ],
)
def test_heads_averaged_when_narrowing_concatenated_otherwise(in_dim, out_dim, heads, average, head_dim):
    module = AttnProjection(in_dim, out_dim, heads)
    assert module.attn.average_heads is average and module.attn.head_dim == head_dim
    assert module.attn.proj.weight.shape == (out_dim, out_dim)
    assert module(torch.randn(3, 5, in_dim)).shape == (3, 5, out_dim)


def test_attention_is_bidirectional_by_default_and_causal_on_request():
    x = torch.randn(1, 6, 32)
    changed = x.clone()
    changed[:, -1] += torch.randn(32)  # not a constant shift, which LayerNorm would remove
    for causal, first_token_moves in ((False, True), (True, False)):
        module = AttnProjection(32, 16, 4, causal=causal)
        _randomise(module)
        moved = not torch.allclose(module(x)[:, 0], module(changed)[:, 0])
        assert moved is first_token_moves


def test_init_and_release_activation():
    module = AttnProjection(64, 16, 4)
    assert module.norm1.eps == module.norm2.eps == module.norm3.eps == 1e-5
    assert module.mlp.norm.eps == 1e-6
    pre = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(module.mlp.act(pre), F.gelu(pre, approximate="tanh"))
    assert module.proj.bias.abs().sum() == 0 and module.attn.q_bias.abs().sum() == 0
    assert 0.015 < module.attn.qkv.weight.std() < 0.025  # trunc-normal(0.02)
    assert module.attn.zero_k_bias.abs().sum() == 0


def test_build_projection_kinds_and_validation():
    assert isinstance(build_projection("attn", 64, 16, 4), AttnProjection)
    assert build_projection("attn", 16, 64, 4, causal=True).attn.causal
    linear = build_projection("linear", 64, 16, 4)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (16, 64)
    with pytest.raises(ValueError, match="'attn' or 'linear'"):
        build_projection("conv", 64, 16, 4)
    with pytest.raises(ValueError, match="no extra options"):
        build_projection("linear", 64, 16, 4, causal=True)
    with pytest.raises(ValueError, match="dividing"):
        AttnProjection(64, 16, 3)
    with pytest.raises(ValueError, match=r"expected tokens of shape \[B, L, 64\], got \[2, 64\]"):
        AttnProjection(64, 16, 4)(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"got \[2, 5, 32\]"):
        AttnProjection(64, 16, 4)(torch.randn(2, 5, 32))
    assert isinstance(AttnProjection(64, 16, 4).attn, ProjectionAttention)
