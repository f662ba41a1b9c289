"""Benchmark: the batched multi-codebook quantizer against a straightforward per-sub-codebook loop.

``python -m unitok.scripts.bench_quantizer [--threads 1] [--repeats 30]`` times a training step (forward with
losses and usage statistics, then backward) and a code-only encode at release shapes (batch 8, 256 positions,
D=64, K=8, V=4096) for both implementations, interleaved in one run so that CPU contention hits both alike,
checks that they give identical codes, and prints a markdown table of median ms/iter and the speedup. A third
case times the code search alone, to show where the speedup comes from.

:class:`LoopMultiCodebookQuantizer` is the reference implementation the tests compare against: an
``nn.ModuleList`` of K independent quantizers, one matmul + argmax per sub-codebook, like the release. Its state
dict has the release key layout natively, so it loads the batched quantizer's state dict strictly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unitok.tokenizer.quantizer import MultiCodebookQuantizer, QuantizerOutput, nearest_codes


class LoopSubQuantizer(nn.Module):
    """One sub-codebook, written plainly: ``codebook`` Embedding [V, d] (normalised on use), ``vocab_usage`` [V]."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float, entropy_temperature: float) -> None:
        super().__init__()
        self.beta = beta
        self.entropy_temperature = entropy_temperature
        self.register_buffer("vocab_usage", torch.zeros(codebook_size))
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.num_updates = 0

    def codes(self, z_Nd: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` -> ``[N]`` index of the most cosine-similar codebook row."""
        z_Nd = F.normalize(z_Nd.float(), dim=-1)
        codebook_Vd = F.normalize(self.codebook.weight.float(), dim=1)
        return torch.argmax(z_Nd @ codebook_Vd.T, dim=1)

    def forward(self, z_Nd: torch.Tensor, entropy_weight: float):
        """``[N, d]`` -> (straight-through ``[N, d]``, codes ``[N]``, vq loss, entropy loss, usage %, perplexity)."""
        z_Nd = F.normalize(z_Nd.float(), dim=-1)
        codebook_Vd = F.normalize(self.codebook.weight.float(), dim=1)
        codes_N = torch.argmax(z_Nd.detach() @ codebook_Vd.T, dim=1)
        q_Nd = F.embedding(codes_N, codebook_Vd)
        loss = self.beta * F.mse_loss(z_Nd, q_Nd.detach()) + F.mse_loss(q_Nd, z_Nd.detach())
        entropy = z_Nd.new_zeros(())
        if entropy_weight > 0:
            sq_dist_NV = (
                z_Nd.square().sum(1, keepdim=True)
                + codebook_Vd.square().sum(1)[None]
                - 2 * z_Nd @ codebook_Vd.T
            )
            logits_NV = -sq_dist_NV / self.entropy_temperature
            probs_NV = logits_NV.softmax(-1)
            per_sample = (-probs_NV * logits_NV.log_softmax(-1)).sum(-1).mean()
            mean_probs_V = probs_NV.mean(0)
            entropy = per_sample + (mean_probs_V * torch.log(mean_probs_V + 1e-7)).sum()
        straight_through = z_Nd + (q_Nd - z_Nd).detach()
        with torch.no_grad():
            probs_V = codes_N.bincount(minlength=self.vocab_usage.numel()).float()
            probs_V /= probs_V.sum()
            usage = (probs_V > 0.01 / probs_V.numel()).float().mean() * 100
            nonzero = probs_V[probs_V > 0]
            perplexity = torch.exp(-(nonzero * nonzero.log()).sum())
            if self.training:
                if self.num_updates == 0:
                    self.vocab_usage.copy_(probs_V)
                else:
                    momentum = 0.9 if self.num_updates < 100 else 0.99
                    self.vocab_usage.mul_(momentum).add_(probs_V, alpha=1 - momentum)
                self.num_updates += 1
        return straight_through, codes_N, loss, entropy, usage, perplexity


class LoopMultiCodebookQuantizer(nn.Module):
    """Reference multi-codebook quantizer: a Python loop over K :class:`LoopSubQuantizer` (release layout)."""

    def __init__(
        self,
        num_codebooks: int = 8,
        codebook_size: int = 4096,
        code_dim: int = 8,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        self.code_dim = code_dim
        self.entropy_weight = entropy_weight
        self.codebooks = nn.ModuleList(
            LoopSubQuantizer(codebook_size, code_dim, beta, entropy_temperature) for _ in range(num_codebooks)
        )

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., K*d]`` -> codes ``[..., K]``."""
        with torch.no_grad():
            chunks = z.split(self.code_dim, dim=-1)
            return torch.stack(
                [sub.codes(chunk.reshape(-1, self.code_dim)) for sub, chunk in zip(self.codebooks, chunks)],
                dim=-1,
            ).view(*z.shape[:-1], len(self.codebooks))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """``z [..., K*d]`` -> :class:`QuantizerOutput` (same meaning as the batched quantizer's)."""
        outputs = [
            sub(chunk.reshape(-1, self.code_dim), self.entropy_weight)
            for sub, chunk in zip(self.codebooks, z.split(self.code_dim, dim=-1))
        ]
        quantized, codes, losses, entropies, usages, perplexities = zip(*outputs)
        count = len(self.codebooks)
        return QuantizerOutput(
            quantized=torch.cat(quantized, dim=-1).view(z.shape),
            codes=torch.stack(codes, dim=-1).view(*z.shape[:-1], count),
            loss=sum(losses) / count,
            entropy_loss=self.entropy_weight * sum(entropies) / count,
            usage=torch.stack(usages),
            perplexity=torch.stack(perplexities),
        )


def _train_step(quantizer: nn.Module, z: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """Forward with losses, backward of ``loss + <quantized, upstream>``; returns the codes."""
    quantizer.zero_grad(set_to_none=True)
    z = z.detach().requires_grad_(True)
    out = quantizer(z)
    (out.loss + out.entropy_loss + (out.quantized * upstream).sum()).backward()
    return out.codes


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="B (default 8)")
    parser.add_argument("--positions", type=int, default=256, help="L tokens per image (default 256 = 16x16)")
    parser.add_argument("--num-codebooks", type=int, default=8, help="K (default 8)")
    parser.add_argument(
        "--codebook-size", type=int, default=4096, help="V entries per sub-codebook (default 4096)"
    )
    parser.add_argument("--code-dim", type=int, default=8, help="d channels per sub-codebook (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per implementation")
    parser.add_argument("--repeats", type=int, default=30, help="timed iterations per implementation")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = dict(num_codebooks=args.num_codebooks, codebook_size=args.codebook_size, code_dim=args.code_dim)
    batched = MultiCodebookQuantizer(**sizes).train()
    loop = LoopMultiCodebookQuantizer(**sizes).train()
    loop.load_state_dict(batched.state_dict(), strict=True)
    z = torch.randn(args.batch, args.positions, args.num_codebooks * args.code_dim)
    upstream = torch.randn_like(z)

    # The search-only case separates the two ingredients: batching alone (one untiled bmm) versus the
    # library's tiled search with the blocked argmax (nearest_codes).
    z_KNd = F.normalize(rearrange(z, "b l (k d) -> k (b l) d", k=args.num_codebooks), dim=-1)
    codebook_KVd = F.normalize(batched.codebook.detach(), dim=-1)
    cases = {
        "train step (fwd+bwd)": {
            "loop": lambda: _train_step(loop, z, upstream),
            "batched": lambda: _train_step(batched, z, upstream),
        },
        "encode (codes only)": {"loop": lambda: loop.quantize(z), "batched": lambda: batched.quantize(z)},
        "code search only": {
            "loop": lambda: torch.stack(
                [(z_Nd @ w_Vd.T).argmax(-1) for z_Nd, w_Vd in zip(z_KNd, codebook_KVd)]
            ),
            "one bmm + argmax": lambda: torch.bmm(z_KNd, codebook_KVd.transpose(1, 2)).argmax(-1),
            "batched": lambda: nearest_codes(z_KNd, codebook_KVd),
        },
    }
    times = {case: {name: [] for name in impls} for case, impls in cases.items()}
    for case, impls in cases.items():
        names = list(impls)
        for _ in range(args.warmup):
            for fn in impls.values():
                fn()
        for repeat in range(args.repeats):
            # Rotate which implementation goes first so that none always runs on a warmer cache.
            shift = repeat % len(names)
            codes = {}
            for name in names[shift:] + names[:shift]:
                elapsed, codes[name] = _timed(impls[name])
                times[case][name].append(elapsed)
            for name in names[1:]:
                if not torch.equal(codes[name], codes["loop"]):
                    mismatched = (codes[name] != codes["loop"]).sum().item()
                    print(
                        f"ERROR: {case}: {name} and loop codes differ at {mismatched} positions",
                        file=sys.stderr,
                    )
                    return 1

    shape = f"B={args.batch}, L={args.positions}, K={args.num_codebooks}, V={args.codebook_size}, d={args.code_dim}"
    print(f"Quantizer benchmark ({shape}; torch {torch.__version__}, {args.threads} thread(s), CPU;")
    print(
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up; codes identical: yes)\n"
    )
    print("| case | implementation | median ms/iter | min ms | max ms | speedup vs loop |")
    print("|---|---|---:|---:|---:|---:|")
    for case, per_impl in times.items():
        loop_median = statistics.median(per_impl["loop"])
        for name, values in per_impl.items():
            median = statistics.median(values)
            print(
                f"| {case} | {name} | {median:.1f} | {min(values):.1f} | {max(values):.1f} | "
                f"{loop_median / median:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
