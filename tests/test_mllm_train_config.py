"""Run configs of train-mllm: shipped presets and DeepSpeed files, validation, MLLM config pass-through."""

import dataclasses

import pytest
from transformers import TrainingArguments

from unitok.mllm.train import build_mllm_config, training_arguments
from unitok.mllm.training.config import deepspeed_names, load_deepspeed_config, load_run_config, preset_names


def test_every_preset_loads_with_valid_training_arguments():
    assert {
        "mllm-tiny-synth",
        "llama2-7b-align",
        "llama2-7b-pretrain",
        "llama2-7b-sft",
        "llama2-7b-lora",
    } <= set(preset_names())
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name in preset_names():
        config = load_run_config(name)
        kwargs, _ = training_arguments(config)
        assert set(kwargs) <= known, name
        assert kwargs["remove_unused_columns"] is False


def test_reference_batch_sizes_and_learning_rates():
    pretrain = load_run_config("llama2-7b-pretrain")
    assert pretrain.data.samples_per_epoch == 70_000_000 and pretrain.stage == "full"
    t = pretrain.training
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"], t["learning_rate"]) == (
        4,
        4,
        2e-5,
    )
    assert t["deepspeed"] == "zero3" and t["bf16"] and t["gradient_checkpointing"]
    assert load_run_config("llama2-7b-sft").data.samples_per_epoch == 3_000_000
    align = load_run_config("llama2-7b-align")
    assert align.stage == "alignment" and align.training["learning_rate"] == 1e-3
    assert load_run_config("llama2-7b-lora").model.config["lora_r"] == 128


def test_deepspeed_configs_ship_zero2_zero3_and_offload():
    assert set(deepspeed_names()) == {"zero2", "zero3", "zero3_offload"}
    assert load_deepspeed_config("zero2")["zero_optimization"]["stage"] == 2
    zero3 = load_deepspeed_config("zero3")["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"] is True
    offload = load_deepspeed_config("zero3_offload")["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"
    for name in deepspeed_names():
        assert "optimizer" not in load_deepspeed_config(name)
    config = load_run_config(
        "mllm-tiny-synth", ["training.deepspeed=zero3", "training.gradient_accumulation_steps=2"]
    )
    ds = training_arguments(config)[0]["deepspeed"]
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in ds


def test_unknown_keys_and_wrong_types_are_named():
    with pytest.raises(ValueError, match=r"data\.shuffle"):
        load_run_config("mllm-tiny-synth", ["data.shuffle=true"])
    with pytest.raises(ValueError, match="stage must be one of"):
        load_run_config("mllm-tiny-synth", ["stage=everything"])
    with pytest.raises(ValueError, match="unknown kinds"):
        load_run_config("mllm-tiny-synth", ["data.mixture={video: 1.0}"])
    with pytest.raises(ValueError, match="TrainingArguments"):
        training_arguments(load_run_config("mllm-tiny-synth", ["training.learning_rat=1.0"]))
    with pytest.raises(ValueError, match="no run config file"):
        load_run_config("no-such-preset")


def test_loss_options_pass_through_to_the_model_config():
    config = load_run_config(
        "mllm-tiny-synth",
        [
            "data.stores=[]",
            "data.texts=[t.jsonl]",
            "model.config.loss_weighting=token_count",
            "model.config.z_loss_weight=5.0e-5",
        ],
    )
    mllm = build_mllm_config(config)
    assert mllm.loss_weighting == "token_count" and mllm.z_loss_weight == 5e-5
    assert mllm.text_tokenizer == "text_tokenizer"
    bad = load_run_config(
        "mllm-tiny-synth", ["data.stores=[]", "data.texts=[t.jsonl]", "model.config.loss_weighting=sum"]
    )
    with pytest.raises(ValueError, match="loss_weighting"):
        build_mllm_config(bad)


def test_float_arguments_in_any_yaml_spelling_reach_the_trainer_as_numbers():
    # YAML reads 5e-3 (no dot) as a string; TrainingArguments would keep it and AdamW would fail on it.
    kwargs, _ = training_arguments(load_run_config("mllm-tiny-synth", ["training.learning_rate=5e-3"]))
    assert kwargs["learning_rate"] == 0.005 and isinstance(kwargs["learning_rate"], float)
    with pytest.raises(ValueError, match=r"training\.weight_decay must be a number"):
        training_arguments(load_run_config("mllm-tiny-synth", ["training.weight_decay=lots"]))
