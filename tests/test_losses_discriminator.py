"""DINOv2 discriminator with a tiny random backbone: hidden frozen backbone, shapes, gradients, weight loading,
and the discriminator / generator objectives."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from unitok.tokenizer.losses import (
    DinoDiscConfig,
    DinoDiscriminator,
    dinov2_to_timm,
    discriminator_loss,
    generator_loss,
    resample_pos_embed,
)
from unitok.tokenizer.losses.discriminator import _make_head


@pytest.fixture
def disc():
    torch.manual_seed(0)
    return DinoDiscriminator(DinoDiscConfig.preset("tiny"))


def _images(batch=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def test_config_validation_and_round_trip():
    cfg = DinoDiscConfig.preset("tiny")
    assert DinoDiscConfig.from_dict(cfg.to_dict()) == cfg
    assert DinoDiscConfig().taps == (0, 2, 5, 8, 11)
    with pytest.raises(ValueError, match="norm_groups"):
        DinoDiscConfig.preset("tiny", norm_groups=7)
    with pytest.raises(ValueError, match="taps"):
        DinoDiscConfig.preset("tiny", taps=(0, 3))
    with pytest.raises(ValueError, match="unknown"):
        DinoDiscConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown"):
        DinoDiscConfig.from_dict({"depth": 2, "width": 3})


def test_release_heads_parameter_count():
    # 5 heads on the 384-wide ViT-S: 7.39 M trainable parameters as in the reference
    per_head = sum(p.numel() for p in _make_head(DinoDiscConfig()).parameters())
    assert 5 * per_head == 7_386_245


def test_backbone_hidden_from_state_dict_and_parameters(disc):
    backbone_params = {id(p) for p in disc.backbone.parameters()}
    assert backbone_params and not backbone_params & {id(p) for p in disc.parameters()}
    keys = set(disc.state_dict())
    assert keys == {k for k in keys if k.startswith("heads.")} | {"x_scale", "x_shift"}
    assert {"heads.0.0.0.weight", "heads.0.0.1.weight", "heads.0.1.fn.0.weight", "heads.1.2.weight"} <= keys
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    disc.train()
    assert not disc.backbone.training
    disc.to(torch.float64)
    assert disc.backbone.pos_embed.dtype == torch.float64 and disc.heads[0][2].weight.dtype == torch.float64


@pytest.mark.parametrize("size", [(32, 32), (28, 28), (28, 33), (41, 30)])
def test_output_shape(disc, size):
    # tiny preset: taps (0, 2); every input is brought to 28 x 28 -> 2 x 2 = 4 tokens per tap
    logits = disc(torch.rand(3, 3, *size) * 2 - 1)
    assert logits.shape == (3, 2 * 4) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        disc(torch.rand(3, 1, 32, 32))


def test_gradient_reaches_input_and_backbone_stays_frozen(disc):
    img = _images().requires_grad_(True)
    disc(img).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())

    backbone_before = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    heads_before = disc.heads[0][2].weight.detach().clone()
    optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-2)
    optimizer.zero_grad()
    discriminator_loss(disc, _images(seed=1), _images(seed=2)).loss.backward()
    optimizer.step()
    assert all(torch.equal(v, backbone_before[k]) for k, v in disc.backbone.state_dict().items())
    assert not torch.equal(disc.heads[0][2].weight, heads_before)


def test_discriminator_and_generator_losses(disc):
    torch.manual_seed(0)
    fake = _images(seed=3).requires_grad_(True)
    out = discriminator_loss(disc, _images(seed=1), fake, blur_sigma=1.0, bcr_weight=4.0)
    assert all(torch.isfinite(t).all() for t in out)
    assert out.loss.item() == pytest.approx(out.hinge.item() + 4.0 * out.bcr.item(), rel=1e-5)
    assert out.logits_real.shape == (2, 8) and 0 <= out.acc_real.item() <= 100
    out.loss.backward()
    assert fake.grad is None  # fakes are detached for the discriminator
    plain = discriminator_loss(disc, _images(seed=1), fake, bcr_weight=0.0)
    assert plain.bcr.item() == 0.0 and plain.loss.item() == plain.hinge.item()

    g_loss = generator_loss(disc, fake, blur_sigma=1.0)
    g_loss.backward()
    assert g_loss.ndim == 0 and fake.grad is not None and fake.grad.abs().sum() > 0


def test_resample_pos_embed():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, (4, 4)) is pos
    const = torch.cat([torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.7)], dim=1)
    out = resample_pos_embed(const, (2, 2))
    assert out.shape == (1, 1 + 4, 8)
    assert torch.equal(out[:, 0], const[:, 0]) and torch.allclose(out[:, 1:], torch.tensor(0.7), atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (2, 2))


def _official_tiny_state_dict(img_size=56):
    """Random tiny weights in the official DINOv2 layout: timm key names plus mask_token, 4 x 4 grid."""
    torch.manual_seed(5)
    source = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        depth=3,
        embed_dim=64,
        num_heads=2,
    )
    state_dict = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    state_dict["mask_token"] = torch.zeros(1, 64)
    return state_dict


def test_load_official_and_timm_layouts(tmp_path):
    official = _official_tiny_state_dict()
    torch.save(official, tmp_path / "dinov2_tiny_pretrain.pth")
    disc = DinoDiscriminator(
        DinoDiscConfig.preset("tiny"), backbone_path=tmp_path / "dinov2_tiny_pretrain.pth"
    )
    loaded = disc.backbone.state_dict()
    assert torch.equal(loaded["blocks.2.attn.qkv.weight"], official["blocks.2.attn.qkv.weight"])
    assert torch.equal(loaded["blocks.1.ls2.gamma"], official["blocks.1.ls2.gamma"])
    assert torch.equal(loaded["pos_embed"], resample_pos_embed(official["pos_embed"], (2, 2)))
    assert "mask_token" not in loaded

    timm_layout = dinov2_to_timm(official, (2, 2))
    save_file(timm_layout, tmp_path / "dinov2_tiny_timm.safetensors")
    again = DinoDiscriminator(
        DinoDiscConfig.preset("tiny"), backbone_path=tmp_path / "dinov2_tiny_timm.safetensors"
    )
    assert all(torch.equal(v, timm_layout[k]) for k, v in again.backbone.state_dict().items())

    broken = {k: v for k, v in official.items() if k != "norm.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"norm\.weight"):
        DinoDiscriminator(DinoDiscConfig.preset("tiny"), backbone_path=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="unsupported"):
        dinov2_to_timm({**official, "register_tokens": torch.zeros(1, 4, 64)}, (2, 2))
