"""Benchmark the UniTok tokenizer on this machine's CPU and print markdown tables.

    python -m unitok.scripts.bench_tokenizer [--presets unitok-tiny unitok-base] [--batch 4] [--iters 3]

Each preset runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own.
Measured per preset at its ``image_size``: encode (image -> codes) and decode (codes -> image) throughput
in images/s (best of ``--iters`` calls) under ``torch.inference_mode`` in eval mode, optionally a training
step (forward + backward of a simple loss), and peak RSS. Parameter counts per part come from
``unitok-large`` built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from unitok.tokenizer import TokenizerConfig, UniTok

PARTS = ("encoder", "quant_proj", "quantizer", "post_quant_proj", "decoder", "text_encoder")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rate(fn, batch: int, iters: int) -> float:
    """Images/s of the fastest of ``iters`` timed calls after one warm-up call.

    The best call, not the mean, because the machine's cores are shared and other work only adds delay.
    """
    fn()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return batch / best


def measure(preset: str, batch: int, iters: int, train: bool) -> dict:
    """Throughput and memory of one preset (meant to run alone in a fresh process)."""
    rss_start = _rss_mib()
    torch.manual_seed(0)
    config = TokenizerConfig.preset(preset)
    model = UniTok(config).eval()
    img = torch.rand(batch, 3, config.image_size, config.image_size) * 2 - 1
    with torch.inference_mode():
        codes = model.encode(img)
        encode = _rate(lambda: model.encode(img), batch, iters)
        decode = _rate(lambda: model.decode(codes), batch, iters)
    result = {
        "preset": preset,
        "image_size": config.image_size,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "encode_img_s": encode,
        "decode_img_s": decode,
        "train_img_s": None,
        "rss_start_MiB": rss_start,
    }
    if train:
        model.train()
        texts = ["a photo of a shape"] * batch

        def step() -> None:
            out = model(img, texts)
            (out.recon.square().mean() + out.vq_loss + out.image_features.sum()).backward()
            model.zero_grad(set_to_none=True)

        result["train_img_s"] = _rate(step, batch, iters)
    result["peak_rss_MiB"] = _rss_mib()
    return result


def parameter_table(preset: str = "unitok-large") -> list[tuple[str, float]]:
    """(part, millions of parameters) for ``preset`` built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = UniTok(TokenizerConfig.preset(preset))
    rows = [(name, sum(p.numel() for p in getattr(model, name).parameters()) / 1e6) for name in PARTS]
    head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in PARTS) / 1e6
    rows.append(("fc_norm + projection + logit_scale", head))
    rows.append(("total", sum(p.numel() for p in model.parameters()) / 1e6))
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: list[dict], params: list[tuple[str, float]]) -> str:
    lines = [
        "| preset | px | batch | threads | params (M) | encode img/s | decode img/s | train step img/s | peak RSS (MiB) | RSS after imports (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['threads']} | {r['params_M']:.1f} "
            f"| {_fmt(r['encode_img_s'])} | {_fmt(r['decode_img_s'])} | {_fmt(r['train_img_s'])} "
            f"| {r['peak_rss_MiB']:.0f} | {r['rss_start_MiB']:.0f} |"
        )
    lines += ["", "| unitok-large part (meta device) | params (M) |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in params]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["unitok-tiny", "unitok-base"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--train-presets", nargs="*", default=["unitok-tiny"], help="presets that also time a training step"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.worker, args.batch, args.iters, args.worker in args.train_presets)))
        return 0
    results = []
    for preset in args.presets:
        command = [
            sys.executable,
            "-m",
            "unitok.scripts.bench_tokenizer",
            "--worker",
            preset,
            "--batch",
            str(args.batch),
            "--iters",
            str(args.iters),
            "--threads",
            str(args.threads),
            "--train-presets",
            *args.train_presets,
        ]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(markdown(results, parameter_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
