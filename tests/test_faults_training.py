"""Fault injection against the tokenizer trainer: restarts from old checkpoints, changed configs on
resume, diverging (NaN) training, truncated checkpoints, two runs on one folder, interrupted exports,
and bad config files and values (with property-based tests of the config parser).

Runs are unitok-tiny at 32 px on a 48-image synthetic world, 1-4 steps each, on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from unitok.data.synth import SynthConfig, generate_world
from unitok.tokenizer.train import main as train_main
from unitok.tokenizer.train import train
from unitok.tokenizer.training import checkpointing
from unitok.tokenizer.training.checkpointing import TrainingError
from unitok.tokenizer.training.config import RunConfig, apply_overrides, load_run_config, read_config_file
from unitok.tokenizer.training.monitor import METRICS_FILE


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, SynthConfig(num_images=48, size=32, classify_per_class=1, shard_size=16), workers=1)
    return root


def overrides(out: Path, world: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.path={world}",
        "data.num_workers=0",
        "model.overrides.image_size=32",
        "train.device=cpu",
        "train.cpu_threads=1",
        "train.local_batch_size=8",
        "train.total_steps=3",
        "logging.log_every=1",
        "logging.image_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=5",
        "checkpoint.resume=null",
        "optim.lr=0.001",
        *extra,
    ]


# Read once: every run of a test starts from the same recipe.
RECIPE = read_config_file("unitok-tiny-synth")


def run(out: Path, world: Path, *extra: str):
    return train(RunConfig.from_dict(apply_overrides(RECIPE, overrides(out, world, *extra))))


def steps_on_disk(out: Path) -> list[int]:
    return [checkpointing.checkpoint_step(p) for p in checkpointing.list_checkpoints(out / "checkpoints")]


def test_a_restart_from_an_old_checkpoint_never_loses_the_newer_lineage(world, tmp_path):
    out = tmp_path / "run"
    run(out, world)
    assert steps_on_disk(out) == [1, 2, 3]
    step1 = out / "checkpoints" / "step-00000001"
    # Resuming step 1 over a folder holding steps 2 and 3 of another continuation is refused...
    with pytest.raises(TrainingError, match=r"newer than step 1.*step-00000002, step-00000003"):
        run(out, world, f"checkpoint.resume={step1}")
    # ... and so is a fresh start (resume null) into the same folder.
    with pytest.raises(TrainingError, match="newer than step 0"):
        run(out, world)
    assert steps_on_disk(out) == [1, 2, 3]
    # Branching moves the old continuation aside; keep_last=1 prunes only what this lineage wrote before.
    result = run(
        out, world, f"checkpoint.resume={step1}", "checkpoint.on_newer=branch", "checkpoint.keep_last=1"
    )
    assert result.step == 3 and result.checkpoint.name == "step-00000003"
    assert steps_on_disk(out) == [3]
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(checkpointing.SUPERSEDED_PREFIX)]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]
    # metrics.jsonl holds each step once, in order, though steps 2 and 3 were trained twice.
    steps = [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_prune_never_deletes_the_checkpoint_just_written_or_newer_ones(tmp_path):
    root = checkpointing.checkpoint_root(tmp_path)
    for step in (5, 6, 1, 2):
        folder = checkpointing.fresh_dir(root / checkpointing.step_dir_name(step))
        checkpointing.atomic_save({"step": step}, folder / checkpointing.TRAINER_FILE)
    checkpointing.prune(root, keep_last=1, current=root / "step-00000002")
    assert steps_on_disk(tmp_path) == [2, 5, 6]


def test_resume_with_a_changed_learning_rate_is_refused_or_applied(world, tmp_path):
    out = tmp_path / "run"
    run(out, world, "train.stop_at_step=1")
    with pytest.raises(TrainingError, match=r"optim\.lr: 0\.001 -> 0\.002.*--allow-config-change"):
        run(out, world, "checkpoint.resume=auto", "optim.lr=0.002")
    # Operational settings (logging, workers, stop step) may change without complaint.
    run(out, world, "checkpoint.resume=auto", "train.stop_at_step=2", "logging.log_every=2")
    result = run(
        out, world, "checkpoint.resume=auto", "optim.lr=0.002", "checkpoint.allow_config_change=true"
    )
    state = checkpointing.load_trainer_state(result.checkpoint)
    groups = state["gen_engine"]["optimizer"]["param_groups"]
    assert all(group["initial_lr"] == 0.002 for group in groups)
    assert state["gen_engine"]["scheduler"]["base_lrs"] == [0.002, 0.002]


def test_diverging_training_is_stopped_and_never_saved(world, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="not finite for 2 step"):
        run(
            out, world, "optim.lr=1e8", "optim.warmup=0", "train.max_nonfinite_steps=2", "train.total_steps=4"
        )
    assert "update was skipped" in caplog.text
    assert not (out / "final").exists()
    for folder in checkpointing.list_checkpoints(out / "checkpoints"):
        weights = checkpointing.load_trainer_state(folder)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "1e999"])
def test_non_finite_config_values_are_rejected(value):
    with pytest.raises(ValueError, match=r"optim\.lr must be a finite number"):
        load_run_config("unitok-tiny-synth", [f"optim.lr={value}"])


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(world, tmp_path, caplog):
    out = tmp_path / "run"
    run(out, world, "train.stop_at_step=2")
    newest = out / "checkpoints" / "step-00000002" / checkpointing.TRAINER_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        result = run(out, world, "checkpoint.resume=auto")
    assert "step-00000002" in caplog.text and "truncated" in caplog.text
    assert result.step == 3 and steps_on_disk(out) == [1, 2, 3]
    assert (out / "checkpoints" / "corrupt-step-00000002").is_dir()


@pytest.mark.parametrize("damage", ["empty", "cut"])
def test_an_unreadable_explicit_checkpoint_names_its_file(tmp_path, damage):
    folder = checkpointing.fresh_dir(tmp_path / "step-00000001")
    path = folder / checkpointing.TRAINER_FILE
    checkpointing.atomic_save({"step": 1, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:700])
    with pytest.raises(ValueError, match=f"{path}.*unreadable"):
        checkpointing.load_resumable(str(folder), tmp_path)


def test_two_runs_on_one_folder_are_refused_naming_the_holder(world, tmp_path):
    out = tmp_path / "run"
    holder = checkpointing.RunLock(out).acquire()
    try:
        with pytest.raises(TrainingError, match=f"in use by another training run \\(process {os.getpid()}"):
            run(out, world)
    finally:
        holder.release()
    assert not (out / "checkpoints").exists()


def test_export_is_atomic_with_normal_file_modes(world, tmp_path):
    out = tmp_path / "run"
    stale = out / ".final.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    umask = os.umask(0o022)
    try:
        result = run(out, world, "train.total_steps=1")
    finally:
        os.umask(umask)
    assert not stale.exists()
    assert sorted(p.name for p in result.final_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert {oct(p.stat().st_mode & 0o777) for p in result.final_dir.iterdir()} == {"0o644"}


# ----------------------------------------------------------------------------------------------
# config files


def test_yaml_and_json_syntax_errors_name_the_file_and_line(tmp_path):
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("output_dir: x\ntrain:\n  total_steps: [1\n")
    with pytest.raises(ValueError, match=f"{bad_yaml}:\\d+:\\d+: invalid YAML"):
        read_config_file(str(bad_yaml))
    bad_json = tmp_path / "run.json"
    bad_json.write_text('{"output_dir": "x",\n "train": }')
    with pytest.raises(ValueError, match=f"{bad_json}:2:11: invalid JSON"):
        read_config_file(str(bad_json))
    with pytest.raises(ValueError, match="not valid YAML"):
        apply_overrides({}, ["optim.lr=[1"])


def test_config_error_through_the_command_line_is_one_line(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("model: [\n")
    with pytest.raises(SystemExit) as exc:
        train_main(["--config", str(bad)], prog="unitok train-tokenizer")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{bad}:" in err


_FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=1e-12, max_value=1e3)
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_KEYS = st.sampled_from(
    [
        "optim.lr",
        "optim.betas",
        "train.local_batch_size",
        "train.total_steps",
        "train.precision",
        "train.ema_decay",
        "data.crop_scale",
        "data.num_workers",
        "checkpoint.keep_last",
        "logging.tensorboard",
        "loss.clip",
        "disc.start",
        "model.preset",
        "output_dir",
        "bogus.key",
    ]
)


@settings(max_examples=50, deadline=None)
@given(key=_KEYS, value=_VALUES)
@example(key="optim.lr", value=float("inf"))
@example(key="disc.start", value=float("nan"))
def test_any_value_for_any_key_is_accepted_or_rejected_with_a_value_error(key, value):
    tree = apply_overrides(read_config_file("unitok-tiny-synth"), [])
    section, _, leaf = key.rpartition(".")
    node = tree
    for part in filter(None, section.split(".")):
        node = node.setdefault(part, {})
    node[leaf] = value
    try:
        config = RunConfig.from_dict(tree)
    except ValueError as err:
        assert str(err)
        return
    # Whatever was accepted is finite, survives the YAML round trip and validates again.
    for number in _numbers(config.to_dict()):
        assert math.isfinite(number)
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@settings(max_examples=25, deadline=None)
@given(
    lr=_FINITE,
    batch=st.integers(1, 4096),
    betas=st.tuples(_FINITE.map(lambda x: x / 1e3 % 1), _FINITE.map(lambda x: x / 1e3 % 1)),
)
def test_valid_overrides_round_trip_through_the_command_line_syntax(lr, batch, betas):
    config = load_run_config(
        "unitok-tiny-synth",
        [f"optim.lr={lr!r}", f"train.local_batch_size={batch}", f"optim.betas=[{betas[0]!r}, {betas[1]!r}]"],
    )
    assert config.optim.lr == lr and config.train.local_batch_size == batch
    assert config.optim.betas == betas


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, float):
        yield tree


# ----------------------------------------------------------------------------------------------
# what a run shows and leaves behind


def test_periodic_evaluation_reaches_tensorboard_and_eval_jsonl(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(
        out,
        world,
        "logging.tensorboard=true",
        "eval.every_steps=2",
        "eval.max_images=4",
        "eval.batch_size=4",
        f"eval.zero_shot={world / 'classify' / 'shape' / 'val'}",
    )
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    # The val split of the 48-image world holds 2 images.
    assert [r["step"] for r in records] == [2, 3]
    assert all(r["images"] == 2 and 0 < r["psnr"] < 100 and 0 <= r["zero_shot_top1"] <= 1 for r in records)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("eval/psnr")] == [2, 3]


def test_log_lines_never_land_on_the_progress_bar_line(tmp_path, capsys):
    folder = tmp_path / "data"
    (folder / "captions").mkdir(parents=True)
    rows = []
    for i in range(17):
        name = f"{i}.png"
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name) if i else (folder / name).write_bytes(b"not a png")
        rows.append(json.dumps({"image": name, "caption": f"picture {i}"}))
    (folder / "captions" / "train.jsonl").write_text("\n".join(rows) + "\n")
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as a user's logging setup has
    logging.getLogger().addHandler(handler)
    try:
        run(tmp_path / "run", folder, "logging.progress_bar=true", "train.total_steps=2")
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "skipped a sample" in err and "train:" in err
    for at in (i for i in range(len(err)) if err.startswith("skipped a sample", i)):
        line = err[err.rfind("\n", 0, at) + 1 : at].split("\r")[-1]
        assert "train:" not in line and "it/s" not in line and "%|" not in line


def test_intermediate_checkpoints_can_be_exported_and_evaluated(world, tmp_path, capsys):
    from unitok.eval.tokenizer_eval import load_model
    from unitok.scripts.cli import main as cli
    from unitok.tokenizer import UniTok

    out = tmp_path / "run"
    run(out, world, "train.stop_at_step=2")
    step1 = out / "checkpoints" / "step-00000001"
    assert cli(["export", str(step1)]) == 0
    exported = out / "exports" / "step-00000001"
    assert capsys.readouterr().out.strip() == str(exported)
    model = UniTok.from_pretrained(exported)
    weights = checkpointing.load_trainer_state(step1)["model"]
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    # eval-tokenizer takes a step folder, its trainer.pt, or the run folder (its newest checkpoint).
    assert torch.equal(load_model(str(step1), None).state_dict()["logit_scale"], weights["logit_scale"])
    newest = checkpointing.load_trainer_state(out / "checkpoints" / "step-00000002")["model"]
    loaded = load_model(str(out), None).state_dict()
    assert all(torch.equal(loaded[k], newest[k]) for k in newest)
    assert cli(["export", str(tmp_path / "nowhere")]) == 2
    assert "neither a trainer checkpoint" in capsys.readouterr().err
