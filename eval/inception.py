"""Inception-v3 pool3 features exactly as FID measures them.

The paper's rFID uses torch-fidelity's ``inception-v3-compat`` extractor (the TensorFlow FID graph
ported to PyTorch, TF1-compatible bilinear resize to 299 px) with the 2015-12-05 FID weights and
its 2048-d pool3 layer. We depend on torch-fidelity for that network instead of re-implementing it.
Both published conversions of the weights load: torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` and pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(same key names and shapes).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

FID_FEATURE_DIM = 2048
# Layers torch-fidelity's Inception can stop at; "2048" (pool3) is FID. The smaller ones (earlier
# pools) are only for quick checks: their numbers are not comparable with published FIDs.
FID_LAYERS = ("64", "192", "768", "2048")
FID_WEIGHTS_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")


def to_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    """Images in [-1,1] -> uint8 [0,255] with the rounding used when reconstructions are saved as PNG."""
    return ((img_B3HW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def find_cached_inception_weights() -> Path | None:
    """Return the FID Inception weights if a previous download left them in the torch hub cache."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in FID_WEIGHTS_FILENAMES:
        if (cache / name).is_file():
            return cache / name
    return None


def load_fid_inception(
    weights_path: str | Path | None = None, download: bool = False, layer: str = "2048"
) -> nn.Module:
    """Build torch-fidelity's FID Inception-v3 returning pool3 features (or an earlier layer's).

    Args:
        weights_path: a local ``*inception-2015-12-05-6726825d.pth`` file. It is read with
            ``torch.load(weights_only=True)``; torch-fidelity then receives an in-memory copy of the
            checked tensors (it would otherwise unpickle the file without that protection).
        download: with no ``weights_path``, let torch-fidelity download its weights (network needed).
        layer: one of ``FID_LAYERS``; the feature width. ``"2048"`` is the standard FID.

    Returns:
        a module mapping uint8 images [B,3,H,W] to a 1-tuple of features [B,int(layer)] (float32).

    Raises:
        ValueError: when neither a path nor ``download=True`` is given.
        FileNotFoundError: when ``weights_path`` does not exist.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if layer not in FID_LAYERS:
        raise ValueError(f"Inception feature layer must be one of {FID_LAYERS}, got {layer!r}")
    if weights_path is None:
        if not download:
            raise ValueError(
                "load_fid_inception needs weights_path (a local FID Inception .pth) or download=True"
            )
        return FeatureExtractorInceptionV3("inception-v3-compat", [layer])
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found: {path} (expected one of {FID_WEIGHTS_FILENAMES})"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return FeatureExtractorInceptionV3("inception-v3-compat", [layer], feature_extractor_weights_path=buffer)


class InceptionFeatures(nn.Module):
    """Images [B,3,H,W] in [-1,1] -> FID features [B,F] (float32; F = 2048 for the real Inception).

    Images are first quantised to uint8 exactly as when they are saved to PNG, so the features equal
    those of the written files that the reference's torch-fidelity run reads.

    Args:
        weights_path: local FID Inception weights (see :func:`load_fid_inception`).
        extractor: any module mapping uint8 [B,3,H,W] to features [B,F] (or a tuple whose first
            item is that); used instead of the Inception, e.g. a tiny network in tests.
        download: allow torch-fidelity to download the weights when no path is given.
        layer: the Inception layer (see ``FID_LAYERS``); ``"2048"``, pool3, is FID.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        download: bool = False,
        layer: str = "2048",
    ):
        super().__init__()
        if extractor is not None and weights_path is not None:
            raise ValueError("pass either weights_path or extractor to InceptionFeatures, not both")
        if extractor is None:
            extractor = load_fid_inception(weights_path, download, layer)
        self.extractor = extractor
        if isinstance(self.extractor, nn.Module):
            self.extractor.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3:
            raise ValueError(f"expected images of shape [B,3,H,W] in [-1,1], got {list(img_B3HW.shape)}")
        feats = self.extractor(to_uint8(img_B3HW))
        if isinstance(feats, tuple | list):
            feats = feats[0]
        return feats.float().flatten(1)
