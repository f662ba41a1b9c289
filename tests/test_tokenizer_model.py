"""UniTok model: config validation, shapes, the encode/decode round trip, gradients, bad inputs."""

import math

import pytest
import torch

from unitok.tokenizer import PRESETS, TokenizerConfig, UniTok, UniTokOutput

TEXTS = ["a red square", "two blue circles"]


def tiny_config(**overrides) -> TokenizerConfig:
    return TokenizerConfig.preset("unitok-tiny", **overrides)


@pytest.fixture(scope="module")
def tok() -> UniTok:
    torch.manual_seed(0)
    return UniTok(tiny_config()).eval()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


# --------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_the_release():
    cfg = TokenizerConfig()
    assert cfg == TokenizerConfig.preset("unitok-large")
    assert (cfg.num_codebooks, cfg.codebook_size, cfg.code_dim, cfg.vocab_size) == (8, 4096, 8, 32768)
    assert cfg.grid_size == 16


def test_config_dict_round_trip_and_unknown_keys():
    for name in PRESETS:
        cfg = TokenizerConfig.preset(name)
        assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TokenizerConfig keys \\['bogus'\\]"):
        TokenizerConfig.from_dict({**tiny_config().to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        TokenizerConfig.preset("unitok-huge")
    with pytest.raises(AttributeError):
        tiny_config().width = 3  # frozen


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocab_size": 2049}, "vocab_size .* divisible by num_codebooks"),
        ({"vocab_width": 36}, "vocab_width .* divisible by num_codebooks"),
        ({"num_heads": 3}, "width .* divisible by num_heads"),
        ({"text_heads": 3}, "text_width .* divisible by text_heads"),
        ({"image_size": 72}, "multiple of patch_size \\(16"),
        ({"image_size": 68, "patch_size": 8}, "multiple of patch_size \\(8"),
        ({"patch_size": 4}, "patch_size must be one of"),
        ({"quantizer": "fsq"}, "quantizer must be one of"),
        ({"quant_proj": "mlp"}, "quant_proj must be one of"),
        ({"proj_heads": 3}, "divisible by proj_heads"),
        ({"stage_depths": (1,)}, "stage_depths must be two positive ints"),
        ({"upsampler_depths": (0, 1)}, "upsampler_depths must be two positive ints"),
        ({"depth": 0}, "depth must be a positive int"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"text_vocab_size": 1000}, "open_clip BPE"),
        ({"entropy_temperature": 0.0}, "entropy_temperature"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# --------------------------------------------------------------------------------------------------
# shapes and the round trip


def test_forward_shapes_and_dtypes(tok):
    img = images()
    out = tok(img, TEXTS)
    cfg = tok.config
    assert isinstance(out, UniTokOutput)
    assert out.recon.shape == (2, 3, 32, 32) and out.recon.dtype == torch.float32
    assert out.codes.shape == (2, 2, 2, cfg.num_codebooks) and out.codes.dtype == torch.int64
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < cfg.codebook_size
    assert out.vq_loss.ndim == 0 and out.entropy_loss.ndim == 0
    assert out.usage.shape == out.perplexity.shape == (cfg.num_codebooks,)
    for features in (out.image_features, out.text_features):
        assert features.shape == (2, cfg.embed_dim)
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    assert out.logit_scale.ndim == 0
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    assert tok(img).text_features is None


@torch.no_grad()
def test_public_api_shapes(tok):
    img = images(size=48)
    codes = tok.encode(img)
    assert codes.shape == (2, 3, 3, 8) and codes.dtype == torch.int64
    assert tok.codes_to_vectors(codes).shape == (2, 3, 3, tok.config.vocab_width)
    rec = tok.decode(codes)
    assert rec.shape == (2, 3, 48, 48) and float(rec.abs().max()) <= 1.0
    assert tok.reconstruct(img).shape == (2, 3, 48, 48)
    assert tok.encode_image(img).shape == (2, tok.config.embed_dim)
    ids = tok.tokenize_text(TEXTS)
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert ids[0, 0] == 49406 and 49407 in ids[0]
    torch.testing.assert_close(tok.encode_text(ids), tok.encode_text(TEXTS))
    assert tok.encode_text(TEXTS, normalize=False).norm(dim=-1).min() > 0
    assert tok.decoder_last_layer() is tok.decoder.up_conv4.conv2.weight


@torch.no_grad()
def test_decode_of_codes_equals_decoder_of_quantized_forward(tok):
    """Decoding the codes gives exactly the decoder applied to the quantized tokens of the forward pass."""
    img = images(size=64)
    out = tok(img)
    codes = tok.encode(img)
    assert torch.equal(codes, out.codes)
    z = tok.quant_proj(tok.encoder(img))
    quantized = tok.quantizer(z).quantized  # [B,L,D] straight-through output
    torch.testing.assert_close(tok.codes_to_vectors(codes).flatten(1, 2), quantized, rtol=0, atol=0)
    torch.testing.assert_close(tok.decode(codes), out.recon.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(tok.reconstruct(img), out.recon.clamp(-1, 1), rtol=0, atol=0)
    # CLIP features of the discrete path equal those of the training forward
    torch.testing.assert_close(tok.encode_image(img), out.image_features)


def test_gradients_reach_encoder_through_straight_through():
    torch.manual_seed(0)
    model = UniTok(tiny_config()).train()
    out = model(images(), TEXTS)
    (out.recon.square().mean() + out.vq_loss + out.image_features.sum() + out.text_features.sum()).backward()
    for name in (
        "encoder.patch_embed.backbone.stem.conv1.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "quant_proj.attn.qkv.weight",
        "post_quant_proj.proj.weight",
        "decoder.up_conv4.conv2.weight",
        "text_encoder.token_embedding.weight",
        "projection.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.quantizer.codebook.grad.abs().sum() > 0  # the codebook term of the VQ loss
    assert model.encoder.pos_embed.grad is None and not model.encoder.pos_embed.requires_grad


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = UniTok(tiny_config()).train()
    ckpt = UniTok(tiny_config(grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        out = model(images(), TEXTS)
        (out.recon.square().mean() + out.vq_loss + out.image_features.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_recon_batch_size_and_autocast(tok):
    img = images(batch=3)
    out = tok(img, recon_batch_size=1)
    assert out.recon.shape[0] == 1 and out.image_features.shape[0] == 3
    with pytest.raises(ValueError, match="recon_batch_size"):
        tok(img, recon_batch_size=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok(img)
        assert out.recon.dtype == torch.float32
        assert tok.codes_to_vectors(out.codes).dtype == torch.float32
        assert tok.encode(img).dtype == torch.int64


def test_logit_scale_is_clamped(tok):
    model = UniTok(tiny_config())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(model(images()).logit_scale.item(), 100.0, rel_tol=1e-5)
    model.clamp_logit_scale()
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)


def test_reference_init():
    model = UniTok(tiny_config())
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert all(
        float(m.bias.detach().abs().max()) == 0
        for m in model.decoder.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
    conv = model.decoder.up_conv1.conv.weight
    fan_in, fan_out = conv.shape[1] * 9, conv.shape[0] * 9
    expected_std = 0.5 * math.sqrt(2.0 / (fan_in + fan_out))
    assert abs(conv.std().item() / expected_std - 1) < 0.1


def test_vit_blocks_use_tanh_gelu_geglu(tok):
    """Encoder and decoder MLPs are GeGLU with tanh-approximated GELU and their own LayerNorm (eps 1e-6)."""
    x = torch.linspace(-4, 4, 101)
    for mlp in (tok.encoder.blocks[0].mlp, tok.decoder.blocks[-1].mlp):
        torch.testing.assert_close(mlp.act(x), torch.nn.functional.gelu(x, approximate="tanh"))
        assert mlp.norm.eps == 1e-6
    assert tok.encoder.pos_embed.shape == (1, 1, tok.config.width) and not tok.encoder.pos_embed.any()


@pytest.mark.parametrize("overrides", [{"quantizer": "rq"}, {"quant_proj": "linear"}])
def test_variants_run(overrides):
    model = UniTok(tiny_config(**overrides)).eval()
    img = images()
    with torch.no_grad():
        out = model(img)
        torch.testing.assert_close(model.decode(model.encode(img)), out.recon.clamp(-1, 1))


def test_patch_size_8_has_a_4x_finer_grid_and_the_same_parameters():
    """patch_size 8: the same modules and parameter shapes as patch 16, twice the positions per side."""
    torch.manual_seed(0)
    coarse = UniTok(tiny_config())
    fine = UniTok(tiny_config(patch_size=8)).eval()
    assert fine.config.grid_size == 2 * coarse.config.grid_size == 8
    assert {k: v.shape for k, v in fine.state_dict().items()} == {
        k: v.shape for k, v in coarse.state_dict().items()
    }
    fine.load_state_dict(coarse.state_dict())
    img = images(size=32)
    with torch.no_grad():
        assert fine.encoder(img).shape == (2, 16, fine.config.width)
        out = fine(img)
        codes = fine.encode(img)
        assert out.recon.shape == (2, 3, 32, 32) and codes.shape == (2, 4, 4, 8)
        assert torch.equal(codes, out.codes)
        torch.testing.assert_close(fine.decode(codes), out.recon.clamp(-1, 1), rtol=0, atol=0)
        # The last conv of the front-end runs at stride 1 and the first upsampler keeps the grid's size.
        assert fine.encoder.patch_embed.backbone.pool.proj.stride == (1, 1)
        assert coarse.encoder.patch_embed.backbone.pool.proj.stride == (2, 2)
        assert fine.decoder.up_conv1(torch.zeros(1, fine.config.width, 3, 3)).shape[-2:] == (3, 3)
        # Images must be a multiple of the patch size: 40 px is one for 8 but not for 16.
        assert fine.encode(images(size=40)).shape == (2, 5, 5, 8)
    with pytest.raises(ValueError, match="multiples of 8, got \\[2,3,36,36\\]"):
        fine.encode(images(size=36))
    with pytest.raises(ValueError, match="multiples of 16"):
        coarse.encode(images(size=40))


# --------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    ("img", "message"),
    [
        (
            torch.zeros(2, 3, 250, 250),
            r"expected images of shape \[B,3,H,W\] with H and W multiples of 16, got \[2,3,250,250\]",
        ),
        (torch.zeros(3, 32, 32), r"got \[3,32,32\]"),
        (torch.zeros(2, 1, 32, 32), r"got \[2,1,32,32\]"),
        (torch.zeros(2, 3, 32, 48), "expected square images"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_images(tok, img, message):
    for method in (tok.encode, tok.reconstruct, tok.encode_image, tok):
        with pytest.raises(ValueError, match=message):
            method(img)


def test_bad_codes(tok):
    good = torch.zeros(1, 2, 2, 8, dtype=torch.long)
    tok.decode(good)
    for codes in (
        good + tok.config.codebook_size,
        good - 1,
        torch.zeros(1, 2, 2, 4, dtype=torch.long),
        good.float(),
    ):
        for method in (tok.decode, tok.codes_to_vectors):
            with pytest.raises(ValueError):
                method(codes)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(good - 1)
    with pytest.raises(ValueError, match="K = 8"):
        tok.decode(torch.zeros(1, 2, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B,h,w,K\]"):
        tok.decode(torch.zeros(2, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(good.float())
    with pytest.raises(ValueError, match="square"):
        tok.decode(torch.zeros(1, 2, 3, 8, dtype=torch.long))
    # codes_to_vectors takes any leading shape, e.g. one position at a time
    assert tok.codes_to_vectors(torch.zeros(3, 8, dtype=torch.long)).shape == (3, tok.config.vocab_width)


def test_bad_texts(tok):
    with pytest.raises(ValueError, match="at most 77"):
        tok.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        tok.encode_text(torch.full((1, 5), 49408))
    with pytest.raises(ValueError, match="integer tensor"):
        tok.encode_text(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="list of strings"):
        tok.tokenize_text("not a list")
