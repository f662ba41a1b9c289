"""Benchmark of the data part: synthetic-world generation, the object analyser, the readers.

``python -m unitok.scripts.bench_data [--num-images 20000] [--size 64] [--workers 2]`` generates a world
end to end (all formats, the default classification sets and GenEval prompts) into a temporary folder (or
``--out``), times it, then times ``detect_objects`` and measures its exact-match rate on fresh scenes at
64 and 256 px, and the read throughput of ``ImageTextWebDataset`` and ``ImageTextFolder`` through a
DataLoader. Prints a markdown table. The machine may be shared: the load average is printed, and the
CPU seconds of generation (all processes) divided by the workers give the wall time of an idle machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from unitok.data.datasets import ImageTextFolder, ImageTextWebDataset
from unitok.data.detect import detect_objects
from unitok.data.synth import SynthConfig, generate_world
from unitok.data.world import sample_scene


def _detect(size: int, n: int) -> tuple[float, float]:
    """(ms per image, exact-match rate of the (shape, colour) multiset)."""
    scenes = [sample_scene(np.random.default_rng([99, size, i]), size)[0] for i in range(n)]
    images = [s.render() for s in scenes]
    started = time.perf_counter()
    found = [detect_objects(im) for im in images]
    ms = 1000 * (time.perf_counter() - started) / n
    exact = np.mean(
        [
            sorted((d.shape, d.color) for d in f) == sorted((o.shape, o.color) for o in s.objects)
            for f, s in zip(found, scenes)
        ]
    )
    return ms, float(exact)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _read_rate(dataset, workers: int, batch_size: int = 256) -> tuple[float, int]:
    started = time.perf_counter()
    count = sum(len(batch[1]) for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers))
    return count / (time.perf_counter() - started), count


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog or "unitok bench data", description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--detect-images", type=int, default=500, help="scenes for the analyser at 64 px (a tenth at 256 px)"
    )
    p.add_argument("--out", default=None, help="keep the world here (default: a temporary folder, removed)")
    args = p.parse_args(argv)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        load_before = os.getloadavg()[0]
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        meta = generate_world(
            out, SynthConfig(num_images=args.num_images, size=args.size), workers=args.workers, overwrite=True
        )
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
        extra = sum(sum(v.values()) for v in meta["counts"]["classify"].values())
        det64 = _detect(64, args.detect_images)
        det256 = _detect(256, max(args.detect_images // 10, 1))
        shards = ImageTextWebDataset([str(out / s) for s in meta["files"]["shards"]["train"]])
        wds_rate, wds_count = _read_rate(shards, args.workers)
        folder_rate, folder_count = _read_rate(ImageTextFolder(out, "train"), args.workers)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)

    rows = [
        (
            f"generate world, {args.num_images} images at {args.size} px (+{extra} classification), {args.workers} workers",
            f"{seconds:.1f} s wall ({args.num_images / seconds:.0f} captioned images/s), {cpu:.1f} s CPU over all processes",
        ),
        (
            f"detect_objects at 64 px ({args.detect_images} scenes)",
            f"{det64[0]:.1f} ms/image, exact {100 * det64[1]:.1f}%",
        ),
        (
            f"detect_objects at 256 px ({max(args.detect_images // 10, 1)} scenes)",
            f"{det256[0]:.1f} ms/image, exact {100 * det256[1]:.1f}%",
        ),
        (
            f"ImageTextWebDataset read, {args.workers} workers ({wds_count} samples)",
            f"{wds_rate:.0f} images/s",
        ),
        (
            f"ImageTextFolder read, {args.workers} workers ({folder_count} samples)",
            f"{folder_rate:.0f} images/s",
        ),
    ]
    print(f"load average before the run: {load_before:.1f} on {os.cpu_count()} CPUs\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
