"""Benchmark the released UniTok MLLM architecture (``unitok-mllm-7b``): parameters and FLOPs per image position.

    unitok bench mllm-release [--prompt-tokens 32] [--positions 0 128 255] [--tiny-timing]

Everything at 7B is built on the meta device (no weights, no memory) and measured there: parameter counts of the
LLM, the causal attention merger and the Llama-layer depth head (next to the ``llama2-7b`` preset's per-position
projector and small depth head), and the forward FLOPs of generating one image position for one row, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the model's own code path, at several positions of a 256-position
image after a prompt: one cached LLM step, the merger (its cache vs re-embedding the image so far, which a correct
cache-less implementation needs) and the depth head (its KV cache vs recomputing its prefix at every sub-code, as
the reference does). Guidance doubles every row. ``--tiny-timing`` also times cached vs uncached generation of a
tiny random model of this architecture on the CPU. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_meta_parts():
    """The 7B release's LLM, merger and depth head (and the llama2-7b preset's projector and head) on meta."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from unitok.mllm import CausalAttnMerger, DepthHead, LlamaDepthHead, MLLMConfig, VisualProjector

    cfg = MLLMConfig.preset("unitok-mllm-7b")
    ours = MLLMConfig.preset("llama2-7b")
    k, v, d = 8, 4096, 64
    llama = LlamaConfig(**cfg.llm, vocab_size=32000)
    llama._attn_implementation = "sdpa"
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llama)
        merger = CausalAttnMerger(
            k, v, d // k, llama.hidden_size, cfg.projector_attn_width, cfg.projector_attn_heads
        )
        head = LlamaDepthHead(llm.config, k, v, layers=cfg.depth_layers)
        projector = VisualProjector(d, llama.hidden_size, ours.projector_hidden)
        small_head = DepthHead(
            llama.hidden_size,
            k,
            v,
            ours.depth_width,
            ours.depth_layers,
            ours.depth_heads,
            ours.depth_mlp_ratio,
        )
    return llm, merger, head, projector, small_head


