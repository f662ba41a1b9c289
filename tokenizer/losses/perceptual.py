"""LPIPS perceptual distance built from the ``lpips`` package's networks, frozen, for images in [-1, 1].

The ``lpips`` package supplies the trunk (torchvision VGG16 ``features`` cut into ``slice1..5`` at
relu1_2/2_2/3_3/4_3/5_3) and the five calibrated 1x1 "lin" layers (bundled with the package, no download).
This module owns the forward pass so that it runs in float32 under autocast and keeps gradients finite (see
``_unit_normalize``). Its state_dict has exactly the layout of the reference's combined file
``lpips_with_vgg.pth``: ``net.slice{1..5}.*`` and ``lins.{0..4}.model.1.weight``.

Shape legend: B batch, H/W image size in pixels.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lpips as lpips_package
import torch
import torchvision
from torch import nn

__all__ = ["LPIPS", "load_weights_file", "torchvision_to_lpips_trunk"]

logger = logging.getLogger(__name__)

# VGG16 pools 4 times before relu5_3
_MIN_INPUT_SIZE = 16


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (``weights_only=True``), on CPU."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"expected a state dict (name -> tensor) in {str(path)!r}, got {type(state_dict).__name__}"
        )
    return state_dict


def torchvision_to_lpips_trunk(
    state_dict: dict[str, torch.Tensor], trunk: nn.Module
) -> dict[str, torch.Tensor]:
    """Map a torchvision classifier state dict (``features.{i}.*``, ``classifier.*`` ignored) to the keys of an
    ``lpips`` trunk (``slice{k}.{i}.*``: each slice keeps the torchvision layer index as its child name)."""
    mapped = {}
    for name in trunk.state_dict():
        source = "features." + name.split(".", 1)[1]
        if source not in state_dict:
            raise ValueError(f"torchvision weights lack {source!r} (needed for trunk key {name!r})")
        mapped[name] = state_dict[source]
    return mapped


def _is_combined_layout(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> bool:
    """True for the reference's combined file (``lins.*`` present), False for torchvision VGG16 weights."""
    if any(key.startswith("lins.") for key in state_dict):
        return True
    if any(key.startswith("features.") for key in state_dict):
        return False
    raise ValueError(
        f"{str(path)!r} is neither a combined LPIPS file (keys net.slice*/lins.*) nor torchvision VGG16 "
        f"weights (keys features.*); first keys: {sorted(state_dict)[:4]}"
    )


def _unit_normalize(feats_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # the small constant under the root keeps the gradient finite where a ReLU zeroes every channel
    # (lpips.normalize_tensor takes sqrt(0) there and back-propagates NaN)
    return feats_BCHW / (torch.sqrt(feats_BCHW.square().sum(dim=1, keepdim=True) + 1e-9) + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS distance; ``forward(rec_B3HW, img_B3HW)`` -> float32 scalar (mean over the batch).

    Weights:
      * ``weights_path`` given: either the reference's combined file (``net.slice*`` + ``lins.*``, loaded
        strictly) or a torchvision classifier state dict of the trunk (``features.*``, e.g. torchvision's
        ``vgg16-397923af.pth``; the lins then come from the ``lpips`` package). ``.safetensors`` or torch files.
      * else ``pretrained=True``: ImageNet trunk from torchvision (downloads through torch.hub unless cached).
      * else a randomly initialised trunk (tests), no download.
    The calibrated lin layers always come from the package or the combined file, never random.

    Args:
        net: ``"vgg"`` (the release trunk and the only one supported).
        min_size: images with H or W below it give a zero loss (release ``lpr=48``, which checks H only);
            at least 16 px.
    Inputs are in [-1, 1]; the module stays in eval mode and has no trainable parameters.
    """

    def __init__(
        self,
        net: str = "vgg",
        weights_path: str | os.PathLike | None = None,
        pretrained: bool = True,
        min_size: int = 48,
    ) -> None:
        super().__init__()
        if net != "vgg":
            raise ValueError(f"unsupported LPIPS trunk {net!r}; only 'vgg' (the release trunk) is supported")
        if min_size < _MIN_INPUT_SIZE:
            raise ValueError(
                f"expected min_size >= {_MIN_INPUT_SIZE} (the trunk pools 4 times), got {min_size}"
            )
        self.min_size = min_size
        # read and check a given file before building the (slow to initialise) trunk
        state_dict = load_weights_file(weights_path) if weights_path is not None else None
        combined = state_dict is not None and _is_combined_layout(state_dict, weights_path)
        with warnings.catch_warnings():
            # lpips still passes the deprecated `pretrained=` keyword to torchvision
            warnings.simplefilter("ignore", UserWarning)
            metric = lpips_package.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        self.net = metric.net
        self.lins = metric.lins
        scaling = metric.scaling_layer
        self.register_buffer("shift", scaling.shift.clone(), persistent=False)
        self.register_buffer("scale", scaling.scale.clone(), persistent=False)

        if combined:
            self.load_state_dict(state_dict, strict=True)
            logger.info("loaded LPIPS trunk and lin layers from %s", weights_path)
        else:
            if state_dict is not None:
                self.net.load_state_dict(torchvision_to_lpips_trunk(state_dict, self.net), strict=True)
                logger.info("loaded LPIPS trunk from torchvision weights %s", weights_path)
            elif pretrained:
                weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
                self.net.load_state_dict(torchvision_to_lpips_trunk(weights, self.net), strict=True)
            self._load_package_lins()
        self.requires_grad_(False)
        self.eval()

    def _load_package_lins(self) -> None:
        state_dict = load_weights_file(Path(lpips_package.__file__).parent / "weights" / "v0.1" / "vgg.pth")
        for index, lin in enumerate(self.lins):
            lin.load_state_dict({"model.1.weight": state_dict[f"lin{index}.model.1.weight"]})

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode (frozen metric)."""
        return super().train(False)

    def forward(self, rec_B3HW: torch.Tensor, img_B3HW: torch.Tensor) -> torch.Tensor:
        if rec_B3HW.ndim != 4 or rec_B3HW.shape[1] != 3 or rec_B3HW.shape != img_B3HW.shape:
            raise ValueError(
                f"expected two image batches of the same shape [B,3,H,W], got {list(rec_B3HW.shape)} "
                f"and {list(img_B3HW.shape)}"
            )
        if min(rec_B3HW.shape[-2:]) < self.min_size:
            return rec_B3HW.new_zeros((), dtype=torch.float32)
        batch = rec_B3HW.shape[0]
        with torch.autocast(device_type=rec_B3HW.device.type, enabled=False):
            both = (torch.cat([rec_B3HW, img_B3HW]).float() - self.shift) / self.scale
            distance = rec_B3HW.new_zeros((), dtype=torch.float32)
            for feats, lin in zip(self.net(both), self.lins):
                diff = (_unit_normalize(feats[:batch]) - _unit_normalize(feats[batch:])).square()
                distance = distance + lin(diff).mean()
        return distance
