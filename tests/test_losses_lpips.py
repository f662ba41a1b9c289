"""LPIPS wrapper with a random trunk (no download): distances, gradients, weight files, frozen state."""

from pathlib import Path

import lpips as lpips_package
import pytest
import torch
from safetensors.torch import save_file

from unitok.tokenizer.losses import LPIPS, ReconstructionLoss
from unitok.tokenizer.losses.perceptual import _SLICE_STARTS, _unit_normalize


@pytest.fixture(scope="module")
def metric():
    torch.manual_seed(0)
    return LPIPS(pretrained=False, min_size=16)


def _images(seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=generator) * 2 - 1


def test_zero_for_identical_positive_otherwise(metric):
    img = _images(0)
    assert metric(img, img).item() == 0.0
    assert metric(_images(1), img).item() > 0
    assert metric(img * 0.9, img).item() > 0
    assert metric(_images(1), img).item() == pytest.approx(metric(img, _images(1)).item(), rel=1e-5)


def test_gradient_flows_and_is_finite(metric):
    img = _images(0)
    rec = _images(1).requires_grad_(True)
    metric(rec, img).backward()
    assert rec.grad is not None and torch.isfinite(rec.grad).all() and rec.grad.abs().sum() > 0
    black = torch.full((1, 3, 16, 16), -1.0, requires_grad=True)
    metric(black, torch.ones(1, 3, 16, 16)).backward()
    assert torch.isfinite(black.grad).all()
    zeros = torch.zeros(1, 4, 2, 2, requires_grad=True)  # all channels zero, as after a ReLU
    _unit_normalize(zeros).sum().backward()
    assert torch.isfinite(zeros.grad).all()


def test_small_images_skipped_and_shapes_checked(metric):
    small = _images(0, size=12)
    assert metric(small, -small).item() == 0.0
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        metric(_images(0), _images(0, size=20))
    with pytest.raises(ValueError, match="min_size"):
        LPIPS(pretrained=False, min_size=8)


def test_frozen_layout_and_bundled_lins(metric):
    assert not any(p.requires_grad for p in metric.parameters())
    metric.train()
    assert not metric.training and not any(m.training for m in metric.modules())
    keys = list(metric.state_dict())
    assert all(k.startswith(("net.slice", "lins.")) for k in keys)
    assert {f"lins.{i}.model.1.weight" for i in range(5)} <= set(keys)
    bundled_path = Path(lpips_package.__file__).parent / "weights/v0.1/vgg.pth"
    bundled = torch.load(bundled_path, map_location="cpu", weights_only=True)
    assert torch.equal(metric.lins[3].model[1].weight, bundled["lin3.model.1.weight"])


def test_loads_torchvision_and_combined_files(metric, tmp_path):
    torch.manual_seed(1)
    trunk = {
        f"features.{k.split('.', 1)[1]}": torch.randn_like(v) for k, v in metric.net.state_dict().items()
    }
    trunk["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    save_file(trunk, tmp_path / "vgg16.safetensors")
    loaded = LPIPS(weights_path=tmp_path / "vgg16.safetensors", min_size=16)
    assert torch.equal(getattr(loaded.net.slice2, "5").weight, trunk["features.5.weight"])
    assert torch.equal(loaded.lins[0].model[1].weight, metric.lins[0].model[1].weight)

    combined = {k: v * 2 if k.startswith("lins.") else v for k, v in loaded.state_dict().items()}
    torch.save(combined, tmp_path / "lpips_with_vgg.pth")
    reloaded = LPIPS(weights_path=tmp_path / "lpips_with_vgg.pth", min_size=16)
    assert torch.equal(reloaded.lins[4].model[1].weight, combined["lins.4.model.1.weight"])
    assert torch.equal(getattr(reloaded.net.slice5, "28").weight, trunk["features.28.weight"])

    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="neither"):
        LPIPS(weights_path=tmp_path / "bad.pth")


def _reference_layout(state_dict):
    """This module's state dict written the way the reference's lpips_with_vgg.pth is: each slice numbered
    from 0, lins under both ``lins.{i}`` and ``lin{i}``, the input-scaling buffers included."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("net.slice"):
            _, slice_name, index, param = key.split(".")
            start = _SLICE_STARTS[int(slice_name[-1]) - 1]
            out[f"net.{slice_name}.{int(index) - start}.{param}"] = value.clone()
        else:
            out[key] = value.clone()
            out[key.replace("lins.", "lin")] = value.clone()
    out["shift"] = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    out["scale_inv"] = 1 / torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    return out


def test_loads_reference_layout_file(metric, tmp_path):
    torch.manual_seed(2)
    source = {k: torch.randn_like(v) for k, v in metric.state_dict().items()}
    reference = _reference_layout(source)
    assert "net.slice2.1.weight" in reference and "net.slice3.5.weight" in reference
    assert "net.slice2.5.weight" not in reference
    torch.save(reference, tmp_path / "lpips_with_vgg.pth")
    loaded = LPIPS(weights_path=tmp_path / "lpips_with_vgg.pth", min_size=16)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, source[key]), key
    # torchvision's features.5 is the reference's slice2.1
    assert torch.equal(getattr(loaded.net.slice2, "5").weight, reference["net.slice2.1.weight"])
    img = _images(0)
    assert loaded(_images(1), img).item() != pytest.approx(metric(_images(1), img).item())

    bad = dict(reference, shift=torch.zeros(1, 3, 1, 1))
    torch.save(bad, tmp_path / "bad_shift.pth")
    with pytest.raises(ValueError, match="shift"):
        LPIPS(weights_path=tmp_path / "bad_shift.pth", min_size=16)
    conflict = dict(reference, **{"lin0.model.1.weight": reference["lin0.model.1.weight"] + 1})
    torch.save(conflict, tmp_path / "conflict.pth")
    with pytest.raises(ValueError, match="alias"):
        LPIPS(weights_path=tmp_path / "conflict.pth", min_size=16)
    truncated = {k: v for k, v in reference.items() if not k.startswith("net.slice4.")}
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match=r"(?s)truncated\.pth.*slice4"):
        LPIPS(weights_path=tmp_path / "truncated.pth", min_size=16)


def test_reconstruction_loss_with_lpips(metric):
    img, rec = _images(0), _images(1)
    out = ReconstructionLoss(0.2, 1.0, 0.5, lpips=metric)(rec, img)
    expected = 0.2 * (rec - img).abs().mean() + (rec - img).square().mean() + 0.5 * metric(rec, img)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_only_vgg_trunk():
    with pytest.raises(ValueError, match="vgg"):
        LPIPS(net="alex", pretrained=False)
