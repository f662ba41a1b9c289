"""The window projector: each visual token from the code vectors of a causal window of the code grid."""

import pytest
import torch
from mllm_helpers import one_thread, random_codes, tiny_mllm, tiny_unitok  # noqa: F401

from unitok.mllm import (
    GenerationSample,
    MLLMCollator,
    MLLMConfig,
    TextSample,
    UnderstandingSample,
    UniTokMLLM,
)
from unitok.mllm.generation import _LOOPS, generate_image_codes
from unitok.mllm.projector import StaticWindowCache, WindowCache, WindowProjector

PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


def by_hand(
    proj: WindowProjector, vecs_BLD: torch.Tensor, height: int, width: int, reach: int
) -> torch.Tensor:
    """The window embedding written out position by position: for (r, c), the rows above in reach (columns
    c-reach..c+reach), then row r up to c, zero vectors outside the grid, concatenated in that order."""
    b, _, d = vecs_BLD.shape
    out = []
    for r in range(height):
        for c in range(width):
            parts = []
            for dr in range(-reach, 1):
                for dc in range(-reach, reach + 1):
                    if dr == 0 and dc > 0:
                        continue
                    rr, cc = r + dr, c + dc
                    inside = rr >= 0 and 0 <= cc < width
                    parts.append(vecs_BLD[:, rr * width + cc] if inside else torch.zeros(b, d))
            out.append(proj.mlp(torch.cat(parts, dim=-1)))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("reach, size", [(1, 5), (2, 13)])
def test_window_matches_the_hand_written_neighbourhood(reach, size):
    torch.manual_seed(0)
    proj = WindowProjector(code_width=6, llm_hidden=16, grid_width=4, window=reach).eval()
    assert proj.window_size == size
    vecs = torch.randn(2, 12, 6)  # a 3x4 grid
    with torch.no_grad():
        torch.testing.assert_close(proj(vecs), by_hand(proj, vecs, 3, 4, reach))


def test_window_is_causal_and_local():
    torch.manual_seed(0)
    proj = WindowProjector(code_width=4, llm_hidden=8, grid_width=5, window=1).eval()
    vecs = torch.randn(1, 20, 4)  # a 4x5 grid
    with torch.no_grad():
        base = proj(vecs)
        changed = vecs.clone()
        changed[:, 7] += 1.0  # position (1, 2)
        diff = (proj(changed) - base).abs().amax(dim=-1)[0]
    # Read by (1, 2) itself, by (1, 3) on its row (one column of reach to the left), and from above by the row
    # below at columns 1..3 (positions 11, 12, 13); nothing before it and nothing further away.
    assert diff.nonzero().flatten().tolist() == [7, 8, 11, 12, 13]


def test_growing_and_static_caches_equal_the_whole_image():
    torch.manual_seed(0)
    proj = WindowProjector(code_width=8, llm_hidden=16, grid_width=3, window=2).eval()
    vecs = torch.randn(2, 9, 8)
    growing, static = WindowCache(), StaticWindowCache(2, 9, 8, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        whole = proj(vecs)
        first = proj.project_step(vecs[:, :2], growing)  # two positions at once
        torch.testing.assert_close(first, whole[:, :2])
        static_rows = [proj.project_step(vecs[:, i : i + 1], static) for i in range(9)]
        for i in range(2, 9):
            torch.testing.assert_close(proj.project_step(vecs[:, i : i + 1], growing)[:, 0], whole[:, i])
        torch.testing.assert_close(torch.cat(static_rows, dim=1), whole)
        assert growing.length == 9 and int(static.filled) == 9
        static.reset()
        assert int(static.filled) == 0
        with pytest.raises(ValueError, match="one position"):
            proj.project_step(vecs[:, :2], static)


def test_config_checks_the_window():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="projector_window"):
            MLLMConfig.preset("tiny", projector="window", projector_window=bad)
    with pytest.raises(ValueError, match="projector must be one of"):
        MLLMConfig.preset("tiny", projector="windows")
    with pytest.raises(ValueError, match="grid_width and window"):
        WindowProjector(4, 8, grid_width=3, window=0)


