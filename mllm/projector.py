"""Visual input of the MLLM: the K code vectors of one position -> one LLM input embedding.

Shape legend: B batch, L positions, D UniTok latent width (K sub-codes concatenated), H LLM hidden size.

The default projector works per position: an input merger that attends across positions sees the whole image
prefix in training, so generating with it needs a cache of its own (the released model's causal attention
merger, :class:`CausalAttnMerger`, keeps one: :class:`MergerCache`). :class:`WindowProjector` reads a causal
window of the code grid (the position and its earlier neighbours in raster order), so it needs the code vectors
of the positions generated so far: :class:`WindowCache`, or :class:`StaticWindowCache` in the sync-free loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
    from unitok.mllm.config import MLLMConfig


class VisualProjector(nn.Module):
    """LayerNorm(D) -> Linear(D, P) -> GELU -> Linear(P, H), applied to every position independently.

    Args:
        code_width: D, the width of one position's concatenated UniTok code vectors.
        llm_hidden: H, the LLM's input embedding width.
        hidden: P, the MLP's inner width (the LLM hidden size when ``None``).
    """

    def __init__(self, code_width: int, llm_hidden: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = llm_hidden if hidden is None else hidden
        self.norm = nn.LayerNorm(code_width)
        self.fc1 = nn.Linear(code_width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_hidden)

    def forward(self, vecs_D: torch.Tensor) -> torch.Tensor:
        """Map code vectors ``[..., D]`` to LLM input embeddings ``[..., H]`` (any leading shape)."""
        return self.fc2(self.act(self.fc1(self.norm(vecs_D))))


class MergerCache:
    """Keys/values of the causal attention merger over the image positions embedded so far (one image per row)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of positions held."""
        return 0 if self.keys is None else self.keys.shape[2]


class StaticMergerCache:
    """Preallocated keys/values of the causal attention merger for up to ``length`` positions per row.

    Unlike :class:`MergerCache` its tensors never change size or address, and the number of positions held is a
    0-d tensor on the device (``filled``), so a step with it can be compiled (CUDA graphs included) and needs no
    host sync. Keys/values are ``[rows, heads, length, head_dim]``.
    """

    def __init__(
        self, rows: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.keys = torch.zeros(rows, heads, length, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        for tensor in (self.keys, self.values, self.filled):
            # Fixed addresses: a compiled step mutates them in place without re-recording its CUDA graph.
            torch._dynamo.mark_static_address(tensor)

    def reset(self) -> None:
        """Forget every position (in place: the addresses stay)."""
        self.filled.zero_()


class CausalAttnMerger(nn.Module):
    """The released input merger: K codes of each position -> one LLM input embedding, causal over an image.

    ``codes [B,L,K]`` -> the MLLM's own frozen copy of the K codebooks (rows L2-normalised at lookup), concatenated
    to ``[B,L,D]`` -> ``attn_projection`` (UniTok's ``AttnProjection`` layout: ``proj(norm3(x)) + attn(norm1(x))``
    then a GeGLU MLP, the attention causal over the L positions, heads concatenated to ``attn_width``) ->
    ``mm_projector`` (LayerNorm(eps 1e-6) -> Linear -> GELU -> Linear) -> ``[B,L,H]``.

    Submodule names are the released ``model.multi_embedder.*`` key names. :meth:`step` embeds the next position of
    each row with a :class:`MergerCache` of the earlier positions' keys/values, so embedding an image position by
    position gives the same vectors as embedding it whole.
    """

    def __init__(
        self,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        llm_hidden: int,
        attn_width: int = 1024,
        attn_heads: int = 16,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        from unitok.tokenizer.projection import AttnProjection
        from unitok.tokenizer.quantizer import MultiCodebookQuantizer

        hidden = llm_hidden if hidden is None else hidden
        self.quantizer = MultiCodebookQuantizer(num_codebooks, codebook_size, code_dim).requires_grad_(False)
        self.attn_projection = AttnProjection(num_codebooks * code_dim, attn_width, attn_heads, causal=True)
        self.mm_projector = nn.Sequential(
            nn.LayerNorm(attn_width, eps=1e-6),
            nn.Linear(attn_width, hidden),
            nn.GELU(),
            nn.Linear(hidden, llm_hidden),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[1].weight.dtype

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., K]`` -> concatenated normalised code vectors ``[..., D]`` (fp32, no gradient)."""
        with torch.no_grad():
            return self.quantizer.codes_to_vectors(codes)

    def forward(self, codes_BLK: torch.Tensor) -> torch.Tensor:
        """Embed whole images (or image prefixes) ``[B,L,K]`` -> ``[B,L,H]``, causal over L."""
        return self.project(self.code_vectors(codes_BLK))

    def project(self, vecs_BLD: torch.Tensor) -> torch.Tensor:
        """The merger after the codebook lookup: code vectors ``[B,L,D]`` -> ``[B,L,H]``."""
        return self.mm_projector(self.attn_projection(vecs_BLD.to(self.dtype)))

    def step(self, codes_BTK: torch.Tensor, cache: MergerCache) -> torch.Tensor:
        """Embed the next T positions of each row given ``cache`` (updated in place) -> ``[B,T,H]``."""
        return self.project_step(self.code_vectors(codes_BTK), cache)

    def project_step(self, vecs_BTD: torch.Tensor, cache: MergerCache | StaticMergerCache) -> torch.Tensor:
        """:meth:`step` after the codebook lookup: code vectors ``[B,T,D]`` -> ``[B,T,H]``.

        A :class:`StaticMergerCache` takes one new position per call (T=1).
        """
        proj = self.attn_projection
        attn = proj.attn
        x = vecs_BTD.to(self.dtype)
        bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
        qkv = F.linear(proj.norm1(x), attn.qkv.weight, bias)
        q, k, v = rearrange(qkv, "b t (three h e) -> three b h t e", three=3, h=attn.num_heads).unbind(0)
        t = x.shape[1]
        if isinstance(cache, StaticMergerCache):
            if t != 1:
                raise ValueError(f"a step with a StaticMergerCache embeds one position, got {t}")
            slot = cache.filled.reshape(1)
            cache.keys.index_copy_(2, slot, k)
            cache.values.index_copy_(2, slot, v)
            # The unwritten slots are masked out: the same attention as over the positions held.
            mask = (torch.arange(cache.keys.shape[2], device=x.device) <= slot)[None]
            cache.filled.add_(1)
            k, v = cache.keys, cache.values
        else:
            past = cache.length
            if past:
                k = torch.cat([cache.keys, k], dim=2)
                v = torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v
            # New position i (0-based among the T new ones) sees every cached position and the new ones up to i.
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = proj.proj(proj.norm3(x)) + attn.proj(rearrange(out, "b h t e -> b t (h e)"))
        y = y + proj.mlp(proj.norm2(y))
        return self.mm_projector(y)


