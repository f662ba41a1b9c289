"""UniTokMLLM: losses, cached vs uncached generation, guidance, seeds, checkpoints and bad inputs."""

import json

import pytest
import torch
from mllm_helpers import one_thread, random_codes, tiny_mllm, tiny_unitok  # noqa: F401 (autouse fixture)

from unitok.mllm import GenerationSample, MLLMCollator, TextSample, UnderstandingSample, UniTokMLLM
from unitok.mllm.generation import generate_image_codes
from unitok.mllm.sequence import pad_sequences
from unitok.tokenizer import TokenizerConfig, UniTok

PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


@pytest.fixture(scope="module")
def model(unitok):
    return tiny_mllm(unitok).eval()


def mixed_batch(model, seed=0):
    grid = random_codes(model, 4, 4, seed=seed)
    samples = [
        TextSample("a red circle on the left"),
        UnderstandingSample([("<image> what colour is the shape ?", "red")], [grid]),
        GenerationSample("a blue square", grid),
    ]
    return MLLMCollator(model.builder, cfg_dropout=0.0)(samples)


def test_forward_reports_both_losses_and_reaches_every_part(unitok):
    model = tiny_mllm(unitok).train()
    out = model(mixed_batch(model))
    # Text targets: 6 words + </s>; "red" </s>; <eoi> </s>.
    assert out.num_code_targets == 16 and out.num_text_targets == 7 + 2 + 2
    torch.testing.assert_close(
        out.loss.detach(), out.text_loss + model.config.code_loss_weight * out.code_loss
    )
    out.loss.backward()
    for module in (model.projector, model.depth_head, model.llm):
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.unitok.parameters())
    assert (
        model.projector.fc1.weight.grad.abs().sum() > 0
        and model.depth_head.in_proj.weight.grad.abs().sum() > 0
    )


def test_text_only_batch_has_zero_code_loss(model):
    batch = MLLMCollator(model.builder)([TextSample("a red circle"), TextSample("blue")])
    out = model(batch)
    assert out.num_code_targets == 0 and out.code_loss.item() == 0.0 and out.text_loss.item() > 0


