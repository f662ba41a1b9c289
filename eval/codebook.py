"""Codebook usage and perplexity over a whole evaluation set, per sub-codebook.

Shape legend: K sub-codebooks, V entries per sub-codebook.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CodebookStats:
    """Accumulates how often each entry of each sub-codebook is used.

    ``usage`` is the percentage of the V entries of each sub-codebook hit at least once; ``perplexity``
    is ``exp(entropy)`` of each sub-codebook's empirical code distribution (V when uniform, 1 when a
    single entry is used). Unlike the per-batch figures of the training forward, these are over
    everything passed to :meth:`update`.

    Args:
        num_codebooks: K.
        codebook_size: V, entries per sub-codebook.
    """

    def __init__(self, num_codebooks: int, codebook_size: int):
        if num_codebooks < 1 or codebook_size < 1:
            raise ValueError(
                f"expected num_codebooks >= 1 and codebook_size >= 1, got {num_codebooks}, {codebook_size}"
            )
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.counts_KV = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64)

    def update(self, codes: torch.Tensor) -> None:
        """Count a batch of codes [..., K] (integers in [0, V))."""
        if codes.ndim < 1 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"expected codes of shape [..., K={self.num_codebooks}], got {list(codes.shape)}"
            )
        codes_NK = codes.detach().reshape(-1, self.num_codebooks).to(device="cpu", dtype=torch.int64)
        if codes_NK.numel() and (codes_NK.min() < 0 or codes_NK.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got range [{codes_NK.min()}, {codes_NK.max()}]"
            )
        # Offset each sub-codebook into its own block so one bincount counts all K at once.
        offsets = torch.arange(self.num_codebooks) * self.codebook_size
        flat = (codes_NK + offsets).flatten()
        self.counts_KV += torch.bincount(flat, minlength=self.counts_KV.numel()).view_as(self.counts_KV)

    @property
    def total(self) -> int:
        """Number of code vectors counted (positions x images)."""
        return int(self.counts_KV[0].sum())

    @property
    def usage(self) -> torch.Tensor:
        """[K] percentage of entries used at least once."""
        return (self.counts_KV > 0).double().mean(dim=1) * 100.0

    @property
    def perplexity(self) -> torch.Tensor:
        """[K] exp(entropy) of each sub-codebook's code distribution (nats)."""
        if self.total == 0:
            raise ValueError("CodebookStats.perplexity needs at least one update() with codes")
        probs = self.counts_KV.double() / self.total
        entropy = -torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(dim=1)
        return entropy.exp()

    def summary(self) -> dict:
        """JSON-ready dict: per-sub-codebook usage % and perplexity, and their means."""
        usage, perplexity = self.usage, self.perplexity
        return {
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "num_codes": self.total,
            "usage_percent": [round(float(u), 4) for u in usage],
            "usage_percent_mean": float(usage.mean()),
            "perplexity": [round(float(p), 4) for p in perplexity],
            "perplexity_mean": float(perplexity.mean()),
        }


def codebook_stats(codes_iter: Iterable[torch.Tensor], codebook_size: int) -> dict:
    """Usage % and perplexity per sub-codebook over a stream of code batches [..., K].

    Args:
        codes_iter: iterable of LongTensors [..., K] (e.g. ``tok.encode`` outputs [B,h,w,K]).
        codebook_size: V, entries per sub-codebook.

    Returns:
        :meth:`CodebookStats.summary` of all batches.
    """
    stats = None
    for codes in codes_iter:
        if stats is None:
            stats = CodebookStats(codes.shape[-1], codebook_size)
        stats.update(codes)
    if stats is None:
        raise ValueError("codebook_stats got no code batches")
    return stats.summary()
