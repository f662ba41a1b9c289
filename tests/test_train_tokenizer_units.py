"""Fast tests of the tokenizer trainer's parts: run config, schedules, sampler, checkpoint files, RNG state."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from unitok.tokenizer.train import main
from unitok.tokenizer.training import checkpointing
from unitok.tokenizer.training.config import RunConfig, apply_overrides, load_run_config, preset_names
from unitok.tokenizer.training.data import EpochSampler
from unitok.tokenizer.training.ema import ModelEma
from unitok.tokenizer.training.optim import WarmupCosine, param_groups


def test_presets_load_and_the_large_one_is_the_release_recipe():
    assert {"unitok-large-datacomp", "unitok-tiny-synth"} <= set(preset_names())
    large = load_run_config("unitok-large-datacomp")
    assert large.model.tokenizer_config().image_size == 256
    assert large.model.tokenizer_config().checkpoint_parts == ("encoder_front", "upsampler")  # gpu-80gb
    assert (large.optim.lr, large.optim.betas, large.optim.weight_decay, large.optim.eps) == (
        5e-4,
        (0.9, 0.95),
        0.02,
        1e-6,
    )
    assert (large.optim.warmup, large.optim.end_ratio, large.optim.grad_clip) == (0.01, 0.1, 10.0)
    assert (large.disc.lr, large.disc.betas, large.disc.weight_decay) == (2e-5, (0.5, 0.9), 0.2)
    assert (large.disc.start, large.disc.warmup, large.disc.weight, large.disc.bcr) == (0.375, 0.03, 0.4, 4.0)
    assert (large.loss.l1, large.loss.l2, large.loss.lpips, large.loss.vq, large.loss.clip) == (
        0.2,
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert large.train.precision == "bf16" and large.data.format == "webdataset"
    # 16k global batch = 64 x 256 GPUs; one epoch of 1.28 B samples is 78 125 steps.
    assert large.train.global_batch_size(256) == 16384
    assert large.train.num_steps(256) == 78125
    tiny = load_run_config("unitok-tiny-synth")
    assert tiny.train.precision == "fp32" and tiny.loss.lpips == 0 and not tiny.disc.enabled
    assert tiny.model.tokenizer_config().num_codebooks == 8


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"optim\.lrr"):
        load_run_config("unitok-tiny-synth", ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nope'\]"):
        load_run_config("unitok-tiny-synth", ["nope=1"])
    with pytest.raises(ValueError, match=r"optim\.lr must be a number"):
        load_run_config("unitok-tiny-synth", ["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"distributed\.engine must be one of"):
        load_run_config("unitok-tiny-synth", ["distributed.engine=horovod"])
    with pytest.raises(ValueError, match=r"train\.local_batch_size must be an integer"):
        load_run_config("unitok-tiny-synth", ["train.local_batch_size=2.5"])
    with pytest.raises(ValueError, match=r"exactly one of train\.total_steps and train\.total_samples"):
        load_run_config("unitok-tiny-synth", ["train.total_samples=1000"])
    with pytest.raises(ValueError, match=r"data\.synth"):
        load_run_config("unitok-tiny-synth", ["data.synth.colour=red"])
    with pytest.raises(ValueError, match="unknown TokenizerConfig keys"):
        load_run_config("unitok-tiny-synth", ["model.overrides.widht=3"]).model.tokenizer_config()
    with pytest.raises(ValueError, match="no config file 'missing' and no preset"):
        load_run_config("missing")


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    config = load_run_config(
        "unitok-tiny-synth",
        [
            "optim.lr=1e-3",
            "optim.betas=[0.8, 0.99]",
            "train.ema_decay=0.99",
            "model.overrides.image_size=32",
            "output_dir=a b/c",
        ],
    )
    assert config.optim.lr == 1e-3 and config.optim.betas == (0.8, 0.99) and config.train.ema_decay == 0.99
    assert config.model.tokenizer_config().image_size == 32 and config.output_dir == "a b/c"
    assert RunConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_run_config(str(path)) == config
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=x"]) == {"a": {"b": 1, "c": {"d": "x"}}}
    with pytest.raises(ValueError, match=r"section\.key=value"):
        apply_overrides({}, ["novalue"])


def test_cli_prints_the_resolved_config_and_rejects_bad_keys(capsys):
    assert (
        main(
            [
                "--config",
                "unitok-tiny-synth",
                "--set",
                "optim.lr=0.002",
                "--out",
                "elsewhere",
                "--print-config",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "lr: 0.002" in printed and "output_dir: elsewhere" in printed
    with pytest.raises(SystemExit) as exc:
        main(["--config", "unitok-tiny-synth", "--set", "optim.nope=1"], prog="unitok train-tokenizer")
    assert exc.value.code == 2
    assert "optim.nope" in capsys.readouterr().err


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(total_steps=101, warmup_steps=10, start_ratio=0.0, end_ratio=0.1)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5) and schedule(10) == pytest.approx(1.0)
    assert schedule(100) == pytest.approx(0.1)
    mid = 10 + (100 - 10) / 2
    assert schedule(mid) == pytest.approx(0.1 + 0.9 * 0.5)
    values = [schedule(s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    constant = WarmupCosine(50, 0, cosine=False)
    assert {constant(s) for s in range(50)} == {1.0}
    delayed = WarmupCosine(total_steps=20, warmup_steps=4, start_step=10)
    assert delayed(9) == 0.0 and delayed(12) == pytest.approx(0.5)


def test_weight_decay_groups_exclude_vectors_and_frozen_params():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(1, 2, 3))
    module[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(module, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(module[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(module[0].bias),
        id(module[1].weight),
        id(module[1].bias),
        id(module[2].bias),
    }


def test_epoch_sampler_splits_a_seeded_permutation_and_resumes_mid_epoch():
    shares = [list(EpochSampler(20, 8, rank, 2, seed=3, epoch=1)) for rank in range(2)]
    indices = [i for share in shares for _, i in share]
    assert len(indices) == len(set(indices)) == 16 and {e for share in shares for e, _ in share} == {1}
    assert list(EpochSampler(20, 8, 0, 2, seed=3, epoch=1, start=5)) == shares[0][5:]
    assert [i for _, i in EpochSampler(20, 8, 0, 2, seed=3, epoch=2)] != [i for _, i in shares[0]]
    with pytest.raises(ValueError, match="needs 24 samples"):
        EpochSampler(20, 12, 0, 2, seed=0, epoch=0)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    state = checkpointing.capture_rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(2))
    checkpointing.atomic_save({"rng": [state]}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpointing.restore_rng_state(loaded["rng"][0])
    again = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(2))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_checkpoint_folders_resolve_prune_and_ignore_partial_saves(tmp_path):
    root = checkpointing.checkpoint_root(tmp_path)
    assert checkpointing.resolve_resume("auto", tmp_path) is None
    assert checkpointing.resolve_resume(None, tmp_path) is None
    for step in (3, 10, 7):
        folder = checkpointing.fresh_dir(checkpointing.temporary_dir(root, step))
        checkpointing.atomic_save({"step": step}, folder / checkpointing.TRAINER_FILE)
        checkpointing.commit(folder, root / checkpointing.step_dir_name(step))
    checkpointing.fresh_dir(checkpointing.temporary_dir(root, 12))  # a save that was interrupted
    (root / checkpointing.step_dir_name(11)).mkdir()  # a folder without trainer.pt
    newest = checkpointing.resolve_resume("auto", tmp_path)
    assert newest.name == "step-00000010"
    assert checkpointing.load_trainer_state(newest)["step"] == 10
    assert checkpointing.resolve_resume(str(newest / checkpointing.TRAINER_FILE), tmp_path) == newest
    with pytest.raises(ValueError, match="expected 'auto', a checkpoint folder"):
        checkpointing.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    checkpointing.prune(root, keep_last=2)
    assert [p.name for p in checkpointing.list_checkpoints(root)] == ["step-00000007", "step-00000010"]
    assert not list(root.glob(".tmp-*"))


def test_ema_moves_towards_the_weights_and_keeps_state_dict_keys():
    model = torch.nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], start + 1.0)
    assert set(ema.state_dict()) == set(model.state_dict())
    assert math.isclose(ema.decay, 0.75)