def test_cached_llm_steps_equal_full_recompute(model):
    seqs = [model.builder.generation_prompt(p) for p in PROMPTS]
    batch = pad_sequences(seqs, model.builder.ids.pad, side="left")
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
        step = model.embed_codes(random_codes(model, 2))[:, None]
        mask = torch.cat([batch.attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = model.new_cache()
        model.decode_hidden(embeds, batch.attention_mask, positions[:, :-1], cache)
        cached = model.decode_hidden(step, mask, positions[:, -1:], cache)[:, -1]
        full = model.decode_hidden(torch.cat([embeds, step], dim=1), mask, positions)[:, -1]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def traced_generation(model, **kwargs):
    """Codes and the LLM hidden states the depth head was conditioned on at every position."""
    states = []
    hook = model.depth_head.in_proj.register_forward_hook(lambda _m, args, _out: states.append(args[0]))
    try:
        codes = generate_image_codes(model, PROMPTS, **kwargs)
    finally:
        hook.remove()
    return codes, torch.stack(states)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_image_generation_equals_uncached_greedy(model, cfg_scale):
    kwargs = dict(grid=(3, 3), cfg_scale=cfg_scale, temperature=0.0)
    cached, cached_states = traced_generation(model, **kwargs)
    uncached, uncached_states = traced_generation(model, use_cache=False, depth_cache=False, **kwargs)
    assert cached.shape == (2, 3, 3, model.num_codebooks)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_states, uncached_states, rtol=1e-4, atol=1e-5)


def test_cached_text_generation_equals_uncached_and_batching(model):
    grids = [random_codes(model, 4, 4, seed=s) for s in (1, 2)]
    questions = ["what colour is the shape ?", "<image> how many shapes are there on the left ?"]
    cached = model.answer(grids, questions, max_new_tokens=6)
    uncached = model.answer(grids, questions, max_new_tokens=6, use_cache=False)
    one_by_one = [model.answer([g], q, max_new_tokens=6)[0] for g, q in zip(grids, questions)]
    assert cached == uncached == one_by_one
    assert all(isinstance(a, str) for a in cached)
    streamed = "".join(model.answer(grids[0], questions[0], max_new_tokens=6, stream=True))
    assert streamed.strip() == cached[0]


def test_cfg_scale_one_equals_plain_conditional_sampling(model):
    kwargs = dict(grid=(2, 2), cfg_scale=1.0, temperature=1.0, top_k=50)
    plain = generate_image_codes(model, PROMPTS, generator=torch.Generator().manual_seed(5), **kwargs)
    guided = generate_image_codes(
        model, PROMPTS, generator=torch.Generator().manual_seed(5), guide_always=True, **kwargs
    )
    assert torch.equal(plain, guided)


def test_fixed_seed_gives_same_images(model):
    a = model.generate_images(PROMPTS, cfg_scale=2.0, top_p=0.9, seed=3)
    b = model.generate_images(PROMPTS, cfg_scale=2.0, top_p=0.9, seed=3)
    c = model.generate_images(PROMPTS, cfg_scale=2.0, top_p=0.9, seed=4)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert a.codes.shape == (2, 4, 4, model.num_codebooks)
    assert [im.size for im in a.images] == [(64, 64)] * 2
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    small = model.generate_images("a red circle", seed=0, image_size=32, decode=False)
    assert small.codes.shape == (1, 2, 2, model.num_codebooks) and small.images is None


def test_answer_accepts_images(model):
    img = torch.rand(3, 64, 64) * 2 - 1
    from_tensor = model.answer(img, "what colour ?", max_new_tokens=3)
    from_codes = model.answer(model.unitok.encode(img[None])[0], "what colour ?", max_new_tokens=3)
    assert from_tensor == from_codes
    assert len(model.answer(None, ["what colour ?"], max_new_tokens=3)) == 1


def test_grid_follows_the_unitok_patch_size():
    torch.manual_seed(0)
    fine = tiny_mllm(UniTok(TokenizerConfig.preset("unitok-tiny", patch_size=8)).eval()).eval()
    assert fine.grid() == (8, 8) and fine.grid(32) == (4, 4)
    generated = fine.generate_images("a red circle", seed=0, image_size=32)
    assert generated.codes.shape == (1, 4, 4, fine.num_codebooks) and generated.images[0].size == (32, 32)
    with pytest.raises(ValueError, match="multiple of the UniTok's patch size 8, got 36"):
        fine.grid(36)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_load_round_trip_full_weights(unitok, tmp_path):
    model = tiny_mllm(unitok).eval()
    batch = mixed_batch(model)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.txt").write_text("replaced atomically")
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "llm",
        "model.safetensors",
        "text_tokenizer",
        "unitok",
    ]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["llm"] == "llm" and config["unitok"] == "unitok" and config["unitok_preset"] is None
    loaded = UniTokMLLM.from_pretrained(tmp_path / "ckpt").eval()
    before, after = _state(model), _state(loaded)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert model(batch).loss.item() == loaded(batch).loss.item()
    kwargs = dict(grid=(2, 2), cfg_scale=2.0, temperature=0.0)
    assert torch.equal(
        generate_image_codes(model, PROMPTS, **kwargs), generate_image_codes(loaded, PROMPTS, **kwargs)
    )
    assert loaded.text_tokenizer.convert_tokens_to_ids("<boi>") == model.builder.ids.boi


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.generate_images([""]),
        lambda m: m.generate_images([]),
        lambda m: m.generate_images(["red"], image_size=30),
        lambda m: m.generate_images(["red"], temperature=-1.0),
        lambda m: m.generate_images(["red"], top_p=0.0),
        lambda m: m.answer(random_codes(m, 4, 4), "<image> <image> what colour ?"),
        lambda m: m.answer(random_codes(m, 4, 4)[..., :3], "what colour ?"),
        lambda m: m.answer(random_codes(m, 4, 4) + m.codebook_size, "what colour ?"),
        lambda m: m.answer(random_codes(m, 4, 4), ""),
        lambda m: m.answer(None, "   "),
        lambda m: m.answer([random_codes(m, 4, 4)] * 2, ["what colour ?"]),
        lambda m: m.answer(torch.rand(3, 60, 60), "what colour ?"),
        lambda m: list(m.answer([random_codes(m, 4, 4)] * 2, ["what ?", "what ?"], stream=True)),
    ],
)
def test_bad_inputs_raise_value_error(model, call):
    with pytest.raises(ValueError):
        call(model)


def test_from_pretrained_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        UniTokMLLM.from_pretrained(tmp_path)
