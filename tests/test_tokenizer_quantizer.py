"""Tests of unitok.tokenizer.quantizer: round trips, gradients, the loop reference, release keys, usage stats."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import unitok.tokenizer.quantizer as quantizer_module
from unitok.scripts.bench_quantizer import LoopMultiCodebookQuantizer
from unitok.scripts.bench_quantizer import main as bench_main
from unitok.tokenizer.quantizer import (
    MultiCodebookQuantizer,
    QuantizerOutput,
    ResidualQuantizer,
    nearest_codes,
)

TINY = dict(num_codebooks=4, codebook_size=64, code_dim=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# quantizer.* rows of /work/shared/reference/unitok-release-keys.tsv (state dict of the released model).
RELEASE_QUANTIZER_KEYS = {
    **{f"quantizer.codebooks.{i}.vocab_usage": (4096,) for i in range(8)},
    **{f"quantizer.codebooks.{i}.codebook.weight": (4096, 8) for i in range(8)},
}


def _spread_codebook(quantizer: nn.Module, seed: int = 0) -> None:
    """Replace the tiny release init by well-spread rows so that tests exercise many distinct codes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.randn(quantizer.codebook.shape, generator=generator))


def _pair(entropy_weight: float = 0.0, seed: int = 0):
    batched = MultiCodebookQuantizer(**TINY, entropy_weight=entropy_weight)
    _spread_codebook(batched, seed)
    loop = LoopMultiCodebookQuantizer(**TINY, entropy_weight=entropy_weight)
    loop.load_state_dict(batched.state_dict(), strict=True)
    return batched, loop


def _loop_codebook_grad(loop: LoopMultiCodebookQuantizer) -> torch.Tensor:
    return torch.stack([sub.codebook.weight.grad for sub in loop.codebooks])


@pytest.mark.parametrize("cls", [MultiCodebookQuantizer, ResidualQuantizer])
@pytest.mark.parametrize("shape", [(2, 7), (2, 3, 5), (16,), ()])
def test_codes_to_vectors_is_exact_inverse_of_forward(cls, shape):
    quantizer = cls(**TINY)
    _spread_codebook(quantizer)
    z = torch.randn(*shape, 16)
    out = quantizer(z)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.shape == (*shape, 4) and out.codes.dtype == torch.long
    assert out.quantized.shape == z.shape
    assert torch.equal(quantizer.codes_to_vectors(out.codes), out.quantized)
    assert torch.equal(quantizer.quantize(z), out.codes)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 64


def test_mcq_output_chunks_are_unit_vectors_of_the_normalised_codebook():
    quantizer = MultiCodebookQuantizer(**TINY)
    out = quantizer(torch.randn(3, 5, 16))
    norms = out.quantized.view(3, 5, 4, 4).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    rows = F.normalize(quantizer.codebook[2], dim=-1)
    torch.testing.assert_close(out.quantized[1, 4, 8:12], rows[out.codes[1, 4, 2]], rtol=0, atol=0)


def test_straight_through_gradient_reaches_z_and_codebook_only_through_loss():
    quantizer = MultiCodebookQuantizer(**TINY)
    z = torch.randn(2, 6, 16, requires_grad=True)
    upstream = torch.randn(2, 6, 16)
    (quantizer(z).quantized * upstream).sum().backward()
    # The straight-through output passes the gradient of the per-chunk normalisation, and nothing else.
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref.view(2, 6, 4, 4), dim=-1).view(2, 6, 16) * upstream).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    assert z.grad.abs().sum() > 0
    assert quantizer.codebook.grad is None
    quantizer(z).loss.backward()
    assert quantizer.codebook.grad is not None and quantizer.codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_batched_matches_per_codebook_loop_reference(entropy_weight):
    batched, loop = _pair(entropy_weight)
    for step in range(3):  # several steps also exercise the EMA (copy, then momentum)
        z = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(step))
        z_batched, z_loop = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        upstream = torch.randn_like(z)
        batched.zero_grad()
        loop.zero_grad()
        out, ref = batched(z_batched), loop(z_loop)
        assert torch.equal(out.codes, ref.codes)
        torch.testing.assert_close(out.quantized, ref.quantized)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.entropy_loss, ref.entropy_loss)
        torch.testing.assert_close(out.usage, ref.usage)
        torch.testing.assert_close(out.perplexity, ref.perplexity)
        (out.loss + out.entropy_loss + (out.quantized * upstream).sum()).backward()
        (ref.loss + ref.entropy_loss + (ref.quantized * upstream).sum()).backward()
        torch.testing.assert_close(z_batched.grad, z_loop.grad)
        torch.testing.assert_close(batched.codebook.grad, _loop_codebook_grad(loop))
    if entropy_weight == 0:
        assert out.entropy_loss.item() == 0.0
    else:
        assert out.entropy_loss.requires_grad
    reference_ema = torch.stack([sub.vocab_usage for sub in loop.codebooks])
    torch.testing.assert_close(batched.ema_usage, reference_ema)


