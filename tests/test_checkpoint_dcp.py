"""Trainer checkpoints in the ``dcp`` format (``torch.distributed.checkpoint``, optionally asynchronous).

What they prove: the trainer state splits into a small ``trainer.pt`` and DCP tensors and merges back
exactly; a run stopped at a dcp checkpoint and resumed ends bit-identical to an uninterrupted run in the
default format (discriminator, EMA, accumulation, optimiser moments), prunes only after a commit, and
exports from either format; training goes on while an asynchronous save is still writing; a failed write
stops the run and commits nothing; a truncated or partial dcp checkpoint is passed over by ``--resume
auto``; metadata naming other code is refused; two gloo processes each write their share and resume.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from tokenizer_runs import make_world, run, tiny_overrides, torchrun
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from unitok.tokenizer import UniTok
from unitok.tokenizer.train import Trainer
from unitok.tokenizer.training import checkpointing, export
from unitok.tokenizer.training.config import load_run_config

DCP = ("checkpoint.format=dcp", "checkpoint.async_save=true")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory)


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("model", "ema", "disc"):
        assert (a[part] is None) == (b[part] is None), part
        if a[part] is None:
            continue
        assert set(a[part]) == set(b[part]), part
        mismatched = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not mismatched, (part, mismatched[:5])
    for engine in ("gen_engine", "disc_engine"):
        if a[engine] is None:
            continue
        states_a, states_b = a[engine]["optimizer"]["state"], b[engine]["optimizer"]["state"]
        assert set(states_a) == set(states_b)
        for i in states_a:
            assert all(torch.equal(states_a[i][k], states_b[i][k]) for k in states_a[i]), (engine, i)
        assert a[engine]["optimizer"]["param_groups"] == b[engine]["optimizer"]["param_groups"]
        assert a[engine]["scheduler"] == b[engine]["scheduler"]
    assert a["data"] == b["data"] and a["step"] == b["step"]


def test_split_and_merge_round_trip_an_optimizer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {
        "step": 1,
        "model": model.state_dict(),
        "gen_engine": {"optimizer": optimizer.state_dict()},
        "rng": [1],
    }
    skeleton, tensors = checkpointing.split_tensors(state)
    assert set(tensors) == {
        "model/weight",
        "model/bias",
        *(f"gen_engine/optimizer/state/{i}/{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")),
    }
    assert skeleton["model"]["weight"] == {"__dcp__": "model/weight"} and skeleton["rng"] == [1]
    assert skeleton["gen_engine"]["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    merged = checkpointing.merge_tensors(skeleton, tensors)
    assert (
        merged["gen_engine"]["optimizer"]["state"][1]["exp_avg"]
        is state["gen_engine"]["optimizer"]["state"][1]["exp_avg"]
    )
    optimizer.load_state_dict(merged["gen_engine"]["optimizer"])
    del tensors["model/bias"]
    with pytest.raises(KeyError, match="model/bias"):
        checkpointing.merge_tensors(skeleton, tensors)


def test_shares_cover_every_tensor_once_and_balance_the_bytes():
    sizes = [7, 3, 3, 2, 2, 2, 1, 1, 1, 1, 0]
    tensors = {f"t{i}": torch.zeros(n, 4) for i, n in enumerate(sizes)}
    shares = checkpointing.assign_shares(tensors, 3)
    assert sorted(key for share in shares for key in share) == sorted(tensors)
    loads = [sum(tensors[key].numel() for key in share) for share in shares]
    # Largest first onto the lightest share: the shares differ by at most the largest tensor.
    assert max(loads) - min(loads) <= 7 * 4 and min(loads) > 0
    assert shares == checkpointing.assign_shares(dict(reversed(tensors.items())), 3)
    assert checkpointing.assign_shares(tensors, 1) == [
        sorted(tensors, key=lambda k: (-tensors[k].numel(), k))
    ]


def test_a_run_resumed_from_async_dcp_checkpoints_ends_identical_to_an_uninterrupted_run(world, tmp_path):
    common = (
        "train.total_steps=4",
        "train.local_batch_size=4",
        "train.recon_batch_size=2",
        "train.grad_accum=2",
        "train.ema_decay=0.9",
        "disc.enabled=true",
        "disc.preset=tiny",
        "disc.start=0.0",
        "disc.warmup=0.25",
        "checkpoint.keep_last=2",
        "checkpoint.every_steps=1",
    )
    # The reference in the default format: resuming does not depend on the format written.
    full = run(tmp_path / "full", world, *common, "checkpoint.every_steps=1000")
    out = tmp_path / "resumed"
    stopped = run(out, world, *common, *DCP, "train.stop_at_step=2")
    assert (stopped.step, stopped.final_dir) == (2, None)
    root = checkpointing.checkpoint_root(out)
    # Pruned to keep_last only once each save was committed; no staging folder is left behind.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    folder = root / "step-00000002"
    assert (folder / "dcp" / ".metadata").is_file() and list((folder / "dcp").glob("*.distcp"))
    skeleton = torch.load(folder / "trainer.pt", weights_only=True)
    assert skeleton["format"] == "dcp" and skeleton["model"]["logit_scale"] == {
        "__dcp__": "model/logit_scale"
    }
    resumed = run(out, world, *common, *DCP, "checkpoint.resume=auto")
    assert resumed.step == 4 and resumed.final_dir is not None
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    a, b = (checkpointing.load_trainer_state(r.checkpoint) for r in (full, resumed))
    assert_same_state(a, b)
    # unitok export reads both formats the same way; the final export holds the EMA weights.
    target = tmp_path / "exported"
    assert export.main([str(out), "--out", str(target)]) == 0
    for folder in (target, resumed.final_dir):
        weights = UniTok.from_pretrained(folder).state_dict()
        assert all(torch.equal(weights[k], b["ema"][k]) for k in weights)


def test_training_goes_on_while_an_async_save_is_writing(world, tmp_path, monkeypatch):
    released = threading.Event()
    seen: list[tuple[int, bool]] = []
    timed_out: list[bool] = []
    write_data = FileSystemWriter.write_data

    def slow_write_data(self, plan, planner):
        # Holds the first save's write until the training thread has started the next step.
        timed_out.append(not released.wait(timeout=20))
        return write_data(self, plan, planner)

    train_step = Trainer.train_step

    def recording_train_step(self):
        pending = self.dcp_saver.pending
        seen.append((self.step, pending is not None and not pending.done()))
        if self.step >= 1:
            released.set()
        return train_step(self)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write_data)
    monkeypatch.setattr(Trainer, "train_step", recording_train_step)
    out = tmp_path / "async"
    result = run(
        out, world, *DCP, "train.total_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=3"
    )
    # Step 2 started while the checkpoint of step 1 was still being written, and released it.
    assert seen[:2] == [(0, False), (1, True)]
    assert timed_out and not any(timed_out)
    assert result.step == 3 and result.final_dir is not None
    steps = [
        checkpointing.checkpoint_step(p)
        for p in checkpointing.list_checkpoints(checkpointing.checkpoint_root(out))
    ]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_write_stops_the_run_and_is_never_committed(world, tmp_path, monkeypatch, background):
    def failing_write_data(self, plan, planner):
        raise OSError("No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", failing_write_data)
    out = tmp_path / "full-disk"
    with pytest.raises(
        checkpointing.TrainingError,
        match=r"writing checkpoint .*step-00000001 .*failed: process 0: OSError: No space left on device$",
    ):
        run(
            out,
            world,
            "checkpoint.format=dcp",
            f"checkpoint.async_save={background}",
            "checkpoint.every_steps=1",
        )
    assert checkpointing.list_checkpoints(checkpointing.checkpoint_root(out)) == []
    assert not (out / "final").exists()


def test_a_truncated_or_partial_dcp_checkpoint_is_passed_over(world, tmp_path, caplog):
    out = tmp_path / "bad"
    run(out, world, *DCP, "checkpoint.every_steps=1", "train.stop_at_step=2", "train.total_steps=3")
    root = checkpointing.checkpoint_root(out)
    newest = root / "step-00000002"
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    found, state, bad = checkpointing.load_resumable("auto", out)
    assert (found, bad, state["step"]) == (root / "step-00000001", [newest], 1)
    assert (
        "unreadable, probably incomplete or truncated" in caplog.text and str(newest / "dcp") in caplog.text
    )
    (newest / "dcp" / ".metadata").unlink()
    found, _, bad = checkpointing.load_resumable("auto", out)
    assert (found, bad) == (root / "step-00000001", [newest])
    with pytest.raises(ValueError, match="unreadable"):
        checkpointing.load_trainer_state(newest)
    # The trainer resumes from step 1 (in the default format now), setting the bad checkpoint aside.
    resumed = run(out, world, "checkpoint.every_steps=1", "train.total_steps=3", "checkpoint.resume=auto")
    assert resumed.step == 3
    assert (root / "corrupt-step-00000002").is_dir()
    assert "format" not in torch.load(root / "step-00000003" / "trainer.pt", weights_only=True)


def test_checkpoint_metadata_naming_other_code_is_refused(tmp_path):
    import pickle

    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        checkpointing.read_dcp_tensors(folder)


def test_async_save_needs_the_dcp_format():
    with pytest.raises(ValueError, match=r"checkpoint\.async_save needs checkpoint\.format dcp"):
        load_run_config("unitok-tiny-synth", ["checkpoint.async_save=true"])


@pytest.mark.distributed
def test_two_gloo_processes_write_their_shares_and_resume(world, tmp_path):
    common = ("train.total_steps=3", "checkpoint.every_steps=1")
    single = run(tmp_path / "single", world, *common)
    out = tmp_path / "ddp"
    torchrun(tiny_overrides(out, world, *common, *DCP, "train.local_batch_size=4", "train.stop_at_step=2"))
    folder = checkpointing.checkpoint_root(out) / "step-00000002"
    shards = {p.name: p.stat().st_size for p in (folder / "dcp").glob("*.distcp")}
    # Each process staged and wrote only the share of the replicated tensors assigned to it.
    assert sorted(shards) == ["__0_0.distcp", "__1_0.distcp"] and min(shards.values()) > 1000
    assert len(checkpointing.load_trainer_state(folder)["rng"]) == 2
    torchrun(tiny_overrides(out, world, *common, *DCP, "train.local_batch_size=4", "checkpoint.resume=auto"))
    a = checkpointing.load_trainer_state(single.checkpoint)
    b = checkpointing.load_trainer_state(checkpointing.checkpoint_root(out) / "step-00000003")
    assert b["step"] == 3 and a["data"] == b["data"]
    # Two processes match one with the same global batch up to the order of float sums.
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
