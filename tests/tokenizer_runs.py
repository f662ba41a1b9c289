"""Shared pieces of the tests that run the tokenizer trainer on a tiny synthetic world (not a test module)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from unitok.data.synth import SynthConfig, generate_world
from unitok.tokenizer.train import TrainResult, train
from unitok.tokenizer.training.config import load_run_config


def make_world(tmp_path_factory, num_images: int = 48) -> Path:
    """A 32 px synthetic world of ``num_images`` images (no classification folders), written once per module."""
    root = tmp_path_factory.mktemp("world")
    generate_world(
        root, SynthConfig(num_images=num_images, size=32, classify_per_class=0, shard_size=16), workers=1
    )
    return root


def run_overrides(out: Path, world: Path, *extra: str, batch: int = 8) -> list[str]:
    """``unitok-tiny-synth`` at 32 px on ``world``, on the CPU, one thread, no images or TensorBoard logged."""
    return [
        f"output_dir={out}",
        f"data.path={world}",
        "data.synth=null",
        "data.num_workers=0",
        "model.overrides.image_size=32",
        "train.device=cpu",
        # One thread: bit-exact comparisons need the same reduction order in every run, and OpenMP threads
        # that spin on a busy 2-core machine make a run many times slower.
        "train.cpu_threads=1",
        f"train.local_batch_size={batch}",
        "logging.image_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]


def tiny_overrides(out: Path, world: Path, *extra: str) -> list[str]:
    """Two steps of batch 8 with every step logged and no periodic checkpoint."""
    return run_overrides(
        out,
        world,
        # The entropy term uses each process's own batch statistics, so it alone would differ between one
        # process and two; the comparisons are about data split, gathering and gradient averaging.
        "model.overrides.entropy_weight=0.0",
        "train.total_steps=2",
        "logging.log_every=1",
        "checkpoint.every_steps=1000",
        *extra,
    )


def run(out: Path, world: Path, *extra: str) -> TrainResult:
    return train(load_run_config("unitok-tiny-synth", tiny_overrides(out, world, *extra)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(overrides: list[str], processes: int = 2) -> None:
    """``unitok.tokenizer.train --config unitok-tiny-synth`` with ``overrides`` in ``processes`` gloo processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += [
        "--master_port",
        str(free_port()),
        "-m",
        "unitok.tokenizer.train",
        "--config",
        "unitok-tiny-synth",
    ]
    command += [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
