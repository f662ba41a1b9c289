"""LPIPS perceptual distance built from the ``lpips`` package's networks, frozen, for images in [-1, 1].

The ``lpips`` package supplies the trunk (torchvision VGG16 ``features`` cut into ``slice1..5`` at
relu1_2/2_2/3_3/4_3/5_3) and the five calibrated 1x1 "lin" layers (bundled with the package, no download).
This module owns the forward pass so that it runs in float32 under autocast and keeps gradients finite (see
``_unit_normalize``). Its state_dict is ``net.slice{1..5}.{i}.*`` with torchvision's layer index ``i`` (as the
``lpips`` package builds it) and ``lins.{0..4}.model.1.weight``. The reference's combined file
``lpips_with_vgg.pth`` numbers the layers of each slice from 0 instead (``net.slice2.1`` is torchvision's
``features.5``) and may carry ``lin{i}.*`` aliases and its input-scaling buffers;
``reference_to_lpips_layout`` maps such a file on load.

Shape legend: B batch, H/W image size in pixels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

import lpips as lpips_package
import torch
import torchvision
from torch import nn

__all__ = ["LPIPS", "load_weights_file", "reference_to_lpips_layout", "torchvision_to_lpips_trunk"]

logger = logging.getLogger(__name__)

# VGG16 pools 4 times before relu5_3
_MIN_INPUT_SIZE = 16
# torchvision ``features`` index of the first layer of lpips' slice1..slice5 (cut after relu1_2 ... relu4_3)
_SLICE_STARTS = (0, 4, 9, 16, 23)
_TRUNK_KEY = re.compile(r"net\.slice([1-5])\.(\d+)\.(.+)")
_LIN_ALIAS = re.compile(r"lin([0-4])\.(.+)")
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# input-scaling constants some combined files carry as buffers; they must equal the package's
_SCALING_BUFFERS = ("shift", "scale", "scale_inv")


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


def reference_to_lpips_layout(
    state_dict: dict[str, torch.Tensor], shift: torch.Tensor, scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Map a combined LPIPS file (trunk + lins) to this module's keys.

    * Trunk keys numbered per slice from 0 (the reference's ``lpips_with_vgg.pth``: ``net.slice2.1.weight``)
      become torchvision's numbering that the ``lpips`` package uses (``net.slice2.5.weight``); a file already
      in that numbering is left as it is. The numbering is decided per file, never per key.
    * ``lin{i}.*`` aliases become ``lins.{i}.*`` (a file holding both must hold equal tensors).
    * ``shift``/``scale``/``scale_inv`` buffers are dropped after checking they equal the package's
      constants ``shift`` [1,3,1,1] and ``scale`` [1,3,1,1].

    Raises:
        ValueError: on conflicting aliases or scaling buffers that differ from the package's.
    """
    renumbered = any(
        (match := _TRUNK_KEY.fullmatch(key)) and int(match[2]) < _SLICE_STARTS[int(match[1]) - 1]
        for key in state_dict
    )
    mapped: dict[str, torch.Tensor] = {}
    aliases: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        trunk = _TRUNK_KEY.fullmatch(key)
        lin = _LIN_ALIAS.fullmatch(key)
        if trunk and renumbered:
            index = int(trunk[2]) + _SLICE_STARTS[int(trunk[1]) - 1]
            mapped[f"net.slice{trunk[1]}.{index}.{trunk[3]}"] = value
        elif lin:
            aliases[f"lins.{lin[1]}.{lin[2]}"] = value
        elif key in _SCALING_BUFFERS:
            expected = {"shift": shift, "scale": scale, "scale_inv": 1 / scale}[key]
            if value.shape != expected.shape or not torch.allclose(value.float(), expected, atol=1e-4):
                raise ValueError(
                    f"LPIPS file buffer {key!r} = {value.flatten().tolist()} differs from the lpips package's "
                    f"{expected.flatten().tolist()}"
                )
        else:
            mapped[key] = value
    for key, value in aliases.items():
        if key in mapped and not torch.equal(mapped[key], value):
            raise ValueError(f"LPIPS file holds different tensors under {key!r} and its alias lin*")
        mapped.setdefault(key, value)
    return mapped


