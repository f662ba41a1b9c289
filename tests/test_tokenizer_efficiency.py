"""Execution choices that must not change results: the folded transposed-conv upsampler, per-part activation
checkpointing, channels_last, the sync-free usage counts and the uint8 batch transport."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from unitok.tokenizer import UniTok
from unitok.tokenizer.config import CHECKPOINT_PARTS, CHECKPOINT_PRESETS, TokenizerConfig
from unitok.tokenizer.decoder import Upsample2d, ViTaminDecoder, transposed_upsample_kernel
from unitok.tokenizer.quantizer import MultiCodebookQuantizer
from unitok.tokenizer.training.data import pack_uint8, unpack_uint8

# The smallest model that still has every part (two upsampler blocks per stage, text tower, MCQ).
TINY = dict(
    image_size=32,
    stem_width=8,
    stage_widths=(8, 16),
    stage_depths=(1, 1),
    width=32,
    depth=1,
    num_heads=2,
    decoder_depth=1,
    upsampler_widths=(16, 8),
    upsampler_depths=(2, 2),
    num_codebooks=4,
    vocab_size=64,
    vocab_width=16,
    proj_heads=2,
    text_width=32,
    text_layers=1,
    text_heads=2,
    text_context_length=8,
    embed_dim=16,
    drop_path=0.0,
)


def tiny_config(**overrides) -> TokenizerConfig:
    return TokenizerConfig.from_dict({**TINY, **overrides})


def _nearest_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 8, 3)])
def test_transposed_upsample_equals_nearest_then_conv_with_gradients(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    reference = _nearest_conv(x, weight, bias)
    folded = F.conv_transpose2d(x, transposed_upsample_kernel(weight), bias, stride=2, padding=1)
    assert folded.shape == reference.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(folded, reference, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(reference)
    want = torch.autograd.grad(reference, (x, weight, bias), grad_out)
    got = torch.autograd.grad(folded, (x, weight, bias), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11)


def test_upsample_module_keeps_the_3x3_parameters_and_matches_in_float32():
    torch.manual_seed(1)
    module = Upsample2d(5, 3)
    assert sorted(module.state_dict()) == ["conv.bias", "conv.weight"]
    assert module.conv.weight.shape == (3, 5, 3, 3)
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(
        module(x), _nearest_conv(x, module.conv.weight, module.conv.bias), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="3x3"):
        transposed_upsample_kernel(torch.zeros(3, 5, 1, 1))


def test_decoder_modes_share_weights_and_agree_forward_and_backward():
    torch.manual_seed(2)
    fast = ViTaminDecoder(tiny_config()).double()
    slow = ViTaminDecoder(tiny_config(upsample="nearest_conv")).double()
    slow.load_state_dict(fast.state_dict(), strict=True)
    feats = torch.randn(2, 4, 32, dtype=torch.float64)
    out_fast, out_slow = fast(feats, (2, 2)), slow(feats, (2, 2))
    assert out_fast.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out_fast, out_slow, rtol=0, atol=1e-10)
    out_fast.square().sum().backward()
    out_slow.square().sum().backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_checkpoint_parts_config_accepts_presets_and_rejects_unknown_parts():
    assert tiny_config(checkpoint_parts="gpu-80gb").checkpoint_parts == CHECKPOINT_PRESETS["gpu-80gb"]
    assert tiny_config(checkpoint_parts=["text"]).checkpoint_parts == ("text",)
    config = tiny_config(checkpoint_parts=("upsampler",))
    assert config.checkpoints("upsampler") and not config.checkpoints("text")
    assert TokenizerConfig.from_dict(config.to_dict()) == config
    assert all(tiny_config(grad_checkpointing=True).checkpoints(part) for part in CHECKPOINT_PARTS)
    for bad in ("gpu-40gb", ("decoder",)):
        with pytest.raises(ValueError, match="checkpoint"):
            tiny_config(checkpoint_parts=bad)
    with pytest.raises(ValueError, match="upsample"):
        tiny_config(upsample="bilinear")


def _step(model: UniTok, img: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(img, ids)
    loss = out.recon.square().mean() + out.vq_loss + (out.image_features * out.text_features).sum()
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_each_checkpointed_part_is_switched_on_and_gives_the_same_gradients():
    torch.manual_seed(3)
    base = UniTok(tiny_config()).train()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.randint(1, 100, (2, 8))
    want = _step(base, img, ids)
    model = UniTok(tiny_config(checkpoint_parts=CHECKPOINT_PARTS)).train()
    model.load_state_dict(base.state_dict())
    assert model.encoder.grad_checkpointing and model.encoder.patch_embed.recompute
    assert model.decoder.checkpoint_blocks and model.decoder.checkpoint_upsampler
    assert model.text_encoder.transformer.grad_checkpointing
    got = _step(model, img, ids)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    nothing = UniTok(tiny_config(checkpoint_parts=("text",)))
    assert not nothing.encoder.grad_checkpointing and not nothing.decoder.checkpoint_upsampler


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(4)
    base = UniTok(tiny_config()).eval()
    model = UniTok(tiny_config(channels_last=True)).eval()
    model.load_state_dict(base.state_dict())
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = base(img), model(img)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.recon, b.recon, rtol=1e-4, atol=1e-5)


def test_usage_counts_equal_bincount_and_need_no_host_sync(monkeypatch):
    torch.manual_seed(5)
    quantizer = MultiCodebookQuantizer(num_codebooks=4, codebook_size=16, code_dim=2).train()
    z = torch.randn(3, 10, 8)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the quantizer's training forward")

    out = quantizer(z)
    codes_KN = out.codes.reshape(-1, 4).T
    counts = torch.stack([torch.bincount(c, minlength=16) for c in codes_KN]).float()
    probs = counts / counts.sum(-1, keepdim=True)
    torch.testing.assert_close(quantizer.ema_usage, probs, rtol=0, atol=0)
    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    monkeypatch.setattr(torch, "bincount", no_sync)
    quantizer(z)


def test_uint8_batches_round_trip_bit_exactly():
    from PIL import Image

    from unitok.data.transforms import to_pm1

    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1).permute(1, 2, 0).contiguous()
    floats = torch.stack(
        [to_pm1(Image.fromarray(pixels.numpy())), to_pm1(Image.fromarray(255 - pixels.numpy()))]
    )
    packed = pack_uint8(floats)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_uint8(packed, torch.device("cpu")), floats)
    resized = F.interpolate(floats, scale_factor=0.5, mode="bilinear", antialias=True)
    assert pack_uint8(resized) is resized  # not exactly 8-bit values: travels as floats


def test_config_dataclass_replace_keeps_validation():
    with pytest.raises(ValueError):
        dataclasses.replace(tiny_config(), channels_last="yes")


def test_text_id_check_reports_bad_ids_and_passes_good_ones():
    from unitok.tokenizer.text import check_text_ids

    check_text_ids(torch.tensor([[0, 5, 49407]]), context_length=77, vocab_size=49408)
    with pytest.raises(ValueError, match=r"\[0, 49408\), got \[-1, 5\]"):
        check_text_ids(torch.tensor([[-1, 5]]), context_length=77, vocab_size=49408)
    with pytest.raises(ValueError, match="integer tensor"):
        check_text_ids(torch.zeros(1, 4), context_length=77, vocab_size=49408)
    with pytest.raises(ValueError, match="at most 3"):
        check_text_ids(torch.zeros(1, 4, dtype=torch.long), context_length=3, vocab_size=49408)