def test_nearest_codes_tiling_and_blocked_argmax_equal_plain_argmax(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 101, 5, generator=generator)
    w = torch.randn(3, 256, 5, generator=generator)
    expected = torch.bmm(x, w.transpose(1, 2)).argmax(-1)
    monkeypatch.setattr(quantizer_module, "_CPU_TILE_BYTES", 3 * 256 * 4 * 7)  # 7 rows per tile, ragged end
    assert torch.equal(nearest_codes(x, w), expected)
    # Ties resolve to the first maximum, as torch.argmax (blocks of 128: ties inside and across blocks).
    scores = torch.randint(0, 3, (2, 40, 256), generator=generator).float()
    assert torch.equal(quantizer_module._first_argmax(scores), scores.argmax(-1))
    odd = torch.randn(2, 9, 37, generator=generator)  # no block size divides 37: plain argmax
    assert torch.equal(quantizer_module._first_argmax(odd), odd.argmax(-1))


def test_state_dict_uses_release_keys_and_round_trips_strictly():
    source, loop = _pair()
    for _ in range(2):
        source(torch.randn(4, 16))
    state = source.state_dict()
    expected_keys = [f"codebooks.{i}.{name}" for i in range(4) for name in ("vocab_usage", "codebook.weight")]
    assert list(state) == expected_keys
    assert state["codebooks.2.codebook.weight"].shape == (64, 4)
    assert torch.equal(state["codebooks.2.codebook.weight"], source.codebook[2])
    assert torch.equal(state["codebooks.1.vocab_usage"], source.ema_usage[1])

    target = MultiCodebookQuantizer(**TINY)
    result = target.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(target.codebook, source.codebook) and torch.equal(target.ema_usage, source.ema_usage)
    # The natural ModuleList layout (release style) reads the same keys, and back.
    assert set(loop.state_dict()) == set(state)
    again = MultiCodebookQuantizer(**TINY)
    again.load_state_dict(loop.state_dict(), strict=True)
    assert torch.equal(again.codebook, source.codebook)


def test_state_dict_matches_release_tsv_inside_a_parent_module():
    parent = nn.Module()
    parent.quantizer = MultiCodebookQuantizer(num_codebooks=8, codebook_size=4096, code_dim=8)
    shapes = {key: tuple(value.shape) for key, value in parent.state_dict().items()}
    assert shapes == RELEASE_QUANTIZER_KEYS
    released = {key: torch.randn(shape) for key, shape in RELEASE_QUANTIZER_KEYS.items()}
    parent.load_state_dict(released, strict=True)
    assert torch.equal(parent.quantizer.codebook[5], released["quantizer.codebooks.5.codebook.weight"])
    assert torch.equal(parent.quantizer.ema_usage[7], released["quantizer.codebooks.7.vocab_usage"])


def test_load_state_dict_reports_missing_unexpected_and_mismatched_keys():
    quantizer = MultiCodebookQuantizer(**TINY)
    state = quantizer.state_dict()
    missing = {k: v for k, v in state.items() if k != "codebooks.3.codebook.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*codebooks\.3\.codebook\.weight"):
        MultiCodebookQuantizer(**TINY).load_state_dict(missing, strict=True)
    extra = {**state, "codebooks.4.codebook.weight": torch.zeros(64, 4), "codebook": torch.zeros(4, 64, 4)}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)"):
        MultiCodebookQuantizer(**TINY).load_state_dict(extra, strict=True)
    result = MultiCodebookQuantizer(**TINY).load_state_dict(
        {**missing, "codebooks.4.codebook.weight": torch.zeros(64, 4)}, strict=False
    )
    assert result.missing_keys == ["codebooks.3.codebook.weight"]
    assert result.unexpected_keys == ["codebooks.4.codebook.weight"]
    wrong_shape = {**state, "codebooks.0.codebook.weight": torch.zeros(64, 5)}
    with pytest.raises(RuntimeError, match=r"size mismatch for codebooks\.0\.codebook\.weight"):
        MultiCodebookQuantizer(**TINY).load_state_dict(wrong_shape, strict=True)