class WindowCache:
    """Code vectors ``[B,S,D]`` of the image positions embedded so far (one image per row), for :class:`WindowProjector`."""

    def __init__(self) -> None:
        self.vectors: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of positions held."""
        return 0 if self.vectors is None else self.vectors.shape[1]


class StaticWindowCache:
    """Preallocated code vectors ``[rows, length, D]`` for :class:`WindowProjector`, with the number of positions
    held as a 0-d tensor on the device (``filled``): fixed shapes and addresses, no host sync (see
    :class:`StaticMergerCache`)."""

    def __init__(self, rows: int, length: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.vectors = torch.zeros(rows, length, width, dtype=dtype, device=device)
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        for tensor in (self.vectors, self.filled):
            torch._dynamo.mark_static_address(tensor)

    def reset(self) -> None:
        """Forget every position (in place: the addresses stay)."""
        self.filled.zero_()


class WindowProjector(nn.Module):
    """The per-position MLP of :class:`VisualProjector` over a causal window of the code grid.

    Position ``(r, c)`` of a ``grid_width``-wide raster grid is embedded from the concatenated code vectors of
    itself and of its neighbours that come before it in raster order: rows ``r - window .. r - 1`` at columns
    ``c - window .. c + window``, and row ``r`` at columns ``c - window .. c - 1``; neighbours outside the grid
    are zero vectors. A 1-wide window is a PixelCNN-style masked 3x3 neighbourhood (5 positions). Because no
    position reads a later one, an image embedded whole and an image embedded position by position while it is
    generated (:meth:`project_step` with a :class:`WindowCache`) get the same vectors.

    Shapes vary along an object's outline over several code positions; a per-position MLP hands the LLM only one
    of them per token, while this window hands each token the local 2-D layout around it.

    Args:
        code_width: D, the width of one position's concatenated UniTok code vectors.
        llm_hidden: H, the LLM's input embedding width.
        grid_width: w, the code grid's width (positions per row).
        window: how many rows above and columns to each side the window reaches (>= 1).
        hidden: P, the MLP's inner width (the LLM hidden size when ``None``).
    """

    def __init__(
        self, code_width: int, llm_hidden: int, grid_width: int, window: int = 1, hidden: int | None = None
    ) -> None:
        super().__init__()
        if grid_width < 1 or window < 1:
            raise ValueError(f"grid_width and window must be >= 1, got {grid_width} and {window}")
        self.grid_width, self.window = grid_width, window
        offsets = [
            (dr, dc) for dr in range(-window, 1) for dc in range(-window, window + 1) if dr < 0 or dc <= 0
        ]
        self.register_buffer("row_offsets", torch.tensor([o[0] for o in offsets]), persistent=False)
        self.register_buffer("col_offsets", torch.tensor([o[1] for o in offsets]), persistent=False)
        self.mlp = VisualProjector(code_width * len(offsets), llm_hidden, hidden)

    @property
    def window_size(self) -> int:
        """Number of positions in the window (the position itself included)."""
        return self.row_offsets.numel()

    def _windows(self, vecs_BSD: torch.Tensor, pos_T: torch.Tensor) -> torch.Tensor:
        """Concatenated window vectors ``[B,T,n*D]`` of raster positions ``pos_T`` within ``vecs_BSD`` (which
        holds positions ``0..S-1`` of each image, ``S > max(pos_T)``)."""
        w = self.grid_width
        rows = (pos_T // w)[:, None] + self.row_offsets
        cols = (pos_T % w)[:, None] + self.col_offsets
        valid = (rows >= 0) & (cols >= 0) & (cols < w)
        index = torch.where(valid, rows * w + cols, torch.zeros_like(rows))
        picked = vecs_BSD[:, index] * valid[None, :, :, None].to(vecs_BSD.dtype)
        return picked.flatten(2)

    def forward(self, vecs_BLD: torch.Tensor) -> torch.Tensor:
        """Embed whole images (or image prefixes from position 0) ``[B,L,D]`` -> ``[B,L,H]``."""
        x = vecs_BLD.to(self.mlp.fc1.weight.dtype)
        return self.mlp(self._windows(x, torch.arange(x.shape[1], device=x.device)))

    def project_step(self, vecs_BTD: torch.Tensor, cache: WindowCache | StaticWindowCache) -> torch.Tensor:
        """Embed the next T positions of each row given ``cache`` (updated in place) -> ``[B,T,H]``.

        A :class:`StaticWindowCache` takes one new position per call (T=1).
        """
        x = vecs_BTD.to(self.mlp.fc1.weight.dtype)
        t = x.shape[1]
        if isinstance(cache, StaticWindowCache):
            if t != 1:
                raise ValueError(f"a step with a StaticWindowCache embeds one position, got {t}")
            slot = cache.filled.reshape(1)  # a view: read before the count moves on
            cache.vectors.index_copy_(1, slot, x)
            windows = self._windows(cache.vectors, slot)
            cache.filled.add_(1)
            return self.mlp(windows)
        past = cache.length
        cache.vectors = x if cache.vectors is None else torch.cat([cache.vectors, x], dim=1)
        return self.mlp(self._windows(cache.vectors, torch.arange(past, past + t, device=x.device)))


def build_projector(config: MLLMConfig, unitok: nn.Module, llm_hidden: int) -> nn.Module:
    """The input merger that ``config.projector`` names, for ``unitok``'s codes and an LLM of width ``llm_hidden``.

    The window projector reads the UniTok's own code grid width. The released merger starts from
    the UniTok's own weights: its codebooks and its ``post_quant_proj`` (unless built on the meta device, whose
    weights come from a checkpoint).
    """
    tok_cfg = unitok.config
    if config.projector == "mlp":
        return VisualProjector(tok_cfg.vocab_width, llm_hidden, config.projector_hidden)
    if config.projector == "window":
        return WindowProjector(
            tok_cfg.vocab_width,
            llm_hidden,
            grid_width=tok_cfg.image_size // tok_cfg.patch_size,
            window=config.projector_window,
            hidden=config.projector_hidden,
        )
    k = tok_cfg.num_codebooks
    if tok_cfg.vocab_width % k or config.projector_attn_width < tok_cfg.vocab_width:
        raise ValueError(
            f"the causal attention merger needs a UniTok latent width ({tok_cfg.vocab_width}) divisible by "
            f"K={k} and projector_attn_width >= it, got {config.projector_attn_width}"
        )
    merger = CausalAttnMerger(
        k,
        tok_cfg.codebook_size,
        tok_cfg.vocab_width // k,
        llm_hidden,
        attn_width=config.projector_attn_width,
        attn_heads=config.projector_attn_heads,
        hidden=config.projector_hidden,
    )
    if next(merger.parameters()).is_meta:
        return merger
    for own, theirs in (
        (merger.quantizer, unitok.quantizer),
        (merger.attn_projection, unitok.post_quant_proj),
    ):
        mine, source = own.state_dict(), theirs.state_dict()
        if mine.keys() == source.keys() and all(mine[key].shape == source[key].shape for key in mine):
            own.load_state_dict(source)
    return merger
