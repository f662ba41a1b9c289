"""Shared builders for the MLLM tests: a tiny word-level tokenizer, the tiny UniTok and a tiny MLLM."""

from __future__ import annotations

import pytest
import torch

from unitok.mllm import MLLMConfig, UniTokMLLM
from unitok.mllm.text_tokenizer import build_tiny_tokenizer
from unitok.tokenizer import TokenizerConfig, UniTok

CORPUS = [
    "USER: ASSISTANT: a red blue green circle square triangle on the left right top bottom",
    "what colour is the shape ? how many shapes are there ? one two three",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a test module on one torch thread (import it into the module to use it)."""
    # Tiny models are dominated by per-op overhead; extra threads only add contention on shared CPUs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unitok(seed: int = 0) -> UniTok:
    """The random-init ``unitok-tiny`` (64 px -> 4x4 grid, K=8, V=256)."""
    torch.manual_seed(seed)
    return UniTok(TokenizerConfig.preset("unitok-tiny")).eval()


def tiny_mllm(unitok: UniTok, seed: int = 0, **overrides) -> UniTokMLLM:
    """A random-init tiny MLLM (Llama hidden 64, 2 layers) on the tiny word-level tokenizer."""
    torch.manual_seed(seed)
    config = MLLMConfig.preset("tiny", **overrides)
    return UniTokMLLM.from_config(config, unitok=unitok, text_tokenizer=build_tiny_tokenizer(CORPUS))


def random_codes(model: UniTokMLLM, *grid: int, seed: int = 0) -> torch.Tensor:
    """Random codes [*grid, K] valid for ``model``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.codebook_size, (*grid, model.num_codebooks), generator=g)


TINY_LLM = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


def release_tokenizer():
    """The tiny word-level tokenizer with the released model's boi/eoi byte tokens ``<0x00>``/``<0x01>``."""
    tok = build_tiny_tokenizer(CORPUS)
    tok.add_tokens(["<0x00>", "<0x01>"], special_tokens=True)
    return tok


def tiny_release_mllm(unitok: UniTok, seed: int = 0, **overrides) -> UniTokMLLM:
    """A random-init tiny model of the released architecture (causal attention merger, Llama-layer head,
    vicuna_v1 prompts, vocabulary not extended)."""
    torch.manual_seed(seed)
    config = MLLMConfig.preset(
        "unitok-mllm-7b",
        **{
            "llm": dict(TINY_LLM),
            "unitok": None,
            "unitok_preset": "unitok-tiny",
            "text_tokenizer": "builtin:tiny",
            "llm_dtype": "float32",
            "projector_attn_width": 128,
            "projector_attn_heads": 4,
            "depth_layers": 2,
            "max_length": 512,
            **overrides,
        },
    )
    return UniTokMLLM.from_config(config, unitok=unitok, text_tokenizer=release_tokenizer())
