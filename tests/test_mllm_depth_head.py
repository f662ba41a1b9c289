"""Depth head (teacher forcing vs step-by-step sampling) and the per-position projector."""

import pytest
import torch
from mllm_helpers import one_thread  # noqa: F401 (autouse fixture)

from unitok.mllm import DepthHead, VisualProjector, sample_logits

N, H, K, V = 5, 24, 4, 11


@pytest.fixture()
def head():
    torch.manual_seed(0)
    return DepthHead(H, K, V, width=32, layers=2, heads=4).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_teacher_forced_logits_equal_step_by_step(head, use_cache):
    hidden = torch.randn(N, H)
    codes = torch.randint(0, V, (N, K))
    forced = head(hidden, codes)
    assert forced.shape == (N, K, V)
    steps = []

    def pick(k, logits):
        steps.append(logits)
        return codes[:, k]  # feed the true codes, as teacher forcing does

    with torch.no_grad():
        picked = head.sample(hidden, pick, use_cache=use_cache)
    assert torch.equal(picked, codes)
    torch.testing.assert_close(torch.stack(steps, dim=1), forced.detach(), rtol=1e-5, atol=1e-5)


def test_code_k_depends_only_on_earlier_codes(head):
    hidden = torch.randn(N, H)
    codes = torch.randint(0, V, (N, K))
    changed = codes.clone()
    changed[:, 2] = (changed[:, 2] + 1) % V
    a, b = head(hidden, codes), head(hidden, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_wrong_code_shape_raises(head):
    with pytest.raises(ValueError, match="expected codes"):
        head(torch.randn(N, H), torch.zeros(N, K + 1, dtype=torch.long))


def test_projector_is_per_position():
    torch.manual_seed(0)
    proj = VisualProjector(code_width=16, llm_hidden=H)
    vecs = torch.randn(2, 7, 16)
    whole = proj(vecs)
    one_by_one = torch.stack([proj(vecs[:, i]) for i in range(7)], dim=1)
    torch.testing.assert_close(whole, one_by_one)
    assert whole.shape == (2, 7, H)


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_logits(logits, temperature=0).eq(3).all()
    assert set(sample_logits(logits, top_k=2, generator=g).tolist()) == {2, 3}
    # softmax mass of index 3 is 0.64 < 0.7, so top-p 0.7 keeps {3, 2}.
    assert set(sample_logits(logits, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(sample_logits(logits, top_p=0.5, generator=g).tolist()) == {3}
    a = sample_logits(logits, generator=torch.Generator().manual_seed(1))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(set(a.tolist())) == 4
