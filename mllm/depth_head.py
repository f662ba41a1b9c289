"""Depth head: predicts the K sub-codes of one visual position from the LLM hidden state before it.

Shape legend: N visual positions (flattened over the batch), K sub-codebooks, V entries per sub-codebook,
H LLM hidden size, W depth-head width.

For one position the head runs a small causal transformer over the length-K sequence
``[in_proj(h), E_0(c_0), ..., E_{K-2}(c_{K-2})] + pos`` and reads the logits of sub-code k from output k
with its own classifier. Training teacher-forces the true codes; sampling picks the codes one by one,
either with a per-layer KV cache or by recomputing the short prefix (the same numbers either way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


class DepthAttention(nn.Module):
    """Causal multi-head self-attention with an optional key/value prefix (the cache)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_NTW: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Attend ``x`` ([N,T,W]) causally; ``past`` holds the keys/values of earlier depth steps.

        With a non-empty ``past`` only one new step (T=1) is supported; it sees every cached step.
        Returns the output [N,T,W] and the keys/values of all steps so far (for the next call).
        """
        q, k, v = rearrange(self.qkv(x_NTW), "n t (three h d) -> three n h t d", three=3, h=self.heads)
        if past is not None:
            if x_NTW.shape[1] != 1:
                raise ValueError(f"a cached depth step takes one position, got {x_NTW.shape[1]}")
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        return self.proj(rearrange(out, "n h t d -> n t (h d)")), (k, v)


class DepthBlock(nn.Module):
    """Pre-LayerNorm transformer block: causal attention and a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = DepthAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        inner = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, inner), nn.GELU(), nn.Linear(inner, width))

    def forward(self, x_NTW: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """One block over [N,T,W]; see :meth:`DepthAttention.forward` for ``past``."""
        attn, kv = self.attn(self.norm1(x_NTW), past)
        x_NTW = x_NTW + attn
        return x_NTW + self.mlp(self.norm2(x_NTW)), kv


class DepthHead(nn.Module):
    """Small causal transformer over the K sub-codes of one visual position.

    Args:
        llm_hidden: H, width of the LLM hidden state that conditions the head.
        num_codebooks: K sub-codebooks (sequence length of the head).
        codebook_size: V entries per sub-codebook (classes of each classifier).
        width: W, the head's own width (the LLM state is projected H -> W).
        layers, heads, mlp_ratio: transformer size.
    """

    def __init__(
        self,
        llm_hidden: int,
        num_codebooks: int,
        codebook_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.in_proj = nn.Linear(llm_hidden, width)
        # Sub-code k is the input of step k+1; the last sub-code is never an input.
        self.code_embeds = nn.ModuleList(nn.Embedding(codebook_size, width) for _ in range(num_codebooks - 1))
        self.pos = nn.Parameter(torch.zeros(num_codebooks, width))
        self.blocks = nn.ModuleList(DepthBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifiers = nn.ModuleList(nn.Linear(width, codebook_size) for _ in range(num_codebooks))
        self.apply(_init_weights)
        nn.init.normal_(self.pos, std=0.02)

    def _step_input(self, step: int, hidden_NH: torch.Tensor, codes_NK: torch.Tensor | None) -> torch.Tensor:
        """Input [N,W] of depth step ``step``: the projected LLM state at 0, else E_{step-1}(code)."""
        if step == 0:
            # The LLM may run in another dtype (e.g. bf16 weights) than the head.
            x = self.in_proj(hidden_NH.to(self.in_proj.weight.dtype))
        else:
            x = self.code_embeds[step - 1](codes_NK[:, step - 1])
        return x + self.pos[step]

    def _run(self, x_NTW: torch.Tensor, pasts: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
        kvs = []
        for i, block in enumerate(self.blocks):
            x_NTW, kv = block(x_NTW, None if pasts is None else pasts[i])
            kvs.append(kv)
        return self.norm(x_NTW), kvs

    def forward(self, hidden_NH: torch.Tensor, codes_NK: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[N,K,V]``: output k predicts ``codes_NK[:, k]`` from the codes before it."""
        if codes_NK.shape != (hidden_NH.shape[0], self.num_codebooks):
            raise ValueError(
                f"expected codes [N={hidden_NH.shape[0]}, K={self.num_codebooks}], got {list(codes_NK.shape)}"
            )
        x = torch.stack([self._step_input(k, hidden_NH, codes_NK) for k in range(self.num_codebooks)], dim=1)
        out, _ = self._run(x, None)
        return torch.stack([head(out[:, k]) for k, head in enumerate(self.classifiers)], dim=1)

    def sample(
        self,
        hidden_NH: torch.Tensor,
        pick: Callable[[int, torch.Tensor], torch.Tensor],
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Choose the K sub-codes of N positions one after the other.

        Args:
            hidden_NH: LLM hidden states of the positions before the ones being generated.
            pick: ``pick(k, logits_NV) -> codes_N`` (long), e.g. guidance + sampling; its result is fed back.
            use_cache: keep the per-layer keys/values (one new step per sub-code) instead of
                recomputing the whole depth prefix at every sub-code.

        Returns:
            codes [N,K] (long).
        """
        codes = torch.zeros(hidden_NH.shape[0], self.num_codebooks, dtype=torch.long, device=hidden_NH.device)
        inputs: list[torch.Tensor] = []
        pasts: list[KV] | None = None
        for k in range(self.num_codebooks):
            inputs.append(self._step_input(k, hidden_NH, codes)[:, None])
            if use_cache:
                out, pasts = self._run(inputs[-1], pasts)
            else:
                out, _ = self._run(torch.cat(inputs, dim=1), None)
            codes[:, k] = pick(k, self.classifiers[k](out[:, -1]))
        return codes


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class LlamaDepthHead(nn.Module):
    """The released depth ("AR") head: Llama decoder layers of the LLM's own config over the K sub-codes.

    For one position the input sequence is ``[h, E_0(c_0), ..., E_{K-2}(c_{K-2})]`` (``h`` the LLM's final hidden
    state, unprojected), run through ``layers`` with RoPE positions 0..K-1 and causal attention, then ``norm`` and
    the one ``linear_head`` (with bias) shared by all sub-codes: output k predicts sub-code k. Submodule names are
    the released ``ar_head.*`` key names (``layers.N``, ``norm``, ``linear_head``, ``codebooks.N``).

    Args:
        llm_config: the LLM's ``LlamaConfig`` (width, heads, FFN, RoPE, RMSNorm eps).
        num_codebooks: K.
        codebook_size: V entries per sub-codebook (every sub-codebook has the same V, so one classifier serves all).
        layers: number of decoder layers (the release: 3).
    """

    def __init__(self, llm_config, num_codebooks: int, codebook_size: int, layers: int = 3) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        hidden = llm_config.hidden_size
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.layers = nn.ModuleList(LlamaDecoderLayer(llm_config, layer_idx=i) for i in range(layers))
        self.norm = LlamaRMSNorm(hidden, eps=llm_config.rms_norm_eps)
        self.linear_head = nn.Linear(hidden, codebook_size)
        self.codebooks = nn.ModuleList(nn.Embedding(codebook_size, hidden) for _ in range(num_codebooks - 1))
        self.rotary_emb = LlamaRotaryEmbedding(config=llm_config)
        std = getattr(llm_config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.linear_head.weight.dtype

    def _step_input(self, step: int, hidden_NH: torch.Tensor, codes_NK: torch.Tensor | None) -> torch.Tensor:
        if step == 0:
            return hidden_NH.to(self.dtype)
        return self.codebooks[step - 1](codes_NK[:, step - 1])

    def _run(self, x_NTH: torch.Tensor, start: int, cache) -> torch.Tensor:
        """Run the layers on steps ``start .. start+T-1`` (``cache``: a transformers Cache of earlier steps, or None)."""
        t = x_NTH.shape[1]
        positions = torch.arange(start, start + t, device=x_NTH.device)[None].expand(x_NTH.shape[0], -1)
        cos_sin = self.rotary_emb(x_NTH, positions)
        mask = None
        if t > 1:
            # An additive causal mask works with every attention implementation (eager and SDPA).
            allowed = torch.ones(t, start + t, dtype=torch.bool, device=x_NTH.device).tril(diagonal=start)
            mask = torch.zeros(allowed.shape, dtype=x_NTH.dtype, device=x_NTH.device)
            mask = mask.masked_fill(~allowed, torch.finfo(x_NTH.dtype).min)[None, None]
        for layer in self.layers:
            out = layer(
                x_NTH,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=cos_sin,
                use_cache=cache is not None,
                **{_LAYER_CACHE_KWARG: cache},
            )
            x_NTH = out[0] if isinstance(out, tuple) else out
        return self.norm(x_NTH)

    def forward(self, hidden_NH: torch.Tensor, codes_NK: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[N,K,V]``: output k predicts ``codes_NK[:, k]`` from the codes before it."""
        if codes_NK.shape != (hidden_NH.shape[0], self.num_codebooks):
            raise ValueError(
                f"expected codes [N={hidden_NH.shape[0]}, K={self.num_codebooks}], got {list(codes_NK.shape)}"
            )
        if hidden_NH.shape[0] == 0:
            # No positions (a text-only batch): run one dummy row so that every parameter stays in the graph
            # (with zero gradient), as distributed training needs; the result is still [0,K,V].
            dummy = self.forward(
                hidden_NH.new_zeros(1, hidden_NH.shape[1]), codes_NK.new_zeros(1, self.num_codebooks)
            )
            return dummy[:0] + 0.0 * dummy.sum()
        x = torch.stack([self._step_input(k, hidden_NH, codes_NK) for k in range(self.num_codebooks)], dim=1)
        return self.linear_head(self._run(x, 0, None))

    def sample(
        self,
        hidden_NH: torch.Tensor,
        pick: Callable[[int, torch.Tensor], torch.Tensor],
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Choose the K sub-codes of N positions one after the other (see :meth:`DepthHead.sample`)."""
        from transformers import DynamicCache

        codes = torch.zeros(hidden_NH.shape[0], self.num_codebooks, dtype=torch.long, device=hidden_NH.device)
        inputs: list[torch.Tensor] = []
        cache = DynamicCache() if use_cache else None
        for k in range(self.num_codebooks):
            inputs.append(self._step_input(k, hidden_NH, codes)[:, None])
            if use_cache:
                out = self._run(inputs[-1], k, cache)
            else:
                out = self._run(torch.cat(inputs, dim=1), 0, None)
            codes[:, k] = pick(k, self.linear_head(out[:, -1]))
        return codes


def _layer_cache_kwarg() -> str:
    import inspect

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    # transformers 5 names it ``cache``; 4.x ``past_key_value``.
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "past_key_value"


_LAYER_CACHE_KWARG = _layer_cache_kwarg()