def _is_combined_layout(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> bool:
    """True for the reference's combined file (``lins.*`` present), False for torchvision VGG16 weights."""
    if any(key.startswith(("lins.", "net.slice")) or _LIN_ALIAS.fullmatch(key) for key in state_dict):
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
      * ``weights_path`` given: either a combined file (``net.slice*`` + ``lins.*``; the reference's
        ``lpips_with_vgg.pth`` is mapped by ``reference_to_lpips_layout``, then loaded strictly) or a torchvision classifier state dict of the trunk (``features.*``, e.g. torchvision's
        ``vgg16-397923af.pth``; the lins then come from the ``lpips`` package). ``.safetensors`` or torch files.
      * else ``pretrained=True``: ImageNet trunk from torchvision (downloads through torch.hub unless cached).
      * else a randomly initialised trunk (tests), no download.
    The calibrated lin layers always come from the package or the combined file, never random.

    Args:
        net: ``"vgg"`` (the release trunk and the only one supported).
        min_size: images with H or W below it give a zero loss (release ``lpr=48``, which checks H only);
            at least 16 px.
        precision: ``"fp32"`` (the release) runs the trunk in float32 whatever the caller's autocast;
            ``"bf16"`` runs the trunk's convolutions under bf16 autocast (about 2x faster on GPUs with bf16
            tensor cores, features rounded to bf16); the unit normalisation and the lin layers stay float32.
        channels_last: keep the trunk's weights and activations NHWC (faster cuDNN convolutions; same values).
    Inputs are in [-1, 1]; the module stays in eval mode and has no trainable parameters.
    """

    def __init__(
        self,
        net: str = "vgg",
        weights_path: str | os.PathLike | None = None,
        pretrained: bool = True,
        min_size: int = 48,
        precision: str = "fp32",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if precision not in _PRECISIONS:
            raise ValueError(f"expected LPIPS precision 'fp32' or 'bf16', got {precision!r}")
        if net != "vgg":
            raise ValueError(f"unsupported LPIPS trunk {net!r}; only 'vgg' (the release trunk) is supported")
        if min_size < _MIN_INPUT_SIZE:
            raise ValueError(
                f"expected min_size >= {_MIN_INPUT_SIZE} (the trunk pools 4 times), got {min_size}"
            )
        self.min_size = min_size
        self.trunk_dtype = _PRECISIONS[precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scaling = lpips_package.ScalingLayer()
        self.register_buffer("shift", scaling.shift.clone(), persistent=False)
        self.register_buffer("scale", scaling.scale.clone(), persistent=False)
        # read, map and check a given file before building the trunk
        state_dict = load_weights_file(weights_path) if weights_path is not None else None
        combined = state_dict is not None and _is_combined_layout(state_dict, weights_path)
        if combined:
            state_dict = reference_to_lpips_layout(state_dict, self.shift, self.scale)
        from_file = weights_path is not None or pretrained
        # Every weight of a loaded trunk comes from a file: build it on the meta device (torchvision's random
        # init of VGG16 with its 100M-parameter classifier takes seconds) and assign the loaded tensors.
        with warnings.catch_warnings(), torch.device("meta") if from_file else contextlib.nullcontext():
            # lpips still passes the deprecated `pretrained=` keyword to torchvision
            warnings.simplefilter("ignore", UserWarning)
            metric = lpips_package.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        self.net = metric.net
        self.lins = metric.lins

        if combined:
            try:
                self.load_state_dict(state_dict, strict=True, assign=True)
            except RuntimeError as error:
                raise ValueError(
                    f"{str(weights_path)!r} does not fit the LPIPS VGG16 layout: {error}"
                ) from error
            logger.info("loaded LPIPS trunk and lin layers from %s", weights_path)
        else:
            if state_dict is not None:
                trunk = torchvision_to_lpips_trunk(state_dict, self.net)
                self.net.load_state_dict(trunk, strict=True, assign=True)
                logger.info("loaded LPIPS trunk from torchvision weights %s", weights_path)
            elif pretrained:
                weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
                self.net.load_state_dict(
                    torchvision_to_lpips_trunk(weights, self.net), strict=True, assign=True
                )
            self._load_package_lins()
        self.net.to(memory_format=self.memory_format)
        self.requires_grad_(False)
        self.eval()

    def _load_package_lins(self) -> None:
        state_dict = load_weights_file(Path(lpips_package.__file__).parent / "weights" / "v0.1" / "vgg.pth")
        for index, lin in enumerate(self.lins):
            lin.load_state_dict({"model.1.weight": state_dict[f"lin{index}.model.1.weight"]}, assign=True)

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
        rec_feats = self._features(rec_B3HW)
        # The target (data, no gradient) runs apart under no_grad: its VGG activations are neither kept
        # for the backward pass nor back-propagated through, which halves LPIPS's backward.
        with torch.no_grad() if not img_B3HW.requires_grad else contextlib.nullcontext():
            img_feats = self._features(img_B3HW)
        with torch.autocast(device_type=rec_B3HW.device.type, enabled=False):
            distance = rec_B3HW.new_zeros((), dtype=torch.float32)
            for rec_f, img_f, lin in zip(rec_feats, img_feats, self.lins):
                diff = (_unit_normalize(rec_f.float()) - _unit_normalize(img_f.float())).square()
                distance = distance + lin(diff).mean()
        return distance

    def _features(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's five feature maps, in ``trunk_dtype`` whatever the caller's autocast."""
        device_type = img_B3HW.device.type
        low = self.trunk_dtype != torch.float32
        with torch.autocast(device_type=device_type, dtype=self.trunk_dtype, enabled=low):
            x = ((img_B3HW.float() - self.shift) / self.scale).contiguous(memory_format=self.memory_format)
            return list(self.net(x))
