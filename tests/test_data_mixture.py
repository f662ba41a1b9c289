"""Mixture data: exact lengths, over-long and malformed samples counted, deterministic sampler, length grouping."""

import json

import numpy as np
import pytest
import torch

from unitok.data.codes import (
    SHARD_FOLDER,
    STORE_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    encode_codes,
    shard_name,
    write_shard,
)
from unitok.data.mllm_data import MixtureDataset, MixtureSampler, collate, padding_fraction
from unitok.mllm import MLLMConfig, SequenceBuilder
from unitok.mllm.text_tokenizer import add_image_tokens, build_tiny_tokenizer

K, V = 8, 256
WORDS = "USER: ASSISTANT: what colour is it ? and then the a red blue green square circle many words here"


def conversation(*turns):
    out = []
    for i, (q, a) in enumerate(turns):
        out += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return out


def write_store(path, rows):
    """A code store written directly from (caption, conversations, h, w) rows."""
    (path / SHARD_FOLDER).mkdir(parents=True)
    rng = np.random.default_rng(0)
    table = []
    for i, (caption, conv, h, w) in enumerate(rows):
        table.append(
            {
                "id": str(i),
                "codes": encode_codes(rng.integers(0, V, size=(h, w, K)), V),
                "h": h,
                "w": w,
                "caption": caption,
                "conversations": None if conv is None else json.dumps(conv),
            }
        )
    write_shard(path / SHARD_FOLDER / shard_name(0), table, {})
    info = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "num_codebooks": K,
        "codebook_size": V,
        "num_shards": 1,
    }
    (path / STORE_FILE).write_text(json.dumps(info))
    return path


def builder(max_length=64, **overrides):
    tokenizer = build_tiny_tokenizer([WORDS])
    config = MLLMConfig.preset("tiny", max_length=max_length, **overrides)
    ids = add_image_tokens(tokenizer, config.boi_token, config.eoi_token, config.image_token)
    return SequenceBuilder(tokenizer, config, ids, K, V)


@pytest.fixture
def store(tmp_path):
    long_caption = " ".join(["many words here"] * 20)
    rows = [
        ("a red square", conversation(("what colour is it ?", "red")), 4, 4),
        (
            "a blue circle",
            conversation(("what colour is it ?", "blue"), *[("and then ?", "many words here")] * 6),
            4,
            4,
        ),
        (long_caption, None, 4, 4),
        (None, [{"from": "human", "value": "<image>\nwhat colour is it ?"}], 4, 4),
        (None, conversation(("what colour is it ?", "green")), 2, 2),
    ]
    return write_store(tmp_path / "store", rows)


def test_scan_lengths_are_exact_and_problems_are_counted(store, tmp_path):
    texts = tmp_path / "text.jsonl"
    texts.write_text(
        '{"text": "a red square"}\n{broken\n{"text": "' + "many words here " * 30 + '"}\n{"other": 1}\n'
    )
    data = MixtureDataset(builder(max_length=64), [store], [texts])
    summary = {kind: s.to_dict() for kind, s in data.summary.items()}
    assert summary["generation"] == {"candidates": 3, "kept": 2, "truncated": 0, "skipped": {"too_long": 1}}
    assert summary["understanding"] == {
        "candidates": 4,
        "kept": 3,
        "truncated": 1,
        "skipped": {"bad_conversation": 1},
    }
    assert summary["text"] == {
        "candidates": 4,
        "kept": 2,
        "truncated": 1,
        "skipped": {"bad_json": 1, "bad_row": 1},
    }
    for key in range(len(data)):
        item = data[key]
        assert len(item["input_ids"]) == data.length(key) <= 64
    # The long conversation keeps its image turn and the answers that fit.
    kind, index = data.kind_of(data.offsets["understanding"] + 1)
    assert kind == "understanding" and 1 <= data.entries[kind][index].turns < 7
    batch = collate([data[k] for k in range(3)], pad_id=0)
    assert batch["input_ids"].shape == (3, max(data.length(k) for k in range(3)))
    assert batch["codes"].shape[-1] == K and batch["attention_mask"].sum() == sum(
        data.length(k) for k in range(3)
    )


def test_cfg_drop_is_per_sample_deterministic_and_changes_with_the_epoch(store):
    data = MixtureDataset(builder(), [store], cfg_dropout=0.5)
    keys = [data.offsets["generation"] + i for i in range(data.sizes["generation"])]
    draws = [[data._uncond(k + epoch * data.total) for k in keys] for epoch in range(40)]
    flat = np.asarray(draws, dtype=float)
    assert 0.3 < flat.mean() < 0.7
    again = MixtureDataset(builder(), [store], cfg_dropout=0.5)
    assert [again._uncond(k) for k in keys] == draws[0]
    uncond = data.builder.generation_prompt("", uncond=True).input_ids
    key = next(k + e * data.total for e in range(40) for k in keys if data._uncond(k + e * data.total))
    assert torch.equal(data[key]["input_ids"][: len(uncond)], uncond)


def test_sampler_is_deterministic_mixes_by_ratio_and_walks_permutations(store):
    data = MixtureDataset(builder(), [store])
    sampler = MixtureSampler(
        data, {"understanding": 3, "generation": 1}, num_samples=403, seed=1, batch_size=4
    )
    assert len(sampler) == 400
    first = list(sampler)
    assert first == list(
        MixtureSampler(data, {"understanding": 3, "generation": 1}, num_samples=403, seed=1, batch_size=4)
    )
    kinds = [data.kind_of(k)[0] for k in first]
    assert 0.68 < kinds.count("understanding") / len(kinds) < 0.82 and "text" not in kinds
    # Each kind is walked through permutations: the first draws of a kind hold every sample once.
    gen = [k % data.total for k in first if data.kind_of(k)[0] == "generation"]
    assert sorted(gen[: data.sizes["generation"]]) == list(range(data.offsets["generation"], data.total))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and all(k >= data.total for k in second)
    with pytest.raises(ValueError, match="no usable sample"):
        MixtureSampler(data, {"text": 1.0})


def test_length_grouping_keeps_the_samples_and_cuts_padding(store):
    data = MixtureDataset(builder(), [store])
    kwargs = dict(num_samples=512, seed=0, batch_size=4, world_size=2)
    plain = MixtureSampler(data, {"understanding": 1, "generation": 1}, **kwargs)
    grouped = MixtureSampler(data, {"understanding": 1, "generation": 1}, group_by_length=True, **kwargs)
    a, b = np.asarray(list(plain)), np.asarray(list(grouped))
    assert sorted(a) == sorted(b)
    lengths = data.lengths()
    before, after = padding_fraction(lengths[a % data.total], 4), padding_fraction(lengths[b % data.total], 4)
    assert after < 0.5 * before
    assert padding_fraction(np.asarray([3, 3, 5, 1]), 2) == pytest.approx(1 - 12 / 16)
