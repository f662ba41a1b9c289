"""Benchmark MLLM image generation: the eager loop, the sync-free static-cache loop and its compiled step.

    python -m unitok.scripts.bench_mllm_generation [--batch 4 16] [--image-size 256] [--threads 1] \
        [--compile inductor] [--skip-uncached]

Times code generation only (no UniTok decoding) of the random-init ``tiny`` preset on ``unitok-tiny`` codes at
``--image-size`` pixels (256 px -> a 16x16 grid = 256 positions, K=8 sub-codes each), sampled (top-k 50, top-p 0.9,
CFG 3, seeded), in one run, for: the eager loop (LLM ``DynamicCache`` + depth-head KV cache, the default), the same
with the depth head recomputed, full recompute (the reference path), the sync-free loop over a static KV cache
(``fast=True``) and, with ``--compile BACKEND``, that loop with its position step compiled
(``compile=BACKEND``; the compile is a warm-up run, not timed). For each mode it also counts ATen ops and host
reads (``aten::_local_scalar_dense``: a device sync on a GPU) per generated position with ``torch.profiler``, at
the first batch size.
Also prints the parameter counts of the projector and depth head of the ``llama2-7b`` preset, built on the meta
device (no weights needed), next to the reference UniTok-MLLM head. Prints markdown tables.
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


SAMPLING = dict(cfg_scale=3.0, top_k=50, top_p=0.9)


def _generate(model, prompts, grid, mode: dict, progress=None) -> torch.Tensor:
    from unitok.mllm.generation import generate_image_codes

    generator = torch.Generator(device=model.device).manual_seed(0)
    return generate_image_codes(
        model, prompts, grid, generator=generator, progress=progress, **SAMPLING, **mode
    )


def time_generation(model, prompts, grid, mode: dict, repeats: int) -> tuple[float, float, int, torch.Tensor]:
    """Best wall time (s) and process CPU time (s) over ``repeats`` runs of sampled code generation with CFG,
    peak CUDA bytes (0 on CPU), and the codes."""
    device = model.device
    best, best_cpu, peak = float("inf"), float("inf"), 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        codes = _generate(model, prompts, grid, mode)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
    return best, best_cpu, peak, codes


def ops_per_position(model, prompts, grid, mode: dict, positions: int = 16) -> tuple[float, float]:
    """(ATen ops, host reads) per generated position, from ``torch.profiler``: the ``aten::`` calls recorded
    between the first position's progress call and the one ``positions`` later (nested calls included), divided by
    ``positions`` (the prompt's share is left out). Host reads are ``aten::_local_scalar_dense`` calls (what
    ``.item()`` / ``int(tensor)`` / multinomial's checks run: a device sync on a GPU). A compiled step's fused
    kernels are not ATen calls; what it leaves to ATen (matmuls, for instance) is counted.
    """
    from torch.profiler import ProfilerActivity, profile

    positions = min(positions, grid[0] * grid[1] - 1)
    prof = profile(activities=[ProfilerActivity.CPU])

    def progress(done: int, _: int) -> None:
        if done == 1:
            prof.start()
        elif done == 1 + positions:
            prof.stop()

    _generate(model, prompts, grid, mode, progress)
    names = [event.name for event in prof.events()]
    ops = sum(name.startswith("aten::") for name in names)
    reads = names.count("aten::_local_scalar_dense")
    return ops / positions, reads / positions


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
    parser.add_argument(
        "--compile",
        metavar="BACKEND",
        help="also time the fast loop with its position step compiled by this torch.compile backend "
        "(inductor: the real thing, minutes to compile on a CPU; aot_eager: traced only)",
    )
    args = parser.parse_args(argv)

    from unitok.mllm import MLLMConfig, UniTokMLLM, build_tiny_tokenizer
    from unitok.mllm.generation import check_compile
    from unitok.tokenizer import TokenizerConfig, UniTok

    if args.compile is not None:
        try:
            check_compile(args.compile)
        except ValueError as err:
            parser.error(str(err))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text_tokenizer = build_tiny_tokenizer(["USER: ASSISTANT: a red blue circle square on the left right"])
    unitok = UniTok(TokenizerConfig.preset("unitok-tiny"))
    model = UniTokMLLM.from_config(MLLMConfig.preset("tiny"), unitok=unitok, text_tokenizer=text_tokenizer)
    model = model.to(args.device).eval()
    grid = model.grid(args.image_size)
    positions = grid[0] * grid[1]
    captions = ["a red circle on the left", "a blue square on the right", "a red square", "a blue circle"]
    _generate(model, captions, (2, 2), {})  # warm-up

    modes = [("eager: LLM DynamicCache + depth-head KV cache (default)", {})]
    modes.append(("eager: LLM DynamicCache + depth-head recompute", {"depth_cache": False}))
    if not args.skip_uncached:
        modes.append(
            ("eager: recompute whole prefix (reference)", {"use_cache": False, "depth_cache": False})
        )
    modes.append(("sync-free loop, static KV cache (`fast=True`)", {"fast": True}))
    if args.compile is not None:
        modes.append(
            (
                f"sync-free loop, static KV cache, compiled step (`compile={args.compile!r}`)",
                {"compile": args.compile},
            )
        )
    print(
        f"\nImage generation, tiny preset (Llama hidden 64, 2 layers; depth head 2 x width 64), random init, "
        f"unitok-tiny codes at {args.image_size} px = {grid[0]}x{grid[1]} = {positions} positions x "
        f"K={model.num_codebooks}; CFG 3.0 (2 LLM rows per prompt), top-k 50, top-p 0.9, codes only (no decoding); "
        f"device {args.device}, {args.threads} thread(s), torch {torch.__version__}. Times: best of {args.repeats}; "
        "CPU = process time; compiling is a warm-up run before the timed ones.\n"
    )
    print(
        "| batch | mode | wall s | CPU s | positions/s | speed-up (wall) | speed-up (CPU) | compile s | peak CUDA MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    counts, agreement = [], []
    for batch in args.batch:
        prompts = [captions[i % len(captions)] for i in range(batch)]
        rows = []
        for name, mode in modes:
            compile_s = None
            if "compile" in mode:
                start = time.perf_counter()
                _generate(model, prompts, grid, mode)
                compile_s = time.perf_counter() - start
            rows.append((name, compile_s, *time_generation(model, prompts, grid, mode, args.repeats)))
            if batch == args.batch[0]:
                counts.append((name, *ops_per_position(model, prompts, grid, mode)))
        base_wall, base_cpu = rows[0][2], rows[0][3]
        codes = {name: row[-1] for name, *row in rows}
        for name, compile_s, wall, cpu, peak, _ in rows:
            peak_text = f"{peak / 2**20:.1f}" if peak else "n/a (CPU)"
            compile_text = "" if compile_s is None else f"{compile_s:.0f}"
            print(
                f"| {batch} | {name} | {wall:.2f} | {cpu:.2f} | {batch * positions / wall:.1f} "
                f"| {base_wall / wall:.2f}x | {base_cpu / cpu:.2f}x | {compile_text} | {peak_text} |"
            )
        if args.compile is not None:
            # The same seed draws the same noise in both loops: equal codes up to the compiled kernels' rounding.
            same = (codes[modes[-1][0]] == codes[modes[-2][0]]).float().mean().item()
            agreement.append(f"batch {batch}: {100 * same:.1f} %")
    if agreement:
        print("\nCodes of the compiled step equal to the fast loop's (same seed): " + ", ".join(agreement))
    print(f"\n| mode (batch {args.batch[0]}) | ATen ops / position | host reads / position |")
    print("|---|---|---|")
    for name, ops, reads in counts:
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
