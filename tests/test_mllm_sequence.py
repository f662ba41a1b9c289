"""Sequence building: layouts, labels, visual masks, padding, CFG dropout and bad inputs."""

import pytest
import torch
from mllm_helpers import CORPUS

from unitok.mllm import (
    GenerationSample,
    MLLMCollator,
    MLLMConfig,
    SequenceBuilder,
    TextSample,
    UnderstandingSample,
)
from unitok.mllm.sequence import IGNORE_INDEX, pad_sequences
from unitok.mllm.text_tokenizer import add_image_tokens, build_tiny_tokenizer

K, V = 3, 10


@pytest.fixture(scope="module")
def builder():
    tok = build_tiny_tokenizer(CORPUS)
    cfg = MLLMConfig.preset("tiny", max_length=64)
    ids = add_image_tokens(tok, cfg.boi_token, cfg.eoi_token, cfg.image_token)
    return SequenceBuilder(tok, cfg, ids, num_codebooks=K, codebook_size=V)


def codes(h=2, w=2, seed=0):
    return torch.randint(0, V, (h, w, K), generator=torch.Generator().manual_seed(seed))


def words(builder, seq, where):
    return builder.tokenizer.convert_ids_to_tokens(seq.input_ids[where].tolist())


def test_text_sample_supervises_everything_after_bos(builder):
    seq = builder.text("a red circle")
    assert words(builder, seq, slice(None)) == ["<s>", "a", "red", "circle", "</s>"]
    assert seq.labels.tolist() == [IGNORE_INDEX, *seq.input_ids[1:].tolist()]
    assert not seq.visual_mask.any() and not seq.code_mask.any()


def test_generation_sample_layout(builder):
    grid = codes(2, 3)
    seq = builder.generation("a red circle", grid)
    vis = seq.visual_mask.nonzero()[:, 0]
    assert len(vis) == 6 and seq.code_mask.equal(seq.visual_mask)
    assert words(builder, seq, slice(None, vis[0])) == [
        "<s>",
        "USER",
        ":",
        "a",
        "red",
        "circle",
        "ASSISTANT",
        ":",
        "<boi>",
    ]
    assert words(builder, seq, slice(vis[-1] + 1, None)) == ["<eoi>", "</s>"]
    assert torch.equal(seq.codes[vis], grid.reshape(-1, K))  # raster order
    supervised = (seq.labels != IGNORE_INDEX).nonzero()[:, 0].tolist()
    assert supervised == [len(seq) - 2, len(seq) - 1]  # <eoi> </s>; codes go to the depth head


def test_unconditional_generation_prompt(builder):
    seq = builder.generation("a red circle", codes(), uncond=True)
    assert "red" not in words(builder, seq, slice(None))
    prompt = builder.generation_prompt("", uncond=True)
    assert words(builder, prompt, slice(None)) == ["<s>", "USER", ":", "ASSISTANT", ":", "<boi>"]


def test_understanding_sample_layout_and_labels(builder):
    grids = [codes(1, 2, seed=1), codes(2, 1, seed=2)]
    seq = builder.understanding(
        [("<image> what colour is the shape ?", "red"), ("<image> how many shapes are there ?", "two")], grids
    )
    assert int(seq.visual_mask.sum()) == 4 and not seq.code_mask.any()
    assert torch.equal(seq.codes[seq.visual_mask], torch.cat([g.reshape(-1, K) for g in grids]))
    targets = builder.tokenizer.convert_ids_to_tokens(seq.labels[seq.labels != IGNORE_INDEX].tolist())
    assert targets == ["red", "</s>", "two", "</s>"]
    first = seq.visual_mask.nonzero()[0, 0]
    assert builder.tokenizer.convert_ids_to_tokens([int(seq.input_ids[first - 1])]) == ["<boi>"]


def test_llava_conversation_and_prompt_match_training(builder):
    grid = codes()
    sample = UnderstandingSample.from_llava(
        [{"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}], [grid]
    )
    train = builder.understanding(sample.turns, sample.codes)
    prompt = builder.understanding_prompt("<image>\nwhat colour ?", [grid])
    assert torch.equal(train.input_ids[: len(prompt)], prompt.input_ids)
    with pytest.raises(ValueError, match="alternating"):
        UnderstandingSample.from_llava([{"from": "gpt", "value": "red"}], [])


def test_padding_sides(builder):
    a, b = builder.text("a red circle"), builder.text("red")
    right = pad_sequences([a, b], builder.ids.pad, side="right")
    left = pad_sequences([a, b], builder.ids.pad, side="left")
    assert right.attention_mask.tolist()[1] == [1, 1, 1, 0, 0]
    assert left.attention_mask.tolist()[1] == [0, 0, 1, 1, 1]
    assert torch.equal(left.input_ids[1, 2:], b.input_ids) and (right.labels[1, 3:] == IGNORE_INDEX).all()


def test_collator_mixes_kinds_and_drops_prompts(builder):
    samples = [TextSample("red"), UnderstandingSample([("<image> what ?", "red")], [codes()])]
    samples += [GenerationSample("a red circle", codes())] * 400
    batch = MLLMCollator(builder, cfg_dropout=0.25, generator=torch.Generator().manual_seed(0))(samples)
    assert batch.input_ids.shape[0] == 402 and batch.codes.shape[-1] == K
    red = builder.tokenizer.convert_tokens_to_ids("red")
    dropped = (batch.input_ids[2:] != red).all(dim=1).float().mean().item()
    assert 0.18 < dropped < 0.32
    none = MLLMCollator(builder, cfg_dropout=0.0)(samples[2:10])
    assert (none.input_ids == red).any(dim=1).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.understanding([("<image> <image> what ?", "red")], [codes()]),
        lambda b: b.understanding([("what ?", "red")], [codes()]),
        lambda b: b.understanding_prompt("<image> what ?", []),
        lambda b: b.generation("", codes()),
        lambda b: b.generation("   ", codes()),
        lambda b: b.generation("a <image> circle", codes()),
        lambda b: b.generation("red", torch.zeros(2, 2, K + 1, dtype=torch.long)),
        lambda b: b.generation("red", torch.full((2, 2, K), V)),
        lambda b: b.generation("red", torch.full((2, 2, K), -1)),
        lambda b: b.generation("red", torch.zeros(2, 2, K)),
        lambda b: b.generation("red", torch.zeros(4, K, dtype=torch.long)),
        lambda b: b.generation("red", codes(8, 8)),  # 64 positions > max_length
        lambda b: b.text(""),
        lambda b: b.text("red <image>"),
        lambda b: b.understanding([("<image> what ?", "<image>")], [codes()]),
    ],
)
def test_bad_inputs_raise_value_error(builder, make):
    with pytest.raises(ValueError):
        make(builder)


def test_text_samples_are_truncated(builder):
    seq = builder.text(" ".join(["red"] * 100))
    assert len(seq) == builder.config.max_length
