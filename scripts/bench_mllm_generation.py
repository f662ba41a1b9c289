"""Benchmark MLLM image generation: LLM KV cache vs recomputing the whole prefix at every position.

    python -m unitok.scripts.bench_mllm_generation [--batch 4 16] [--image-size 256] [--threads 1]

Times code generation only (no UniTok decoding) of the random-init ``tiny`` preset on ``unitok-tiny`` codes at
``--image-size`` pixels (256 px -> a 16x16 grid = 256 positions, K=8 sub-codes each), in one run, for:
the sync-free loop (``fast=True``), LLM cache + depth-head cache (the default), LLM cache + depth-head
recompute, and full recompute (the reference path). Also counts ATen ops and host reads (device syncs on a GPU)
per generated position of the eager and the sync-free loop. Also prints the parameter counts of the projector and depth head of the ``llama2-7b`` preset,
built on the meta device (no weights needed), next to the reference UniTok-MLLM head. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from torch import nn


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts() -> list[tuple[str, int]]:
    """Parameter counts of the llama2-7b preset's parts and of the reference head, built on the meta device."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    from unitok.mllm import DepthHead, MLLMConfig, VisualProjector
    from unitok.tokenizer import TokenizerConfig

    cfg = MLLMConfig.preset("llama2-7b")
    tok = TokenizerConfig.preset("unitok-large")
    llama = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    )
    hidden, k, v = llama.hidden_size, tok.num_codebooks, tok.codebook_size
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llama)
        projector = VisualProjector(tok.vocab_width, hidden, cfg.projector_hidden)
        head = DepthHead(
            hidden, k, v, cfg.depth_width, cfg.depth_layers, cfg.depth_heads, cfg.depth_mlp_ratio
        )
        # The reference UniTok-MLLM head: 3 full-width Llama layers, a norm, one shared 4096-way classifier and
        # K-1 code embedding tables of the LLM width.
        reference = nn.ModuleList(
            [
                *(LlamaDecoderLayer(llama, layer_idx=i) for i in range(3)),
                LlamaRMSNorm(hidden),
                nn.Linear(hidden, v),
                *(nn.Embedding(v, hidden) for _ in range(k - 1)),
            ]
        )
    return [
        ("Llama-2-7B LLM (vocab 32000)", _count(llm)),
        (f"projector (LN, {tok.vocab_width}->{hidden}, GELU, {hidden}->{hidden})", _count(projector)),
        (
            f"depth head ({cfg.depth_layers} layers, width {cfg.depth_width}, {cfg.depth_heads} heads, "
            f"in-proj {hidden}->{cfg.depth_width}, {k} classifiers x {v})",
            _count(head),
        ),
        ("reference UniTok-MLLM AR head (3 Llama-7B layers)", _count(reference)),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(
    model, prompts, grid, use_cache: bool, depth_cache: bool, repeats: int, fast: bool = False
) -> tuple[float, float, int]:
    """Best wall time (s) and process CPU time (s) over ``repeats`` runs of greedy code generation with CFG,
    and peak CUDA bytes (0 on CPU)."""
    from unitok.mllm.generation import generate_image_codes

    device = model.device
    best, best_cpu, peak = float("inf"), float("inf"), 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        generate_image_codes(
            model,
            prompts,
            grid,
            cfg_scale=3.0,
            temperature=0.0,
            use_cache=use_cache,
            depth_cache=depth_cache,
            fast=fast,
        )
        _sync(device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
    return best, best_cpu, peak


def ops_per_position(model, prompts, fast: bool) -> tuple[float, float]:
    """(ATen ops, host reads) per generated position, sampled (top-k 50, top-p 0.9, CFG 3): the difference
    between a 4x4 and a 2x2 grid divided by the 12 extra positions (the prompt's share cancels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from unitok.mllm.generation import generate_image_codes

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            # What .item() / int(tensor) / multinomial's checks run: a device -> host sync on a GPU.
            self.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    counts = []
    for grid in ((2, 2), (4, 4)):
        with Count() as counter:
            generate_image_codes(
                model,
                prompts,
                grid,
                cfg_scale=3.0,
                top_k=50,
                top_p=0.9,
                fast=fast,
                generator=torch.Generator(),
            )
        counts.append((counter.ops, counter.reads))
    return (counts[1][0] - counts[0][0]) / 12, (counts[1][1] - counts[0][1]) / 12


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[4, 16], help="prompts per batch (CFG doubles the LLM rows)"
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="pixels; the grid is image_size/16 per side"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; the best time is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-uncached", action="store_true", help="skip the slow full-recompute baseline")
    args = parser.parse_args(argv)

    from unitok.mllm import MLLMConfig, UniTokMLLM, build_tiny_tokenizer
    from unitok.tokenizer import TokenizerConfig, UniTok

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text_tokenizer = build_tiny_tokenizer(["USER: ASSISTANT: a red blue circle square on the left right"])
    unitok = UniTok(TokenizerConfig.preset("unitok-tiny"))
    model = UniTokMLLM.from_config(MLLMConfig.preset("tiny"), unitok=unitok, text_tokenizer=text_tokenizer)
    model = model.to(args.device).eval()
    grid = model.grid(args.image_size)
    positions = grid[0] * grid[1]
    captions = ["a red circle on the left", "a blue square on the right", "a red square", "a blue circle"]
    time_generation(model, captions, (2, 2), True, True, 1)  # warm-up

    modes = [
        ("LLM KV cache + depth-head KV cache, sync-free loop (fast=True)", True, True, True),
        ("LLM KV cache + depth-head KV cache", True, True, False),
        ("LLM KV cache + depth-head recompute", True, False, False),
    ]
    if not args.skip_uncached:
        modes.append(("recompute whole prefix (reference)", False, False, False))
    print(
        f"\nImage generation, tiny preset (Llama hidden 64, 2 layers; depth head 2 x width 64), random init, "
        f"unitok-tiny codes at {args.image_size} px = {grid[0]}x{grid[1]} = {positions} positions x "
        f"K={model.num_codebooks}; CFG 3.0 (2 LLM rows per prompt), greedy, codes only (no decoding); "
        f"device {args.device}, {args.threads} thread(s). Times: best of {args.repeats}; CPU = process time.\n"
    )
    print(
        "| batch | mode | wall s | CPU s | positions/s | images/s | speed-up (wall) | speed-up (CPU) | peak CUDA MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        prompts = [captions[i % len(captions)] for i in range(batch)]
        rows = [
            (name, *time_generation(model, prompts, grid, uc, dc, args.repeats, fast))
            for name, uc, dc, fast in modes
        ]
        base = rows[-1] if not args.skip_uncached else rows[1]  # today's default loop without the baseline
        base_wall, base_cpu = base[1], base[2]
        for name, wall, cpu, peak in rows:
            peak_text = f"{peak / 2**20:.1f}" if peak else "n/a (CPU)"
            print(
                f"| {batch} | {name} | {wall:.2f} | {cpu:.2f} | {batch * positions / wall:.1f} | {batch / wall:.3f} "
                f"| {base_wall / wall:.1f}x | {base_cpu / cpu:.1f}x | {peak_text} |"
            )
    print(
        "\n| loop (batch 4, sampled: top-k 50, top-p 0.9, CFG 3) | ATen ops / position | host reads / position |"
    )
    print("|---|---|---|")
    for name, fast in (("eager (default)", False), ("sync-free (fast=True)", True)):
        ops, reads = ops_per_position(model, captions, fast)
        print(f"| {name} | {ops:.0f} | {reads:.1f} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nPeak resident memory of the whole process (all modes): {rss:.0f} MiB\n")

    print("| llama2-7b preset part | parameters |")
    print("|---|---|")
    for name, count in parameter_counts():
        print(f"| {name} | {count:,} ({count / 1e6:.1f} M) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
