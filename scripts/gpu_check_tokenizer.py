"""UniTok training-step throughput on a GPU at bf16, before and after the efficiency changes, in one run.

    unitok bench gpu-tokenizer [--preset unitok-large] [--batch 32] [--steps 10] [--modes before after]
        [--checkpoint-parts none gpu-80gb] [--lpips]

One step = forward under bf16 autocast (images + text ids) + ``L1 + MSE (+ LPIPS) + VQ + CLIP`` + backward
+ the trainer's engine step (``TorchEngine``: gradient clipping, AdamW, a non-finite step skipped), on random
images and ids (the speed does not depend on the values). Reported per configuration: images/s (median of
``--steps`` timed steps after 3 warm-ups, ``torch.cuda.synchronize`` around each), peak allocated memory,
and the host-device syncs of one step as counted by ``torch.cuda.set_sync_debug_mode("warn")``. Modes:
``before`` = literal nearest-x2 + 3x3 conv upsampler, ``bincount`` usage counts, per-tensor AdamW (the
engine reads the gradient norm on the host to skip a non-finite step); ``after`` = today's defaults
(transposed-conv upsampler, scatter-add counts, fused AdamW skipping on the device) plus channels_last;
``fast`` = ``after`` plus the opt-in options: the transformer blocks compiled (``train.compile``) and, with
``--lpips``, the VGG trunk in bf16 and channels_last (``loss.lpips_precision``, ``loss.lpips_channels_last``).
Needs a CUDA device; exits with status 2 without one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from unitok.scripts.bench_train_step import before_changes
from unitok.tokenizer import TokenizerConfig, UniTok
from unitok.tokenizer.config import CHECKPOINT_PRESETS
from unitok.tokenizer.losses import LPIPS, ClipLoss
from unitok.tokenizer.train import compile_blocks
from unitok.tokenizer.training.distributed import DistInfo, TorchEngine
from unitok.tokenizer.training.optim import build_adamw, build_scheduler

# model: TokenizerConfig fields; fused: AdamW's fused kernel; lpips: LPIPS options; compile: compile_blocks.
MODES = {
    "before": dict(
        model=dict(upsample="nearest_conv", channels_last=False), fused=False, lpips={}, compile=False
    ),
    "after": dict(model=dict(upsample="transposed", channels_last=True), fused=True, lpips={}, compile=False),
    "fast": dict(
        model=dict(upsample="transposed", channels_last=True),
        fused=True,
        lpips=dict(precision="bf16", channels_last=True),
        compile=True,
    ),
}


def _step(model, engine, clip_loss, lpips, img, ids) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(img, ids)
    recon = out.recon.float()
    loss = F.l1_loss(recon, img) * 0.2 + F.mse_loss(recon, img) + out.vq_loss
    if lpips is not None:
        loss = loss + lpips(recon, img)
    loss = loss + clip_loss(out.image_features.float(), out.text_features.float(), out.logit_scale)
    engine.backward(loss)
    engine.step()


def _count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(preset: str, mode: str, parts: str, batch: int, steps: int, use_lpips: bool) -> dict:
    torch.manual_seed(0)
    options = MODES[mode]
    config = TokenizerConfig.preset(preset, checkpoint_parts=parts, **options["model"])
    device = torch.device("cuda")
    model = UniTok(config).to(device).train()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options["compile"]:
        compile_blocks(model)
    optimizer = build_adamw(model, 1e-4, (0.9, 0.95), 0.02, 1e-6, fused=options["fused"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, owns_group=False)
    engine = TorchEngine(model, optimizer, build_scheduler(optimizer, lambda step: 1.0), info, grad_clip=10.0)
    clip_loss = ClipLoss(0, 1)
    lpips = LPIPS(pretrained=False, **options["lpips"]).to(device) if use_lpips else None
    img = torch.rand(batch, 3, config.image_size, config.image_size, device=device) * 2 - 1
    ids = torch.randint(1, 49407, (batch, config.text_context_length), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    with before_changes(mode == "before"):
        for _ in range(3):
            _step(model, engine, clip_loss, lpips, img, ids)
        syncs = _count_syncs(lambda: _step(model, engine, clip_loss, lpips, img, ids))
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            _step(model, engine, clip_loss, lpips, img, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    result = {
        "mode": mode,
        "checkpoint_parts": parts,
        "batch": batch,
        "img_per_s": batch / statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "syncs_per_step": syncs,
    }
    return result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="unitok-large")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["before", "after", "fast"])
    parser.add_argument("--checkpoint-parts", nargs="+", choices=sorted(CHECKPOINT_PRESETS), default=["none"])
    parser.add_argument("--lpips", action="store_true", help="add LPIPS (random VGG weights, same cost)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script measures GPU throughput; run it on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.preset}, bf16 autocast\n")
    print(
        "| mode | checkpointed parts | batch | img/s | peak GiB | syncs / step |\n|---|---|---:|---:|---:|---:|"
    )
    for parts in args.checkpoint_parts:
        for mode in args.modes:
            try:
                row = measure(args.preset, mode, parts, args.batch, args.steps, args.lpips)
            except torch.OutOfMemoryError:
                print(f"| {mode} | {parts} | {args.batch} | out of memory | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            torch.cuda.empty_cache()
            print(
                f"| {row['mode']} | {parts} | {row['batch']} | {row['img_per_s']:.1f} | {row['peak_gib']:.1f} "
                f"| {row['syncs_per_step']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
