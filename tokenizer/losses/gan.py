"""Adversarial losses: hinge losses, the adaptive generator weight, the discriminator schedules, and the full
discriminator / generator objectives on augmented images (UniTok reference, section 3.2).

Shape legend: B batch, H/W image size in pixels, T logits per image (the discriminator's output width).
Step counting follows the reference: with ``start = start_frac * total_steps`` and
``warmup = warmup_frac * total_steps`` (floats), the discriminator is active once ``step - start > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .diffaug import diff_augment

__all__ = [
    "AdaptiveGanGrads",
    "DiscriminatorLoss",
    "adaptive_gan_grads",
    "adaptive_gan_weight",
    "blur_fade_schedule",
    "discriminator_loss",
    "gan_schedule",
    "generator_loss",
    "hinge_d_loss",
    "hinge_g_loss",
]

Discriminator = Callable[[torch.Tensor], torch.Tensor]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss mean(relu(1 - real)) + mean(relu(1 + fake)); logits of any shape, scalar out."""
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss -mean(fake logits) (the hinge generator loss); logits of any shape, scalar out."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    min_weight: float = 0.015,
    max_weight: float = 1e4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Balance the GAN term against the reconstruction term at the decoder's last layer.

    w = ||d nll_loss / d last_layer|| / (||d g_loss / d last_layer|| + eps), clamped to [min_weight, max_weight]
    (release ``gada=1``: [0.015, 1e4]). Both graphs are retained so the caller can still backpropagate the total.

    Args:
        nll_loss: scalar reconstruction loss (L1/L2/LPIPS mix) that depends on ``last_layer``.
        g_loss: scalar generator adversarial loss that depends on ``last_layer``.
        last_layer: the decoder's last weight (``UniTok.decoder_last_layer()``).
    Returns:
        detached float32 scalar tensor.
    """
    _check_adaptive_args(nll_loss, g_loss, min_weight, max_weight)
    grads = []
    for name, loss in (("nll_loss", nll_loss), ("g_loss", g_loss)):
        (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(f"{name} does not depend on last_layer; pass the decoder's last weight")
        grads.append(grad.detach().float())
    weight = grads[0].norm() / (grads[1].norm() + eps)
    return weight.clamp(min_weight, max_weight)


def _check_adaptive_args(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, min_weight: float, max_weight: float
) -> None:
    if nll_loss.ndim != 0 or g_loss.ndim != 0:
        raise ValueError(
            f"expected scalar losses, got shapes {list(nll_loss.shape)} and {list(g_loss.shape)}"
        )
    if not 0.0 <= min_weight <= max_weight:
        raise ValueError(f"expected 0 <= min_weight <= max_weight, got {min_weight}, {max_weight}")


class AdaptiveGanGrads(NamedTuple):
    """What ``adaptive_gan_grads`` returns: the detached float32 scalar ``weight`` (as ``adaptive_gan_weight``)
    and the gradients of the two losses w.r.t. the output, ``nll_grad`` and ``g_grad`` (its shape, detached)."""

    weight: torch.Tensor
    nll_grad: torch.Tensor
    g_grad: torch.Tensor


def adaptive_gan_grads(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    output_leaf: torch.Tensor,
    output: torch.Tensor,
    last_layer: torch.Tensor,
    min_weight: float = 0.015,
    max_weight: float = 1e4,
    eps: float = 1e-6,
) -> AdaptiveGanGrads:
    """``adaptive_gan_weight`` with each loss back-propagated once, for losses that reach the model only
    through one output (the decoder's reconstruction).

    ``adaptive_gan_weight`` followed by ``backward(nll + c * w * g)`` runs the backward of LPIPS and of the
    discriminator twice. Here both losses are taken on ``output_leaf``, a detached copy of ``output`` that
    requires grad; each is back-propagated to it once (freeing its graph), and the two last-layer gradients
    come from one batched pass through the layers between ``last_layer`` and ``output`` (the last conv).
    The caller then back-propagates ``(output * (nll_grad + c * weight * g_grad)).sum()`` into the model,
    which gives the gradients of ``nll + c * weight * g``. The model's graph is retained for that.

    Args:
        nll_loss, g_loss: scalar losses computed from ``output_leaf``.
        output_leaf: ``output.detach().requires_grad_()``.
        output: the model's output, in the graph of ``last_layer``.
        last_layer: the decoder's last weight (``UniTok.decoder_last_layer()``).
    """
    _check_adaptive_args(nll_loss, g_loss, min_weight, max_weight)
    if not output_leaf.requires_grad or output_leaf.grad_fn is not None:
        raise ValueError(
            "expected output_leaf = output.detach().requires_grad_() (a leaf that requires grad)"
        )
    grads = []
    for name, loss in (("nll_loss", nll_loss), ("g_loss", g_loss)):
        (grad,) = torch.autograd.grad(loss, output_leaf, allow_unused=True) if loss.requires_grad else (None,)
        if grad is None:
            raise ValueError(f"{name} does not depend on output_leaf; compute it from the detached output")
        grads.append(grad)
    (layer_grads,) = torch.autograd.grad(
        output, last_layer, grad_outputs=torch.stack(grads), retain_graph=True, is_grads_batched=True
    )
    norms = layer_grads.detach().float().flatten(1).norm(dim=1)
    weight = (norms[0] / (norms[1] + eps)).clamp(min_weight, max_weight)
    return AdaptiveGanGrads(weight, grads[0], grads[1])


def _check_schedule(step: int, total_steps: int, start_frac: float, warmup_frac: float) -> None:
    if total_steps <= 0:
        raise ValueError(f"expected total_steps > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"expected step >= 0, got {step}")
    if not 0.0 <= start_frac <= 1.0 or not 0.0 <= warmup_frac <= 1.0:
        raise ValueError(f"expected start_frac and warmup_frac in [0, 1], got {start_frac}, {warmup_frac}")


def gan_schedule(step: int, total_steps: int, start_frac: float = 0.375, warmup_frac: float = 0.03) -> float:
    """Warm-up factor of the GAN term at ``step``: 0 until ``start_frac`` of training, then rises linearly to 1
    over ``warmup_frac`` of training: min(1, (step - start) / warmup), floored at 0.

    The discriminator (its loss and the generator's adversarial term) is active when the factor is > 0.
    With ``warmup_frac == 0`` the factor jumps to 1 at the start step.
    """
    _check_schedule(step, total_steps, start_frac, warmup_frac)
    since_start = step - start_frac * total_steps
    if since_start < 0:
        return 0.0
    warmup = warmup_frac * total_steps
    if warmup == 0:
        return 1.0
    return min(1.0, since_start / warmup)


def blur_fade_schedule(
    step: int, total_steps: int, start_frac: float = 0.375, warmup_frac: float = 0.03
) -> float:
    """Blur strength of the discriminator inputs at ``step``: 1 until the discriminator starts, then falls
    linearly to 0 over twice the warm-up: 1 - min(1, (step - start) / (2 warmup)).

    Turn it into a width in pixels with ``diffaug.blur_sigma_from_fade(image_size, fade)``.
    """
    _check_schedule(step, total_steps, start_frac, warmup_frac)
    since_start = step - start_frac * total_steps
    if since_start < 0:
        return 1.0
    fade_steps = 2 * warmup_frac * total_steps
    if fade_steps == 0:
        return 0.0
    return 1.0 - min(1.0, since_start / fade_steps)


class DiscriminatorLoss(NamedTuple):
    """Parts of the discriminator objective. ``loss`` = ``hinge`` + bcr_weight * ``bcr``; logits [B,T] float32;
    ``acc_real``/``acc_fake``: detached % of real logits > 0 and of fake logits < 0."""

    loss: torch.Tensor
    hinge: torch.Tensor
    bcr: torch.Tensor
    logits_real: torch.Tensor
    logits_fake: torch.Tensor
    acc_real: torch.Tensor
    acc_fake: torch.Tensor


def discriminator_loss(
    disc: Discriminator,
    real_B3HW: torch.Tensor,
    fake_B3HW: torch.Tensor,
    blur_sigma: float = 0.0,
    bcr_weight: float = 4.0,
    bcr_cutout: float = 0.2,
    aug_prob: float = 1.0,
    aug_cutout: float = 0.2,
) -> DiscriminatorLoss:
    """Hinge loss on augmented real and (detached) fake images plus balanced consistency regularisation (bCR).

    logits_real = D(aug(blur(real))), logits_fake = D(aug(blur(sg(fake))));
    hinge = mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake));
    bcr = mse(D(aug'(real)), logits_real) + mse(D(aug'(sg(fake))), logits_fake) with a second, unblurred draw aug'
    (always applied, cutout ``bcr_cutout``); gradients flow through both sides of the MSE, as in the reference.

    Args:
        disc: the discriminator (``DinoDiscriminator``, possibly DDP-wrapped); images [B,3,H,W] -> logits [B,T].
        real_B3HW, fake_B3HW: images in [-1, 1]; ``fake`` is detached here.
        blur_sigma: blur width in pixels for the first draw (``blur_sigma_from_fade``).
        bcr_weight: weight of the consistency term (release 4.0; 0 skips the extra forward passes).
        aug_prob, aug_cutout: DiffAugment probability and cutout ratio of the first draw (release 1.0, 0.2).
    """
    if real_B3HW.shape != fake_B3HW.shape:
        raise ValueError(
            f"expected real and fake of equal shape, got {list(real_B3HW.shape)} and {list(fake_B3HW.shape)}"
        )
    fake_B3HW = fake_B3HW.detach()
    logits_real = disc(diff_augment(real_B3HW, blur_sigma, aug_prob, aug_cutout)).float()
    logits_fake = disc(diff_augment(fake_B3HW, blur_sigma, aug_prob, aug_cutout)).float()
    hinge = hinge_d_loss(logits_real, logits_fake)
    if bcr_weight > 0:
        bcr = F.mse_loss(
            disc(diff_augment(real_B3HW, 0.0, 1.0, bcr_cutout)).float(), logits_real
        ) + F.mse_loss(disc(diff_augment(fake_B3HW, 0.0, 1.0, bcr_cutout)).float(), logits_fake)
    else:
        bcr = hinge.new_zeros(())
    with torch.no_grad():
        acc_real = (logits_real > 0).float().mean() * 100
        acc_fake = (logits_fake < 0).float().mean() * 100
    return DiscriminatorLoss(
        hinge + bcr_weight * bcr, hinge, bcr, logits_real, logits_fake, acc_real, acc_fake
    )


def generator_loss(
    disc: Discriminator,
    fake_B3HW: torch.Tensor,
    blur_sigma: float = 0.0,
    aug_prob: float = 1.0,
    aug_cutout: float = 0.2,
) -> torch.Tensor:
    """Adversarial generator loss -mean(D(aug(blur(fake)))); gradients flow through D into ``fake``.

    The caller freezes the discriminator's own parameters for this pass (``disc.requires_grad_(False)``, then
    back to True for the discriminator step) so the generator backward does not fill their gradients.
    """
    return hinge_g_loss(disc(diff_augment(fake_B3HW, blur_sigma, aug_prob, aug_cutout)))