def test_mllm_trains_and_reloads_with_the_window_projector(unitok, tmp_path):
    model = tiny_mllm(unitok, projector="window", projector_window=2).train()
    h, w = model.grid()
    assert isinstance(model.projector, WindowProjector) and model.projector.grid_width == w
    grid = random_codes(model, h, w)
    batch = MLLMCollator(model.builder, cfg_dropout=0.0)(
        [
            TextSample("a red circle on the left"),
            UnderstandingSample([("<image> what colour is the shape ?", "red")], [grid]),
            GenerationSample("a blue square", grid),
        ]
    )
    out = model(batch)
    out.loss.backward()
    assert model.projector.mlp.fc1.weight.grad.abs().sum() > 0
    # Text-only batches keep the projector in the graph (a zero gradient, as distributed training needs).
    model.zero_grad()
    model(MLLMCollator(model.builder)([TextSample("a red circle")])).loss.backward()
    assert model.projector.mlp.fc1.weight.grad is not None
    # The image inside a training sequence is embedded as a whole image.
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
        row = 1
        torch.testing.assert_close(
            embeds[row][batch.visual_mask[row]], model.embed_image(grid.flatten(0, 1)[None])[0]
        )
    model.eval().save_pretrained(tmp_path / "m")
    loaded = UniTokMLLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.projector == "window" and loaded.config.projector_window == 2
    codes = grid.flatten(0, 1)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_image(codes), model.embed_image(codes))


def test_generation_loops_agree_with_the_window_projector(unitok):
    model = tiny_mllm(unitok, projector="window", projector_window=1).eval()
    h, w = model.grid()
    kwargs = dict(grid=(h, w), cfg_scale=2.0, temperature=0.0)
    eager = generate_image_codes(model, PROMPTS, **kwargs)
    assert torch.equal(generate_image_codes(model, PROMPTS, use_cache=False, **kwargs), eager)
    assert torch.equal(generate_image_codes(model, PROMPTS, fast=True, **kwargs), eager)
    (loop,) = _LOOPS[model].values()
    assert isinstance(loop.merger_cache, StaticWindowCache)
    # A reused loop starts from an empty window cache: the same seed gives the same sampled codes again.
    sampled = dict(grid=(h, w), cfg_scale=2.0, temperature=1.0, top_k=5)
    a = generate_image_codes(model, PROMPTS, fast=True, generator=torch.Generator().manual_seed(1), **sampled)
    b = generate_image_codes(model, PROMPTS, fast=True, generator=torch.Generator().manual_seed(1), **sampled)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=f"{w} positions wide"):
        generate_image_codes(model, PROMPTS, grid=(h, w + 1))
    # Understanding inputs of another grid width are refused too: a code grid, or an image of another size.
    with pytest.raises(ValueError, match=f"{w} positions wide"):
        model.answer(random_codes(model, h, w + 1), "what colour is the shape ?")
    size = unitok.config.image_size + unitok.config.patch_size
    with pytest.raises(ValueError, match=f"got a {h + 1}x{w + 1} grid"):
        model.answer(torch.zeros(3, size, size), "what colour is the shape ?")
    assert model.answer(random_codes(model, h, w), "what colour is the shape ?", max_new_tokens=2)


def test_train_mllm_command_trains_the_window_projector(tmp_path):
    from test_mllm_train_helpers import make_folder, save_tiny_unitok

    from unitok.data.extract import extract_codes
    from unitok.mllm.train import main as train_main

    tokenizer = save_tiny_unitok(tmp_path / "unitok")
    extract_codes(
        tokenizer, str(make_folder(tmp_path / "data", 4)), tmp_path / "codes", num_workers=0, progress=False
    )
    sets = {
        "data.stores": f"[{tmp_path / 'codes'}]",
        "output_dir": str(tmp_path / "run"),
        "data.group_batches": 1,
        "model.config.projector": "window",
        "model.config.projector_window": 2,
        "training.max_steps": 2,
        "training.save_steps": 2,
        "training.per_device_train_batch_size": 4,
        "training.report_to": "[]",
    }
    argv = ["--config", "mllm-tiny-synth"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert train_main(argv) == 0
    model = UniTokMLLM.from_pretrained(tmp_path / "run" / "final").eval()
    assert isinstance(model.projector, WindowProjector) and model.projector.window == 2
    assert model.config.projector == "window"


@pytest.mark.slow
def test_compiled_position_step_with_the_window_has_no_graph_breaks(unitok):
    from torch._dynamo.utils import counters

    model = tiny_mllm(unitok, projector="window").eval()
    greedy = dict(grid=model.grid(), cfg_scale=3.0, temperature=0.0)
    eager = generate_image_codes(model, PROMPTS, **greedy)
    counters.clear()
    # "aot_eager" traces the step as inductor does, without generating kernels (quick on CPU).
    assert torch.equal(generate_image_codes(model, PROMPTS, compile="aot_eager", **greedy), eager)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
