"""Pixel losses, hinge losses, adaptive GAN weight and schedules on hand-computed cases."""

import math

import pytest
import torch

from unitok.tokenizer.losses import (
    ReconstructionLoss,
    adaptive_gan_weight,
    blur_fade_schedule,
    blur_sigma_from_fade,
    gan_schedule,
    hinge_d_loss,
    hinge_g_loss,
    pixel_loss,
)


def test_pixel_loss_hand_case():
    rec = torch.tensor([[1.0, -1.0], [0.5, 0.0]]).view(1, 1, 2, 2)
    img = torch.zeros(1, 1, 2, 2)
    out = pixel_loss(rec, img, l1_weight=0.2, l2_weight=1.0)
    assert out.l1.item() == pytest.approx(0.625)
    assert out.l2.item() == pytest.approx(0.5625)
    assert out.total.item() == pytest.approx(0.2 * 0.625 + 0.5625)
    assert pixel_loss(rec, img, l1_weight=1.0, l2_weight=0.0).total.item() == pytest.approx(0.625)


def test_pixel_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        pixel_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_reconstruction_loss_without_lpips_and_config():
    rec, img = torch.full((1, 3, 4, 4), 0.5), torch.zeros(1, 3, 4, 4)
    loss = ReconstructionLoss.from_config({"l1_weight": 2.0, "l2_weight": 3.0, "lpips_weight": 0.0})
    out = loss(rec, img)
    assert out.total.item() == pytest.approx(2.0 * 0.5 + 3.0 * 0.25)
    assert out.lpips.item() == 0.0
    with pytest.raises(ValueError, match="unknown"):
        ReconstructionLoss.from_config({"l3_weight": 1.0})
    with pytest.raises(ValueError, match="LPIPS module"):
        ReconstructionLoss(lpips_weight=1.0)


def test_hinge_losses_hand_case():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def _linear_decoder():
    weight = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    out = (weight @ torch.tensor([3.0, 4.0])).squeeze()  # 11; d out / d W = [3, 4], norm 5
    return weight, out


def test_adaptive_weight_known_gradients():
    weight, out = _linear_decoder()
    nll = out**2  # gradient 2 * 11 * [3, 4] = [66, 88], norm 110
    g_loss = -out  # gradient -[3, 4], norm 5
    w = adaptive_gan_weight(nll, g_loss, weight)
    assert w.item() == pytest.approx(110 / (5 + 1e-6), rel=1e-6)
    assert not w.requires_grad
    (nll + w * g_loss).backward()  # graphs were retained
    assert weight.grad is not None


@pytest.mark.parametrize(("g_scale", "expected"), [(1e5, 0.015), (1e-6, 1e4)])
def test_adaptive_weight_clamps(g_scale, expected):
    weight, out = _linear_decoder()
    assert adaptive_gan_weight(out**2, -g_scale * out, weight).item() == pytest.approx(expected)


def test_adaptive_weight_custom_bounds_and_unused_layer():
    weight, out = _linear_decoder()
    assert adaptive_gan_weight(out**2, -out, weight, max_weight=3.0).item() == pytest.approx(3.0)
    other = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="does not depend"):
        adaptive_gan_weight(out**2, -out, other)


def test_gan_schedule_steps():
    # start at 375, warm-up 30 steps
    values = [gan_schedule(s, 1000, 0.375, 0.03) for s in (0, 374, 375, 390, 405, 1000)]
    assert values == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    assert gan_schedule(375, 1000, 0.375, 0.0) == 1.0
    assert gan_schedule(374, 1000, 0.375, 0.0) == 0.0
    with pytest.raises(ValueError):
        gan_schedule(0, 0)


def test_blur_fade_schedule_steps():
    # fades from 1 to 0 over twice the warm-up (60 steps) after the start at 375
    values = [blur_fade_schedule(s, 1000, 0.375, 0.03) for s in (0, 375, 390, 405, 435, 999)]
    assert values == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.0, 0.0])
    assert blur_sigma_from_fade(256, 1.0) == pytest.approx(math.sqrt(128))
    assert blur_sigma_from_fade(256, 0.5) == pytest.approx(0.5 * math.sqrt(128))
    assert blur_sigma_from_fade(256, 0.0) == 0.0
