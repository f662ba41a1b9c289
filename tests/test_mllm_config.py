"""MLLMConfig validation, presets and the tiny text tokenizer."""

import json

import pytest

from unitok.mllm import MLLM_PRESETS, MLLMConfig, build_tiny_tokenizer
from unitok.mllm.text_tokenizer import add_image_tokens, load_text_tokenizer


def test_presets_round_trip_through_json():
    for name in MLLM_PRESETS:
        cfg = MLLMConfig.preset(name)
        again = MLLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg


def test_preset_overrides_and_replace():
    cfg = MLLMConfig.preset("tiny", lora_r=8, cfg_dropout=0.2)
    assert cfg.use_lora and cfg.cfg_dropout == 0.2
    assert cfg.replace(lora_r=0).use_lora is False
    assert MLLMConfig.preset("llama2-7b").llm == "meta-llama/Llama-2-7b-hf"
    release = MLLMConfig.preset("unitok-mllm-7b")
    assert (release.projector, release.depth_head, release.extend_vocab) == ("causal_attn", "llama", False)
    assert (
        release.llm["hidden_size"] == 4096 and release.boi_token == "<0x00>" and release.z_loss_weight == 5e-5
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"depth_width": 100, "depth_heads": 16},
        {"cfg_dropout": 1.0},
        {"cfg_dropout": -0.1},
        {"boi_token": "<eoi>"},
        {"image_token": ""},
        {"prompt_template": "no placeholder"},
        {"unitok": "some/dir"},  # the tiny preset already names unitok_preset
        {"unitok_preset": None},
        {"llm_dtype": "int8"},
        {"llm": {"num_hidden_layers": 2}},
        {"llm": ""},
        {"depth_layers": 0},
        {"code_loss_weight": -1.0},
        {"lora_r": -1},
        {"extend_vocab": False},  # no <image> token needs the placeholder-text (vicuna_v1) prompts
        {"projector": "qformer"},
        {"depth_head": "rnn"},
        {"conversation": "chatml"},
        {"image_resize": "stretch"},
        {"projector": "causal_attn", "projector_attn_width": 100, "projector_attn_heads": 16},
    ],
)
def test_invalid_configs_raise(changes):
    with pytest.raises(ValueError):
        MLLMConfig.preset("tiny").replace(**changes)


def test_unknown_fields_and_presets_raise():
    with pytest.raises(ValueError, match="unknown MLLMConfig fields"):
        MLLMConfig.from_dict({**MLLMConfig.preset("tiny").to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown MLLM preset"):
        MLLMConfig.preset("llama3-405b")
    with pytest.raises(ValueError, match="text_tokenizer"):
        MLLMConfig.preset("tiny", text_tokenizer=None)


def test_tiny_tokenizer_saves_and_gets_image_tokens(tmp_path):
    tok = build_tiny_tokenizer(["a red circle", "what colour ?"], tmp_path / "tok")
    reloaded = load_text_tokenizer(tmp_path / "tok")
    assert (
        reloaded("a red circle", add_special_tokens=False).input_ids
        == tok("a red circle", add_special_tokens=False).input_ids
    )
    before = len(reloaded)
    ids = add_image_tokens(reloaded, "<boi>", "<eoi>", "<image>")
    assert len(reloaded) == before + 3
    assert len({ids.boi, ids.eoi, ids.image, ids.eos, ids.pad}) == 5
    assert reloaded("red <image> circle", add_special_tokens=False).input_ids[1] == ids.image
    assert add_image_tokens(reloaded, "<boi>", "<eoi>", "<image>") == ids  # idempotent
    assert (
        reloaded.decode(
            [ids.boi, *reloaded("red", add_special_tokens=False).input_ids], skip_special_tokens=True
        )
        == "red"
    )