def test_load_state_dict_assign_replaces_meta_tensors():
    source = MultiCodebookQuantizer(**TINY)
    with torch.device("meta"):
        target = MultiCodebookQuantizer(**TINY)
    target.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert isinstance(target.codebook, nn.Parameter) and target.codebook.device.type == "cpu"
    assert torch.equal(target.codebook, source.codebook)


def _hand_made_quantizer() -> MultiCodebookQuantizer:
    """K=2, V=4, d=2: codebook rows at 0, 90, 180 and 270 degrees."""
    quantizer = MultiCodebookQuantizer(num_codebooks=2, codebook_size=4, code_dim=2)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    with torch.no_grad():
        quantizer.codebook.copy_(torch.stack([rows, rows * 3.0]))  # raw rows are normalised on use
    return quantizer


def test_usage_perplexity_and_ema_on_a_hand_made_case():
    quantizer = _hand_made_quantizer()
    # codebook 0 picks codes [0, 0, 1, 2] -> p = (1/2, 1/4, 1/4, 0); codebook 1 always picks code 3.
    z = torch.tensor(
        [[2.0, 0.1, 0.0, -1.0], [1.0, -0.1, 0.1, -2.0], [0.1, 5.0, 0.0, -1.0], [-3.0, 0.2, -0.1, -1.0]]
    )
    out = quantizer(z)
    assert out.codes.tolist() == [[0, 3], [0, 3], [1, 3], [2, 3]]
    torch.testing.assert_close(out.usage, torch.tensor([75.0, 25.0]))
    torch.testing.assert_close(out.perplexity, torch.tensor([2.0**1.5, 1.0]))  # exp(1.5 ln 2)
    first = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(quantizer.ema_usage, first)  # first call copies

    second_z = torch.tensor([[0.0, -1.0, 1.0, 0.0]])  # codes (3, 0)
    quantizer(second_z)
    second = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(quantizer.ema_usage, 0.9 * first + 0.1 * second)
    stats = quantizer.usage_stats()
    assert stats["num_updates"] == 2
    torch.testing.assert_close(stats["usage"], torch.tensor([100.0, 50.0]))

    quantizer.num_usage_updates = 100  # after 100 calls the momentum becomes 0.99
    before = quantizer.ema_usage.clone()
    quantizer(second_z)
    torch.testing.assert_close(quantizer.ema_usage, 0.99 * before + 0.01 * second)

    quantizer.eval()  # eval forwards report per-batch stats but leave the EMA alone
    before = quantizer.ema_usage.clone()
    out = quantizer(z)
    torch.testing.assert_close(out.usage, torch.tensor([75.0, 25.0]))
    assert torch.equal(quantizer.ema_usage, before)


def test_usage_threshold_is_one_hundredth_of_uniform():
    # V = 4: an entry counts as used when its probability exceeds 0.01 / 4 = 0.0025.
    probs = torch.tensor([[0.0024, 0.0026, 0.5, 0.495], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(quantizer_module.codebook_usage_percent(probs), torch.tensor([75.0, 25.0]))
    uniform = torch.full((1, 8), 1 / 8)
    torch.testing.assert_close(quantizer_module.codebook_perplexity(uniform), torch.tensor([8.0]))


def test_entropy_loss_formula_on_a_hand_made_case():
    quantizer = _hand_made_quantizer()
    quantizer.entropy_weight, quantizer.entropy_temperature = 2.0, 0.5
    z = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])

    # Both chunks are unit vectors; squared distances to the 4 rows: 2 - 2 cos = (0, 2, 4, 2) or (2, 0, 2, 4).
    def entropy_term(distances):
        logits = -torch.tensor(distances) / 0.5
        probs = logits.softmax(-1)
        per_sample = -(probs * probs.log()).sum(-1).mean()
        mean = probs.mean(0)
        return per_sample + (mean * torch.log(mean + 1e-7)).sum()

    chunk0 = entropy_term([[0.0, 2.0, 4.0, 2.0], [2.0, 0.0, 2.0, 4.0]])
    chunk1 = entropy_term([[2.0, 0.0, 2.0, 4.0], [2.0, 0.0, 2.0, 4.0]])
    expected = 2.0 * (chunk0 + chunk1) / 2
    torch.testing.assert_close(quantizer(z).entropy_loss, expected)


