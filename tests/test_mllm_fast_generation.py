"""The static-cache image loop (``fast=True``) and its compiled position step, against the eager reference loop."""

import copy

import pytest
import torch
from mllm_helpers import one_thread, tiny_mllm, tiny_release_mllm, tiny_unitok  # noqa: F401

from unitok.mllm.generation import _LOOPS, generate_image_codes
from unitok.mllm.projector import CausalAttnMerger, MergerCache, StaticMergerCache

PROMPTS = ["a red circle on the left", "two blue squares"]  # different lengths: left padding


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_static_loop_equals_the_eager_loop_and_is_reused(unitok, cfg_scale):
    model = tiny_mllm(unitok).eval()
    kwargs = dict(grid=(2, 3), cfg_scale=cfg_scale, temperature=0.0)
    eager = generate_image_codes(model, PROMPTS, **kwargs)
    done = []
    fast = generate_image_codes(
        model, PROMPTS, fast=True, progress=lambda i, n: done.append((i, n)), **kwargs
    )
    assert torch.equal(fast, eager)
    assert done == [(i, 6) for i in range(1, 7)]
    (loop,) = _LOOPS[model].values()
    assert loop.cache.layers[0].keys.shape[2] == loop.prompt_len + 6  # sized to prompt + positions
    # A second run of the same shape reuses the loop (its caches reset); a depth-head recompute gives the same.
    assert torch.equal(generate_image_codes(model, PROMPTS, fast=True, **kwargs), eager)
    assert list(_LOOPS[model].values()) == [loop]
    assert torch.equal(generate_image_codes(model, PROMPTS, fast=True, depth_cache=False, **kwargs), eager)


@pytest.mark.parametrize("reference_merger_cache", [False, True])
def test_static_loop_with_the_causal_merger_equals_the_eager_loop(unitok, reference_merger_cache):
    model = tiny_release_mllm(unitok).eval()
    kwargs = dict(grid=(2, 2), cfg_scale=2.0, temperature=0.0, reference_merger_cache=reference_merger_cache)
    eager = generate_image_codes(model, PROMPTS, **kwargs)
    assert torch.equal(generate_image_codes(model, PROMPTS, fast=True, **kwargs), eager)
    (loop,) = _LOOPS[model].values()
    assert (loop.merger_cache is None) == reference_merger_cache


def test_depth_head_and_projector_run_in_the_llm_dtype(unitok):
    model = tiny_mllm(unitok, llm_dtype="bfloat16").eval()
    assert model.depth_head.in_proj.weight.dtype == torch.float32
    reference = copy.deepcopy(model)
    reference.depth_head.to(torch.bfloat16)  # cast by hand
    reference.projector.to(torch.bfloat16)
    kwargs = dict(grid=(2, 2), cfg_scale=2.0, temperature=0.0)
    fast = generate_image_codes(model, PROMPTS, fast=True, **kwargs)
    # At bf16 the eager loop's growing cache rounds otherwise than the static one: fast against fast here.
    assert torch.equal(fast, generate_image_codes(reference, PROMPTS, fast=True, **kwargs))
    (loop,) = _LOOPS[model].values()
    assert loop.depth_head.in_proj.weight.dtype == torch.bfloat16
    assert loop.projector.fc1.weight.dtype == torch.bfloat16
    assert model.depth_head.in_proj.weight.dtype == torch.float32  # the model itself is left as it was
    # The copies follow the model's weights (e.g. between evaluations during training).
    with torch.no_grad():
        model.depth_head.classifiers[0].bias.add_(
            5.0 * torch.randn_like(model.depth_head.classifiers[0].bias)
        )
        reference.depth_head.classifiers[0].bias.copy_(model.depth_head.classifiers[0].bias)
    assert torch.equal(
        generate_image_codes(model, PROMPTS, fast=True, **kwargs),
        generate_image_codes(reference, PROMPTS, fast=True, **kwargs),
    )


