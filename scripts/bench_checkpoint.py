"""Benchmark: how long a trainer checkpoint blocks training, in each checkpoint format.

``unitok bench checkpoint [--preset unitok-base] [--repeats 2] [--dir DIR]`` builds the preset's tokenizer
on the CPU with a full AdamW state (two moments per weight, as after the first step) and saves that trainer
state the three ways the trainer can: ``checkpoint.format: torch`` (one ``trainer.pt``), ``dcp`` written
synchronously, and ``dcp`` with ``checkpoint.async_save`` (a copy to host memory, then a background
thread). For each it prints the seconds training is blocked and the seconds until the checkpoint is
committed (median over ``--repeats``), then reads the last one back and checks every tensor. One process:
the ``dcp`` formats split the write over the processes of a run, which this does not show.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.training import checkpointing

MODES = ("torch", "dcp", "dcp + async_save")


def trainer_state(preset: str) -> dict:
    """The ``trainer.pt`` contents that matter for size: weights and AdamW moments of ``preset``."""
    torch.manual_seed(0)
    model = UniTok(TokenizerConfig.preset(preset))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.randn_like(p),
            "exp_avg_sq": torch.rand_like(p),
        }
    return {"step": 1, "model": model.state_dict(), "gen_engine": {"optimizer": optimizer.state_dict()}}


def save_once(mode: str, state: dict, root: Path) -> tuple[float, float, Path]:
    """(seconds blocked, seconds until committed, checkpoint folder) of one save in ``mode``."""
    tmp = checkpointing.fresh_dir(checkpointing.temporary_dir(root, 1))
    final = root / checkpointing.step_dir_name(1)
    started = time.perf_counter()
    if mode == "torch":
        checkpointing.atomic_save(state, tmp / checkpointing.TRAINER_FILE)
        checkpointing.commit(tmp, final)
        blocked = time.perf_counter() - started
        return blocked, blocked, final
    saver = checkpointing.DcpSaver(is_main=True, keep_last=1, async_save=mode.endswith("async_save"))
    saver.start(state, tmp, final)
    blocked = time.perf_counter() - started
    saver.wait()
    return blocked, time.perf_counter() - started, final


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok bench checkpoint``; prints a markdown table."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="unitok-base", help="tokenizer preset (default: unitok-base)")
    parser.add_argument("--repeats", type=int, default=2, help="saves per format (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dir", help="folder to write into (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1, got {args.repeats}, {args.threads}")
    torch.set_num_threads(args.threads)
    state = trainer_state(args.preset)
    _, tensors = checkpointing.split_tensors(state)
    gib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    results: dict[str, tuple[float, float]] = {}
    try:
        last = None
        for mode in tqdm(MODES, desc="formats"):
            times = []
            for _ in range(args.repeats):
                if last is not None:
                    shutil.rmtree(last)
                blocked, committed, last = save_once(mode, state, root)
                times.append((blocked, committed))
            results[mode] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
        loaded = checkpointing.load_trainer_state(last)
        _, read_back = checkpointing.split_tensors(loaded)
        if set(read_back) != set(tensors) or not all(torch.equal(read_back[k], tensors[k]) for k in tensors):
            raise SystemExit("the dcp checkpoint read back differs from the state saved")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"{args.preset} weights + AdamW moments: {len(tensors)} tensors, {gib:.2f} GiB; one process, "
        f"{args.threads} thread(s), load average {load:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| checkpoint format | training blocked (s) | committed after (s) |\n|---|---|---|")
    for mode, (blocked, committed) in results.items():
        print(f"| {mode} | {blocked:.2f} | {committed:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
