"""Benchmark of code extraction and of the MLLM data path.

``unitok bench extract [--num-images 512] [--tokenizer DIR] [--batch-size 64] [--workers 2]`` writes a synthetic
world (or reads ``--data``), extracts its codes with ``unitok-tiny`` (random init unless ``--tokenizer``) on the
CPU, and reports images/s of extraction, the store's bytes per image (all columns, and the codes alone), and the
padding fraction of mixed understanding + generation batches of the tiny MLLM with and without length grouping.
Prints a markdown table. The machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unitok.data.codes import CodeStore, store_summary
from unitok.data.extract import extract_codes
from unitok.data.mllm_data import MixtureDataset, MixtureSampler, conversation_turns, padding_fraction


def _padding(store_dir: Path, batch_size: int) -> tuple[float, float, int]:
    """Padding fraction of batches without and with length grouping, on the tiny MLLM's sequences."""
    import json

    from unitok.mllm import MLLMConfig, SequenceBuilder
    from unitok.mllm.text_tokenizer import add_image_tokens, build_tiny_tokenizer

    store = CodeStore(store_dir)
    corpus = [c for c in store.texts("caption", range(len(store))) if c]
    for raw in store.texts("conversations", range(len(store))):
        corpus += [t for turn in conversation_turns(json.loads(raw)) or [] for t in turn] if raw else []
    config = MLLMConfig.preset("tiny")
    tokenizer = build_tiny_tokenizer([config.prompt_template, *corpus])
    ids = add_image_tokens(tokenizer, config.boi_token, config.eoi_token, config.image_token)
    builder = SequenceBuilder(tokenizer, config, ids, store.num_codebooks, store.codebook_size)
    data = MixtureDataset(builder, [store_dir])
    mixture = {"understanding": 1.0, "generation": 1.0}
    lengths = data.lengths()
    out = []
    for grouped in (False, True):
        sampler = MixtureSampler(data, mixture, seed=0, batch_size=batch_size, group_by_length=grouped)
        out.append(padding_fraction(lengths[np.asarray(list(sampler)) % data.total], batch_size))
    return out[0], out[1], len(data)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    p = argparse.ArgumentParser(prog=prog or "unitok bench extract", description=__doc__.splitlines()[0])
    p.add_argument(
        "--num-images", type=int, default=512, help="synthetic-world images (train split) to extract"
    )
    p.add_argument("--data", default=None, help="extract this input instead of a fresh synthetic world")
    p.add_argument("--tokenizer", default=None, help="UniTok checkpoint (default: a random-init unitok-tiny)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--pad-batch-size", type=int, default=16, help="batch size of the padding measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from unitok.tokenizer import TokenizerConfig, UniTok

            torch.manual_seed(0)
            tokenizer = str(tmp / "unitok-tiny")
            UniTok(TokenizerConfig.preset("unitok-tiny")).save_pretrained(tokenizer)
        data = args.data
        if data is None:
            from unitok.data.synth import SynthConfig, generate_world

            data = str(tmp / "world")
            n = round(args.num_images / 0.9) + 1
            generate_world(
                data, SynthConfig(num_images=n, classify_per_class=0, geneval_per_tag={}), workers=1
            )
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = extract_codes(
            tokenizer,
            data,
            tmp / "store",
            batch_size=args.batch_size,
            num_workers=args.workers,
            device="cpu",
            progress=False,
        )
        seconds = time.perf_counter() - started
        summary = store_summary(tmp / "store")
        store = CodeStore(tmp / "store")
        code_bytes = int(store.grid_positions.mean()) * store.num_codebooks * 2
        before, after, samples = _padding(tmp / "store", args.pad_batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = summary["rows"]
    print(f"load average before the run: {load:.1f}; torch threads {torch.get_num_threads()}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| images extracted (unitok-tiny, 64 px, CPU, batch {args.batch_size}) | {rows} |")
    print(f"| extraction throughput (decode + encode + write) | {result['images'] / seconds:.1f} images/s |")
    print(f"| store size | {summary['bytes'] / rows:.0f} bytes/image (all columns) |")
    print(f"| codes alone (h*w*K uint16) | {code_bytes} bytes/image |")
    print(
        f"| padding of batches of {args.pad_batch_size}, understanding + generation ({samples} samples) | "
        f"{before:.1%} without grouping, {after:.1%} with length grouping |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