def parameter_rows(llm, merger, head, projector, small_head) -> list[tuple[str, int]]:
    trainable_merger = sum(p.numel() for n, p in merger.named_parameters() if not n.startswith("quantizer."))
    return [
        ("Llama-2-7B LLM (vocab 32000, not extended)", _count(llm)),
        (
            "causal attention merger, trainable (attn projection 64->1024 + mm_projector 1024->4096->4096)",
            trainable_merger,
        ),
        ("causal attention merger, frozen codebooks (8 x 4096 x 8)", _count(merger) - trainable_merger),
        ("Llama-layer depth head (3 layers, norm, shared 4096-way head, 7 code embeddings)", _count(head)),
        ("unitok-mllm-7b total (without the UniTok)", _count(llm) + _count(merger) + _count(head)),
        ("llama2-7b preset: per-position projector", _count(projector)),
        ("llama2-7b preset: depth head (4 layers of width 1024)", _count(small_head)),
    ]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _pick(_k: int, logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


@torch.no_grad()
def position_flops(llm, merger, head, context: int, i: int) -> list[tuple[str, int]]:
    """(part, forward FLOPs) of one row generating image position ``i`` with ``context`` positions cached."""
    from transformers import DynamicCache

    from unitok.mllm.model import _cache_kwarg
    from unitok.mllm.projector import MergerCache

    decoder = llm.get_decoder()
    kwarg = _cache_kwarg(decoder)
    hidden, width = llm.config.hidden_size, merger.quantizer.latent_dim
    with torch.device("meta"):
        cache = DynamicCache()
        decoder(inputs_embeds=torch.zeros(1, context, hidden), use_cache=True, **{kwarg: cache})
        vecs = torch.zeros(1, i + 1, width)
        merger_cache = MergerCache()
        if i:
            merger.project_step(vecs[:, :i], merger_cache)
        h = torch.zeros(1, hidden)
        step = torch.zeros(1, 1, hidden)
        return [
            (
                f"LLM step, KV cache of {context} positions",
                _flops(lambda: decoder(inputs_embeds=step, use_cache=True, **{kwarg: cache})),
            ),
            ("merger step with its cache", _flops(lambda: merger.project_step(vecs[:, i:], merger_cache))),
            (
                f"merger re-embedding the image so far ({i + 1} positions)",
                _flops(lambda: merger.project(vecs)),
            ),
            (
                "depth head, 8 sub-codes with its KV cache",
                _flops(lambda: head.sample(h, _pick, use_cache=True)),
            ),
            (
                "depth head, prefix recomputed per sub-code",
                _flops(lambda: head.sample(h, _pick, use_cache=False)),
            ),
        ]


def flop_rows(llm, merger, head, prompt_tokens: int, positions: list[int]) -> list[tuple[int, str, int]]:
    """(position, part, forward FLOPs) for one row generating each image position after the prompt."""
    return [
        (i, name, flops)
        for i in positions
        for name, flops in position_flops(llm, merger, head, prompt_tokens + i, i)
    ]


def tiny_timing(grid: tuple[int, int], batch: int) -> list[tuple[str, float]]:
    """Wall seconds of cached vs uncached greedy generation (CFG 3) with a tiny random model of the release."""
    from unitok.mllm import MLLMConfig, UniTokMLLM, build_tiny_tokenizer
    from unitok.mllm.generation import generate_image_codes
    from unitok.tokenizer import TokenizerConfig, UniTok

    torch.manual_seed(0)
    unitok = UniTok(TokenizerConfig.preset("unitok-tiny")).eval()
    tok = build_tiny_tokenizer(["a red blue circle square on the left right"])
    tok.add_tokens(["<0x00>", "<0x01>"], special_tokens=True)
    llm = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    config = MLLMConfig.preset(
        "unitok-mllm-7b",
        llm=llm,
        unitok=None,
        unitok_preset="unitok-tiny",
        text_tokenizer="builtin:tiny",
        llm_dtype="float32",
        projector_attn_width=128,
        projector_attn_heads=4,
        depth_layers=2,
    )
    model = UniTokMLLM.from_config(config, unitok=unitok, text_tokenizer=tok).eval()
    prompts = ["a red circle on the left", "a blue square on the right"] * (batch // 2)
    out = []
    for name, cached in (
        ("all caches (LLM, merger, depth head)", True),
        ("no cache (recompute everything)", False),
    ):
        start = time.perf_counter()
        generate_image_codes(
            model, prompts, grid, cfg_scale=3.0, temperature=0.0, use_cache=cached, depth_cache=cached
        )
        out.append((name, time.perf_counter() - start))
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length before the image")
    parser.add_argument(
        "--positions", type=int, nargs="+", default=[0, 128, 255], help="image positions (0-255)"
    )
    parser.add_argument("--tiny-timing", action="store_true", help="also time a tiny random model on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny timing)")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or any(not 0 <= p < 256 for p in args.positions):
        parser.error("--prompt-tokens must be >= 1 and --positions in [0, 255]")
    torch.set_num_threads(args.threads)

    parts = build_meta_parts()
    print("\n| unitok-mllm-7b part | parameters |")
    print("|---|---|")
    for name, count in parameter_rows(*parts):
        print(f"| {name} | {count:,} ({count / 1e9:.3f} B) |")

    print(
        f"\nForward FLOPs to generate one image position for one row (x2 with guidance), prompt of "
        f"{args.prompt_tokens} tokens, counted with FlopCounterMode on the meta device:\n"
    )
    print("| image position | part | GFLOPs |")
    print("|---|---|---|")
    rows = flop_rows(*parts[:3], args.prompt_tokens, args.positions)
    for position, name, flops in rows:
        print(f"| {position} | {name} | {flops / 1e9:.3f} |")
    for position in args.positions:
        part = {name: f for p, name, f in rows if p == position}
        llm = next(f for name, f in part.items() if name.startswith("LLM"))
        fast = llm + part["merger step with its cache"] + part["depth head, 8 sub-codes with its KV cache"]
        slow = llm + next(f for n, f in part.items() if n.startswith("merger re-embedding"))
        slow += part["depth head, prefix recomputed per sub-code"]
        print(
            f"| {position} | **total: all caches / merger re-embedded + head recomputed** | "
            f"**{fast / 1e9:.3f} / {slow / 1e9:.3f}** |"
        )

    if args.tiny_timing:
        grid = (8, 8)
        print(
            f"\nTiny random model of the release architecture, {grid[0]}x{grid[1]} positions, 4 prompts, CFG 3, CPU:\n"
        )
        print("| mode | wall s |")
        print("|---|---|")
        for name, seconds in tiny_timing(grid, 4):
            print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