def test_static_merger_cache_equals_the_growing_one():
    torch.manual_seed(0)
    merger = CausalAttnMerger(8, 16, 8, 32, attn_width=64, attn_heads=4).eval()
    codes = torch.randint(0, 16, (3, 5, 8))
    growing, static = MergerCache(), StaticMergerCache(3, 4, 5, 16, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        whole = merger(codes)
        for i in range(5):
            a = merger.step(codes[:, i : i + 1], growing)
            b = merger.step(codes[:, i : i + 1], static)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b[:, 0], whole[:, i], rtol=1e-4, atol=1e-5)
        assert int(static.filled) == 5
        static.reset()
        assert int(static.filled) == 0
        with pytest.raises(ValueError, match="one position"):
            merger.step(codes[:, :2], static)


def test_compile_options_are_checked(unitok):
    model = tiny_mllm(unitok).eval()
    with pytest.raises(ValueError, match="backend"):
        generate_image_codes(model, PROMPTS, grid=(1, 1), compile="no-such-backend")
    with pytest.raises(ValueError, match="use_cache"):
        generate_image_codes(model, PROMPTS, grid=(1, 1), compile=True, use_cache=False)
    with pytest.raises(ValueError, match="backend"):
        model.generate_images(PROMPTS, compile=1, decode=False)


@pytest.mark.slow
@pytest.mark.parametrize("build", [tiny_mllm, tiny_release_mllm])
def test_compiled_position_step_has_no_graph_breaks_and_gives_the_eager_codes(unitok, build):
    from torch._dynamo.utils import counters

    model = build(unitok).eval()
    greedy = dict(grid=(2, 2), cfg_scale=3.0, temperature=0.0)
    eager = generate_image_codes(model, PROMPTS, **greedy)
    counters.clear()
    # "aot_eager" traces and functionalises the step as inductor does, without generating kernels (quick on CPU).
    assert torch.equal(generate_image_codes(model, PROMPTS, compile="aot_eager", **greedy), eager)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # the whole position step is one graph
    assert torch.equal(generate_image_codes(model, PROMPTS, compile="aot_eager", **greedy), eager)
    assert counters["stats"]["unique_graphs"] == 1  # the second run reuses it


@pytest.mark.slow
def test_compiled_sampling_draws_what_the_fast_loop_draws(unitok):
    model = tiny_mllm(unitok).eval()
    sampled = dict(grid=(2, 2), cfg_scale=2.0, top_k=20, top_p=0.9)
    fast = generate_image_codes(
        model, PROMPTS, fast=True, generator=torch.Generator().manual_seed(1), **sampled
    )
    compiled = generate_image_codes(
        model, PROMPTS, compile="aot_eager", generator=torch.Generator().manual_seed(1), **sampled
    )
    assert torch.equal(compiled, fast)  # the noise of each position is drawn outside the step: the same draws


def test_generation_benchmark_counts_no_host_reads_in_the_fast_loop(capsys):
    from unitok.scripts import bench_mllm_generation

    assert bench_mllm_generation.main(["--batch", "1", "--image-size", "32", "--skip-uncached"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if "ATen" not in line}
    fast = rows["sync-free loop, static KV cache (`fast=True`)"].rstrip(" |").split(" | ")
    eager = rows["eager: LLM DynamicCache + depth-head KV cache (default)"].rstrip(" |").split(" | ")
    assert float(fast[-1]) == 0.0 and float(eager[-1]) > 0  # host reads per position
    with pytest.raises(SystemExit):
        bench_mllm_generation.main(["--compile", "no-such-backend"])


@pytest.mark.slow
def test_the_gpu_checks_generation_benchmark_runs_on_a_tiny_model(unitok):
    from unitok.scripts.gpu_check_mllm import bench_generation

    model = tiny_release_mllm(unitok).eval()
    sampling = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 20, "top_p": 0.9}
    report = bench_generation(model, "a red circle", [2], sampling, backend="eager")
    assert report["positions"] == 16
    assert report["b2_compiled_codes_equal_fast"] == 1.0  # the same noise through the same kernels
    assert report["b2_eager_syncs_per_position"] is None  # counted on CUDA only
    assert all(report[f"b2_{mode}_s_per_image"] > 0 for mode in ("eager", "fast", "compiled"))
