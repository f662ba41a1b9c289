"""Separable blur and differentiable augmentation on hand-computed cases."""

import pytest
import torch
import torch.nn.functional as F

from unitok.tokenizer.losses import adjust_color, blur_kernel, cutout, diff_augment, gaussian_blur, translate


def test_blur_kernel_identity_and_normalised():
    assert torch.equal(blur_kernel(0.0), torch.ones(1))
    assert torch.equal(blur_kernel(0.3), torch.ones(1))  # radius floor(0.9) = 0
    kernel = blur_kernel(2.0)
    assert kernel.numel() == 13  # radius floor(6.0) = 6
    assert kernel.sum().item() == pytest.approx(1.0)
    assert torch.allclose(kernel, kernel.flip(0))
    assert kernel.argmax().item() == 6
    # proportional to 2^(-(x/sigma)^2): k(1)/k(0) = 2^(-1/4)
    assert (kernel[7] / kernel[6]).item() == pytest.approx(2 ** (-0.25))
    with pytest.raises(ValueError):
        blur_kernel(-1.0)


def test_gaussian_blur_matches_2d_kernel_and_keeps_constants():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 12, 10)
    assert gaussian_blur(img, 0.0) is img
    sigma = 1.0
    kernel = blur_kernel(sigma)
    radius = (kernel.numel() - 1) // 2
    kernel_2d = torch.outer(kernel, kernel).expand(3, 1, -1, -1)
    expected = F.conv2d(F.pad(img, (radius,) * 4, mode="reflect"), kernel_2d, groups=3)
    assert torch.allclose(gaussian_blur(img, sigma), expected, atol=1e-6)
    const = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.5), const, atol=1e-6)
    with pytest.raises(ValueError, match="radius"):
        gaussian_blur(torch.zeros(1, 3, 4, 4), 2.0)


def test_translate_hand_case():
    img = torch.arange(9.0).view(1, 1, 3, 3)
    down = translate(img, torch.tensor([1]), torch.tensor([0]))
    assert torch.equal(down[0, 0], torch.tensor([[0.0, 0, 0], [0, 1, 2], [3, 4, 5]]))
    left = translate(img, torch.tensor([0]), torch.tensor([-1]))
    assert torch.equal(left[0, 0], torch.tensor([[1.0, 2, 0], [4, 5, 0], [7, 8, 0]]))
    two = translate(torch.cat([img, img]), torch.tensor([0, -1]), torch.tensor([1, 0]))
    assert torch.equal(two[0, 0], torch.tensor([[0.0, 0, 1], [0, 3, 4], [0, 6, 7]]))
    assert torch.equal(two[1, 0], torch.tensor([[3.0, 4, 5], [6, 7, 8], [0, 0, 0]]))


def test_adjust_color_hand_case():
    img = torch.tensor([0.0, 0.2, 0.4]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    one, zero = torch.ones(1), torch.zeros(1)
    assert torch.allclose(adjust_color(img, zero, one, one), img)
    assert torch.allclose(adjust_color(img, torch.full((1,), 0.5), one, one), img + 0.5)
    grey = adjust_color(img, zero, zero, one)  # every channel becomes the pixel mean 0.2
    assert torch.allclose(grey, torch.full_like(img, 0.2))
    saturated = adjust_color(img, zero, torch.full((1,), 2.0), one)  # 0.2 + 2 * (x - 0.2)
    assert torch.allclose(saturated[0, :, 0, 0], torch.tensor([-0.2, 0.2, 0.6]))
    flat = adjust_color(img, zero, one, zero)  # contrast 0: the image mean 0.2 everywhere
    assert torch.allclose(flat, torch.full_like(img, 0.2))


def test_cutout_hand_case():
    img = torch.ones(1, 1, 5, 5)
    centre = cutout(img, torch.tensor([2]), torch.tensor([2]), (3, 3))
    expected = torch.ones(5, 5)
    expected[1:4, 1:4] = 0
    assert torch.equal(centre[0, 0], expected)
    corner = cutout(img, torch.tensor([0]), torch.tensor([0]), (2, 2))  # rows/cols [-1, 1) clipped to {0}
    assert corner[0, 0, 0, 0].item() == 0 and corner.sum().item() == 24


def test_diff_augment_identity_shape_and_gradient():
    torch.manual_seed(0)
    img = torch.rand(3, 3, 16, 16, requires_grad=True)
    same = diff_augment(img, blur_sigma=0.0, prob=0.0)
    assert same.dtype == torch.float32 and torch.equal(same, img)
    out = diff_augment(img, blur_sigma=1.0, prob=1.0, cutout_ratio=0.25)
    assert out.shape == img.shape and not torch.allclose(out, img)
    out.square().sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    # the cut-out hole (4 x 4 of 16 x 16, clipped at borders) leaves exact zeros in every sample
    torch.manual_seed(1)
    holes = diff_augment(torch.ones(4, 3, 16, 16) * 5, prob=1.0)
    assert all((sample == 0).any() for sample in holes)


def test_diff_augment_bf16_input_and_validation():
    out = diff_augment(torch.zeros(2, 3, 8, 8, dtype=torch.bfloat16), prob=1.0)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        diff_augment(torch.zeros(2, 3, 8, 8), prob=1.5)
    with pytest.raises(ValueError, match=r"\[B,C,H,W\]"):
        diff_augment(torch.zeros(3, 8, 8))
