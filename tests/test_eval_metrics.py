"""Formula tests for the evaluation metrics: Fréchet distance, feature statistics, PSNR, SSIM, codebook stats."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision

from unitok.eval.codebook import CodebookStats, codebook_stats
from unitok.eval.fid import FeatureStats, frechet_distance, frechet_distance_torch
from unitok.eval.image_metrics import psnr, ssim
from unitok.eval.inception import FID_FEATURE_DIM, InceptionFeatures, to_uint8


def _direct_fid(x, y):
    """FID written out from its definition with scipy, for comparison."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture
def feature_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = rng.normal(loc=0.5, scale=1.5, size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5
    return x, y


def test_frechet_distance_matches_scipy(feature_sets):
    x, y = feature_sets
    expected = _direct_fid(x, y)
    got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_torch_path_equals_scipy(feature_sets):
    x, y = feature_sets
    stats = [(z.mean(0), np.cov(z, rowvar=False)) for z in (x, y)]
    assert frechet_distance_torch(*stats[0], *stats[1]) == pytest.approx(
        frechet_distance(*stats[0], *stats[1]), rel=1e-8
    )


def test_frechet_distance_is_zero_for_identical_sets(feature_sets):
    x, _ = feature_sets
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_torch(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_singular_covariance_is_finite():
    """Fewer samples than dimensions (rank-deficient covariances) must still give a finite number."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 16)), rng.normal(size=(5, 16)) + 1.0
    fid = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert math.isfinite(fid) and fid > 0
    stats = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance_torch(*stats) == pytest.approx(fid, rel=1e-6)


def test_frechet_distance_is_torch_fidelitys_number(feature_sets):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    x, y = feature_sets
    stats = [{"mu": z.mean(0), "sigma": np.cov(z, rowvar=False)} for z in (x, y)]
    expected = fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID]
    as_tensors = [torch.from_numpy(v).float() for v in (*stats[0].values(), *stats[1].values())]
    assert frechet_distance(*stats[0].values(), *stats[1].values()) == expected
    assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_rejects_non_finite_statistics(feature_sets):
    x, _ = feature_sets
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    sigma_nan = sigma.copy()
    sigma_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="sigma2 holds NaN"):
        frechet_distance(mu, sigma, mu, sigma_nan)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[F\]"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_streaming_equals_batch():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=3.0, size=(101, 6))
    stats = FeatureStats()
    for chunk in np.array_split(x, [1, 7, 40, 41]):
        stats.update(torch.from_numpy(chunk).float())
    x32 = x.astype(np.float32).astype(np.float64)
    assert stats.count == 101
    np.testing.assert_allclose(stats.mean, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x32, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_merge_and_fid_method(feature_sets):
    x, y = feature_sets
    a, b, both = FeatureStats(), FeatureStats(), FeatureStats()
    a.update(torch.from_numpy(x[:60]))
    b.update(torch.from_numpy(x[60:]))
    a.merge(b)
    both.update(torch.from_numpy(x))
    np.testing.assert_allclose(a.cov, both.cov, rtol=1e-12)
    other = FeatureStats()
    other.update(torch.from_numpy(y))
    assert a.frechet_distance(other) == pytest.approx(_direct_fid(x, y), rel=1e-9)


def test_feature_stats_validates_input():
    stats = FeatureStats()
    stats.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov
    with pytest.raises(ValueError, match="features per sample"):
        stats.update(torch.zeros(2, 4))


def test_psnr_identical_and_known_noise():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    assert torch.isinf(psnr(img, img)).all()
    sigma = 0.05
    noisy = img + sigma * torch.randn_like(img)
    expected = 10 * math.log10(4.0 / sigma**2)  # range 2 on [-1,1]
    assert psnr(noisy, img) == pytest.approx(torch.full((2,), expected, dtype=torch.float64), abs=0.3)
    # Same value on [0,1] with range 1 and on the uint8 scale with range 255.
    torch.testing.assert_close(psnr((noisy + 1) / 2, (img + 1) / 2, data_range=1.0), psnr(noisy, img))
    torch.testing.assert_close(
        psnr((noisy + 1) * 127.5, (img + 1) * 127.5, data_range=255.0), psnr(noisy, img)
    )


def test_psnr_hand_case():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.2)  # MSE = 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert float(psnr(a, b)) == pytest.approx(20.0, abs=1e-5)  # 0.2 is inexact in float32


def test_ssim_identical_is_one_and_noise_lowers_it():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 24, 24) * 2 - 1
    torch.testing.assert_close(ssim(img, img), torch.ones(2, dtype=torch.float64))
    low = ssim(img + 0.1 * torch.randn_like(img), img)
    high = ssim(img + 0.02 * torch.randn_like(img), img)
    assert (low < high).all() and (high < 1).all()


def test_ssim_constant_images_hand_case():
    """Flat images have zero variance, so SSIM reduces to the luminance term (2ab + C1)/(a^2 + b^2 + C1)."""
    a, b = 0.2, -0.4
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)
    got = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_window_by_window_formula():
    """SSIM written out per 11x11 window with explicit Gaussian weights (13x13 image: 3x3 windows)."""
    rng = np.random.default_rng(3)
    a = rng.uniform(-1, 1, size=(1, 1, 13, 13))
    b = np.clip(a + rng.normal(scale=0.3, size=a.shape), -1, 1)
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    values = []
    for i in range(3):
        for j in range(3):
            pa, pb = a[0, 0, i : i + 11, j : j + 11], b[0, 0, i : i + 11, j : j + 11]
            mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
            var_a, var_b = (w * (pa - mu_a) ** 2).sum(), (w * (pb - mu_b) ** 2).sum()
            cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
            values.append(
                (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            )
    got = ssim(torch.from_numpy(a), torch.from_numpy(b))
    assert float(got) == pytest.approx(np.mean(values), rel=1e-10)


def test_ssim_matches_skimage_if_installed():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    a = torch.rand(1, 3, 32, 32)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    ref = metrics.structural_similarity(
        a[0].numpy(),
        b[0].numpy(),
        data_range=1.0,
        channel_axis=0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert float(ssim(a, b, data_range=1.0)) == pytest.approx(ref, rel=1e-6)


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_codebook_stats_hand_case():
    # K = 2 sub-codebooks of V = 4 entries. Codebook 0 uses entries {0, 1} equally -> 50 %, perplexity 2;
    # codebook 1 uses only entry 3 -> 25 %, perplexity 1.
    codes = torch.tensor([[0, 3], [1, 3], [0, 3], [1, 3]])
    stats = CodebookStats(num_codebooks=2, codebook_size=4)
    stats.update(codes[:3])
    stats.update(codes[3:].view(1, 1, 2))
    torch.testing.assert_close(stats.usage, torch.tensor([50.0, 25.0], dtype=torch.float64))
    torch.testing.assert_close(stats.perplexity, torch.tensor([2.0, 1.0], dtype=torch.float64))
    summary = codebook_stats([codes[:2].view(1, 2, 1, 2), codes[2:]], codebook_size=4)
    assert summary["usage_percent"] == [50.0, 25.0]
    assert summary["perplexity_mean"] == pytest.approx(1.5)
    assert summary["num_codes"] == 4


def test_codebook_stats_uniform_perplexity_and_validation():
    stats = CodebookStats(num_codebooks=1, codebook_size=8)
    stats.update(torch.arange(8).repeat(3).view(-1, 1))
    assert float(stats.perplexity[0]) == pytest.approx(8.0)
    assert float(stats.usage[0]) == 100.0
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        stats.update(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="K=1"):
        stats.update(torch.zeros(2, 3, dtype=torch.long))


class TinyExtractor(torch.nn.Module):
    """A small random conv net taking uint8 images, standing in for the 2048-d Inception."""

    def __init__(self, width=16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x_uint8):
        assert x_uint8.dtype == torch.uint8
        return self.net(x_uint8.float() / 255.0).flatten(1)


def test_inception_features_with_injected_extractor():
    torch.manual_seed(0)
    feats = InceptionFeatures(extractor=TinyExtractor())
    img = torch.rand(4, 3, 32, 32) * 2 - 1
    out = feats(img)
    assert out.shape == (4, 16) and out.dtype == torch.float32
    # uint8 quantisation as for saved PNGs: -1 -> 0, 1 -> 255, 0 -> 128 (round half to even of 127.5)
    assert to_uint8(torch.tensor([-1.0, 1.0, 0.0, 2.0])).tolist() == [0, 255, 128, 255]


def test_fid_inception_loads_local_weights(tmp_path):
    """The torch-fidelity Inception loads a local pt_inception-style file (torchvision key names) strictly."""
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(reference.state_dict(), path)
    feats = InceptionFeatures(weights_path=path)
    loaded = feats.extractor.state_dict()
    for name in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.bias"):
        torch.testing.assert_close(loaded[name], reference.state_dict()[name])
    out = feats(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.shape == (2, FID_FEATURE_DIM) and torch.isfinite(out).all()


def test_fid_inception_missing_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        InceptionFeatures(weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="download=True"):
        InceptionFeatures()


def test_zero_shot_templates_default_to_the_papers_except_on_the_synthetic_world(tmp_path):
    from unitok.data.synth import WORLD_NAME
    from unitok.eval.zero_shot import AUTO, default_templates, get_templates

    assert len(get_templates("openai-imagenet")) == 80
    world = tmp_path / "world"
    for attribute in ("shape", "color"):
        (world / "classify" / attribute / "val" / "a").mkdir(parents=True)
    (world / "metadata.json").write_text(json.dumps({"name": WORLD_NAME}))
    assert default_templates(world / "classify" / "shape" / "val") == "synth-shape"
    assert default_templates(world / "classify" / "color" / "val" / "a") == "synth-color"
    imagenet = tmp_path / "imagenet" / "val"
    imagenet.mkdir(parents=True)
    assert default_templates(imagenet) == "openai-imagenet"
    # a folder named like the world's, without the world's metadata, is not the synthetic world
    (world / "metadata.json").write_text(json.dumps({"name": "something else"}))
    assert default_templates(world / "classify" / "shape" / "val") == "openai-imagenet"
    with pytest.raises(ValueError, match="auto"):
        get_templates(AUTO)