def test_vq_loss_formula_and_beta():
    quantizer = _hand_made_quantizer()
    z = torch.tensor([[1.0, 0.5, 0.0, -2.0]])  # chunk 0 nearest row 0; chunk 1 exactly row 3
    out = quantizer(z)
    assert out.codes.tolist() == [[0, 3]]
    diff0 = torch.tensor([1.0, 0.0]) - torch.tensor([1.0, 0.5]) / math.sqrt(1.25)
    expected = 1.25 * diff0.square().sum() / 4  # (beta + 1) * mean over K*d = 4 elements
    torch.testing.assert_close(out.loss, expected)


def test_init_is_release_uniform():
    quantizer = MultiCodebookQuantizer(num_codebooks=8, codebook_size=4096, code_dim=8)
    bound = 8**-0.5 / 36
    assert quantizer.codebook.abs().max() <= bound
    assert quantizer.codebook.abs().max() > 0.99 * bound
    assert torch.equal(quantizer.ema_usage, torch.zeros(8, 4096))


def test_autocast_does_not_change_the_fp32_computation():
    quantizer = MultiCodebookQuantizer(**TINY)
    _spread_codebook(quantizer)
    z = torch.randn(4, 9, 16)
    expected = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = quantizer(z)
    assert torch.equal(got.codes, expected.codes)
    assert got.quantized.dtype == torch.float32 and got.loss.dtype == torch.float32
    assert quantizer(z.bfloat16()).quantized.dtype == torch.bfloat16  # returned in the input's dtype


