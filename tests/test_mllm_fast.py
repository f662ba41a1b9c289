"""The sync-free generation loop (``fast=True``) against the eager reference loop."""

import pytest
import torch
from mllm_helpers import one_thread, random_codes, tiny_mllm, tiny_release_mllm, tiny_unitok  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from unitok.mllm.generation import generate_image_codes, sample_logits
from unitok.tokenizer.quantizer import unchecked_code_vectors

PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


@pytest.mark.parametrize("build", [tiny_mllm, tiny_release_mllm])
def test_fast_greedy_loop_equals_the_eager_one(unitok, build):
    model = build(unitok).eval()
    kwargs = dict(grid=(3, 3), cfg_scale=3.0, temperature=0.0)
    eager = generate_image_codes(model, PROMPTS, **kwargs)
    assert torch.equal(generate_image_codes(model, PROMPTS, fast=True, **kwargs), eager)
    uncached = generate_image_codes(model, PROMPTS, fast=True, use_cache=False, depth_cache=False, **kwargs)
    assert torch.equal(uncached, eager)
    codes = random_codes(model, 5, 7)
    quantizer = (
        model.projector.quantizer if model.config.projector == "causal_attn" else model.unitok.quantizer
    )
    assert torch.equal(unchecked_code_vectors(quantizer, codes), quantizer.codes_to_vectors(codes))


class CountSyncs(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (what ``.item()`` / ``int(tensor)`` run: a host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_fast_loop_reads_no_values_back_per_position(unitok):
    model = tiny_release_mllm(unitok).eval()
    counts = {}
    for grid in ((1, 2), (2, 2)):
        with CountSyncs() as counter:
            generate_image_codes(
                model,
                PROMPTS,
                grid=grid,
                cfg_scale=2.0,
                top_k=20,
                top_p=0.9,
                fast=True,
                generator=torch.Generator(),
            )
        counts[grid] = counter.syncs
    assert counts[(2, 2)] == counts[(1, 2)]  # two more positions, no more syncs (the prompt's are fixed)


def test_exponential_race_draws_from_the_same_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, -1)
    generator = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, temperature=0.8, top_k=4, generator=generator, method="race")
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    kept = torch.tensor([2.0, 1.0, 0.0, float("-inf"), 0.5]) / 0.8
    torch.testing.assert_close(freq, kept.softmax(-1), atol=0.01, rtol=0)
    greedy = sample_logits(logits[:3], temperature=0.0, method="race")
    assert greedy.tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        sample_logits(logits, method="gumbel")


def test_fast_sampling_is_seeded(unitok):
    model = tiny_mllm(unitok).eval()
    kwargs = dict(cfg_scale=2.0, top_p=0.9, image_size=32, decode=False, fast=True)
    a, b = model.generate_images(PROMPTS, seed=3, **kwargs), model.generate_images(PROMPTS, seed=3, **kwargs)
    c = model.generate_images(PROMPTS, seed=4, **kwargs)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
