"""End-to-end runs of the tokenizer trainer on a tiny synthetic world (unitok-tiny at 32 px, CPU).

What they prove: a short run writes metrics, images, checkpoints and a ``save_pretrained`` export that
``UniTok.from_pretrained`` loads; two gloo processes under torchrun compute the same losses as one
process with the same global batch; the loss falls; a run stopped and resumed ends bit-identical to an
uninterrupted one (discriminator, EMA, accumulation and a DataLoader worker included); corrupt shard
entries are skipped and counted across workers; the DeepSpeed engine trains and resumes.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizer_runs import make_world, run, tiny_overrides, torchrun

from unitok.data.formats import encode_jpeg, write_tar_shard
from unitok.tokenizer import UniTok
from unitok.tokenizer.train import TrainResult
from unitok.tokenizer.training import checkpointing
from unitok.tokenizer.training.config import load_run_config
from unitok.tokenizer.training.monitor import METRICS_FILE

# Losses compared between runs; "usage" is per process and so differs between 1 and 2 processes.
COMPARED = ("loss", "l1", "l2", "vq", "clip", "grad_norm")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(world, tmp_path_factory) -> tuple[TrainResult, Path]:
    out = tmp_path_factory.mktemp("single")
    return run(out, world, "logging.image_every=2", "logging.tensorboard=true"), out


def test_two_steps_write_metrics_images_checkpoint_and_a_loadable_export(single_run, world):
    result, out = single_run
    assert (result.step, result.total_steps, result.final_dir, result.skipped) == (2, 2, out / "final", 0)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2] and [r["samples"] for r in records] == [8, 16]
    for key in (*COMPARED, "lr", "usage", "perplexity", "logit_scale", "skipped", "epoch", "samples_per_s"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    # No warm-up at 2 steps: the first step runs at the peak lr, the last at end_ratio of it.
    optim = load_run_config("unitok-tiny-synth", tiny_overrides(out, world)).optim
    assert [r["lr"] for r in records] == pytest.approx([optim.lr, optim.lr * optim.end_ratio])
    assert (out / "images" / "step-00000002.png").is_file()
    assert Image.open(out / "images" / "step-00000002.png").size[1] > 2 * 32
    assert list((out / "tensorboard").iterdir())
    state = checkpointing.load_trainer_state(result.checkpoint)
    assert state["step"] == 2 and state["data"] == {
        "epoch": 0,
        "batch_in_epoch": 2,
        "samples_seen": 16,
        "skipped": 0,
    }
    model = UniTok.from_pretrained(result.final_dir)
    assert model.config.image_size == 32
    loaded = model.state_dict()
    assert set(loaded) == set(state["model"])
    assert all(torch.equal(loaded[k], state["model"][k]) for k in loaded)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    grid = 32 // model.config.patch_size
    assert model.encode(img).shape == (2, grid, grid, 8)
    # Calling a finished run again trains nothing and reports the last record.
    again = run(out, world, "checkpoint.resume=auto")
    assert (again.step, again.checkpoint, again.metrics["samples"]) == (2, result.checkpoint, 16)
    assert len(read_metrics(out)) == 2


@pytest.mark.distributed
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(single_run, world, tmp_path):
    _, single_out = single_run
    out = tmp_path / "ddp"
    overrides = tiny_overrides(out, world, "train.local_batch_size=4")
    torchrun(overrides)
    ddp, single = read_metrics(out), read_metrics(single_out)
    assert [r["samples"] for r in ddp] == [8, 16]
    # Each process reads a disjoint half of the same seeded permutation with the same per-sample crops,
    # the contrastive loss gathers features over processes and DDP averages gradients, so step 2 (after
    # one update) matches too.
    for mine, reference in zip(ddp, single):
        for key in COMPARED:
            assert mine[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    assert UniTok.from_pretrained(out / "final").config.image_size == 32


def test_loss_falls_over_a_short_run(world, tmp_path):
    out = tmp_path / "fall"
    result = run(out, world, "train.total_steps=30", "optim.lr=2e-3", "optim.warmup=0.1")
    assert result.step == 30
    records = read_metrics(out)
    first, last = records[:5], records[-5:]
    # The contrastive term of a batch of 8 starts near ln 8 and moves slowly; the pixel terms fall fast.
    for key, factor in (("l2", 0.7), ("l1", 0.8), ("loss", 0.9)):
        before = sum(r[key] for r in first) / 5
        after = sum(r[key] for r in last) / 5
        assert after < factor * before, (key, before, after)


def test_resume_after_an_interruption_ends_identical_to_an_uninterrupted_run(world, tmp_path):
    # The discriminator trains from step 1 (its random augmentation draws from the global RNG before and
    # after the interruption at step 2) and EMA, accumulation and a smaller reconstruction sub-batch are
    # on, so every piece of state a checkpoint holds matters for the result.
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
        "checkpoint.every_steps=2",
    )
    full = run(tmp_path / "full", world, *common)
    stopped = run(tmp_path / "resumed", world, *common, "train.stop_at_step=2")
    assert (stopped.step, stopped.final_dir) == (2, None)
    # The second half reads through a DataLoader worker: per-sample seeds make that irrelevant.
    resumed = run(tmp_path / "resumed", world, *common, "checkpoint.resume=auto", "data.num_workers=1")
    assert resumed.step == 4 and resumed.final_dir is not None
    assert "disc" in read_metrics(tmp_path / "resumed")[-1]
    a, b = (checkpointing.load_trainer_state(r.checkpoint) for r in (full, resumed))
    for part in ("model", "ema", "disc"):
        assert set(a[part]) == set(b[part])
        mismatched = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not mismatched, (part, mismatched[:5])
    for engine in ("gen_engine", "disc_engine"):
        states_a, states_b = a[engine]["optimizer"]["state"], b[engine]["optimizer"]["state"]
        assert all(torch.equal(states_a[i]["exp_avg_sq"], states_b[i]["exp_avg_sq"]) for i in states_a)
    assert a["data"] == b["data"]
    # The export holds the EMA weights.
    exported = UniTok.from_pretrained(resumed.final_dir).state_dict()
    assert all(torch.equal(exported[k], b["ema"][k]) for k in exported)


def test_corrupt_shard_entries_are_skipped_and_counted_across_workers(world, tmp_path):
    rows = [json.loads(line) for line in (world / "captions" / "train.jsonl").read_text().splitlines()][:12]
    samples = []
    for i, row in enumerate(rows):
        members = {
            "jpg": encode_jpeg(Image.open(world / row["image"]).convert("RGB")),
            "txt": row["caption"].encode(),
        }
        if i == 2:
            members["jpg"] = b"this is not a jpeg"
        if i == 5:
            del members["txt"]
        samples.append((f"{i:06d}", members))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar_shard(shards / "train-000000.tar", samples)
    out = tmp_path / "web"
    result = run(
        out,
        world,
        f"data.path={shards}",
        "data.format=webdataset",
        "data.shuffle_buffer=0",
        "data.num_workers=1",
        "train.local_batch_size=4",
    )
    # Two batches of 4 read samples 0-9 in order; 2 (undecodable) and 5 (no caption) were skipped.
    assert result.skipped == 2
    assert read_metrics(out)[-1]["skipped"] == 2
    assert checkpointing.load_trainer_state(result.checkpoint)["data"]["skipped"] == 2


def test_deepspeed_engine_trains_and_resumes_identically(world, tmp_path, monkeypatch, request):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    comm_backend = importlib.import_module("deepspeed.comm.torch")
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (about a minute) the
    # first time it sets up communication; one process never uses it.
    monkeypatch.setattr(comm_backend, "build_shm_op", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; the trainer would set it for good
    request.addfinalizer(
        lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group()
    )
    common = (
        "distributed.engine=deepspeed",
        "distributed.zero_stage=2",
        "train.total_steps=4",
        "train.local_batch_size=4",
        "train.grad_accum=2",
        "disc.enabled=true",
        "disc.preset=tiny",
        "disc.start=0.0",
        "disc.warmup=0.25",
        "checkpoint.every_steps=2",
    )
    full = run(tmp_path / "full", world, *common)
    run(tmp_path / "resumed", world, *common, "train.stop_at_step=2")
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000002" / "deepspeed" / "generator").is_dir()
    resumed = run(tmp_path / "resumed", world, *common, "checkpoint.resume=auto")
    a = UniTok.from_pretrained(full.final_dir).state_dict()
    b = UniTok.from_pretrained(resumed.final_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["logit_scale"].shape == () and read_metrics(tmp_path / "full")[-1]["disc"] > 0
    first = read_metrics(tmp_path / "full")[0]
    assert first["grad_norm"] > 0 and first["samples"] == 8