@pytest.mark.parametrize("cls", [MultiCodebookQuantizer, ResidualQuantizer])
def test_bad_inputs_raise_value_errors(cls):
    quantizer = cls(**TINY)
    with pytest.raises(ValueError, match=r"expected z of shape \[\.\.\., 16\].*got \[2, 15\]"):
        quantizer(torch.randn(2, 15))
    with pytest.raises(ValueError, match="floating-point"):
        quantizer(torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        quantizer(torch.randn(0, 16))
    with pytest.raises(ValueError, match=r"expected z of shape"):
        quantizer.quantize(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"expected codes of shape \[\.\.\., 4\].*got \[2, 3\]"):
        quantizer.codes_to_vectors(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values in \[0, 64\), got values in \[0, 64\]"):
        quantizer.codes_to_vectors(torch.tensor([[0, 1, 2, 64]]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 3\]"):
        quantizer.codes_to_vectors(torch.tensor([[0, 1, 3, -1]]))
    with pytest.raises(ValueError, match="integer tensor"):
        quantizer.codes_to_vectors(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer tensor"):
        quantizer.codes_to_vectors(torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_codebooks=0), dict(codebook_size=-1), dict(entropy_temperature=0.0), dict(entropy_weight=-1)],
)
def test_bad_constructor_arguments_raise_value_errors(kwargs):
    with pytest.raises(ValueError, match="expected"):
        MultiCodebookQuantizer(**{**TINY, **kwargs})


def test_codes_to_vectors_accepts_int32_codes():
    quantizer = MultiCodebookQuantizer(**TINY)
    codes = torch.randint(0, 64, (3, 4))
    assert torch.equal(quantizer.codes_to_vectors(codes.int()), quantizer.codes_to_vectors(codes))


def test_residual_quantizer_matches_a_plain_level_loop():
    quantizer = ResidualQuantizer(**TINY)
    _spread_codebook(quantizer)
    with torch.no_grad():
        quantizer.codebook.mul_(0.5)
    z = torch.randn(5, 16)
    out = quantizer(z)
    residual = F.normalize(z.view(5, 4, 4), dim=-1).view(5, 16)  # the MCQ's per-chunk normalisation
    target = residual.clone()
    total = torch.zeros_like(residual)
    for level in range(4):
        codes = torch.cdist(residual, quantizer.codebook[level]).argmin(dim=1)
        assert torch.equal(codes, out.codes[:, level])
        residual = residual - quantizer.codebook[level][codes]
        total = total + quantizer.codebook[level][codes]
    torch.testing.assert_close(out.quantized, total)
    expected_loss = F.mse_loss(quantizer.codebook[0][out.codes[:, 0]], target) / 4  # level-0 codebook term
    assert out.loss > expected_loss  # plus the other levels and the commitment terms
    z_grad = z.clone().requires_grad_(True)
    quantizer(z_grad).loss.backward()
    assert z_grad.grad.abs().sum() > 0 and quantizer.codebook.grad.abs().sum() > 0
    keys = list(quantizer.state_dict())
    assert keys[:2] == ["codebooks.0.vocab_usage", "codebooks.0.codebook.weight"]
    assert quantizer.state_dict()["codebooks.0.codebook.weight"].shape == (64, 16)


def test_distributed_all_reduce_only_in_training(monkeypatch):
    calls = []

    def fake_all_reduce(tensor):
        calls.append(tensor.clone())
        tensor.mul_(3)  # three identical ranks

    monkeypatch.setattr(quantizer_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(quantizer_module.dist, "all_reduce", fake_all_reduce)
    quantizer = _hand_made_quantizer()
    z = torch.tensor([[2.0, 0.1, 0.0, -1.0], [0.1, 5.0, 0.0, -1.0]])
    out = quantizer(z)
    assert len(calls) == 1 and calls[0].shape == (2, 4)
    torch.testing.assert_close(out.usage, torch.tensor([50.0, 25.0]))  # normalised after the reduction
    quantizer.eval()
    quantizer(z)
    assert len(calls) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        quantizer = MultiCodebookQuantizer(**TINY)
        _spread_codebook(quantizer)
        both = torch.randn(2, 12, 16)
        out = quantizer(both[rank])
        quantizer_eval = MultiCodebookQuantizer(**TINY).eval()
        quantizer_eval.load_state_dict(quantizer.state_dict())
        union = quantizer_eval(both.reshape(24, 16))
        torch.testing.assert_close(out.usage, union.usage)
        torch.testing.assert_close(out.perplexity, union.perplexity)
        expected_probs = torch.stack(
            [torch.bincount(union.codes[:, k], minlength=64).float() / 24 for k in range(4)]
        )
        torch.testing.assert_close(quantizer.ema_usage, expected_probs)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_usage_counts_are_all_reduced_across_gloo_ranks():
    # fork, not spawn: the children reuse the imported torch (spawn re-imports it and takes ~20 s on 2 cores).
    torch.multiprocessing.start_processes(
        _distributed_worker, args=(_free_port(),), nprocs=2, join=True, start_method="fork"
    )


@settings(max_examples=25, deadline=None)
@given(
    num_codebooks=st.integers(1, 4),
    codebook_size=st.integers(1, 300),
    code_dim=st.integers(1, 5),
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property_on_random_shapes(
    num_codebooks, codebook_size, code_dim, leading, residual, seed
):
    cls = ResidualQuantizer if residual else MultiCodebookQuantizer
    quantizer = cls(num_codebooks=num_codebooks, codebook_size=codebook_size, code_dim=code_dim)
    _spread_codebook(quantizer, seed)
    z = torch.randn(*leading, num_codebooks * code_dim, generator=torch.Generator().manual_seed(seed))
    out = quantizer(z)
    assert out.codes.shape == (*leading, num_codebooks)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < codebook_size
    assert torch.equal(quantizer.codes_to_vectors(out.codes), out.quantized)
    assert torch.equal(quantizer.quantize(z), out.codes)
    assert out.usage.shape == out.perplexity.shape == (num_codebooks,)
    assert bool((out.perplexity >= 1 - 1e-5).all()) and bool((out.perplexity <= codebook_size + 1e-3).all())


def test_benchmark_script_runs_on_tiny_shapes(capsys):
    argv = ["--batch", "2", "--positions", "8", "--num-codebooks", "2", "--codebook-size", "256"]
    assert bench_main([*argv, "--code-dim", "4", "--warmup", "1", "--repeats", "2"]) == 0
    table = capsys.readouterr().out
    assert "| train step (fwd+bwd) | batched |" in table and "codes identical: yes" in table
