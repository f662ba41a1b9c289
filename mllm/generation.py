"""Image generation with a :class:`~unitok.mllm.model.UniTokMLLM`: text -> image codes -> images.

Shape legend: B prompts, R rows run by the LLM (B, or 2B with classifier-free guidance: conditional rows then
unconditional rows), L visual positions (h*w), K sub-codebooks, V entries per sub-codebook, H LLM hidden size.

Image generation runs the LLM with its KV cache: one prefill of the prompts (each ending with ``<boi>``), then
one step per visual position that feeds the projected embedding of the position just sampled. The depth head
picks that position's K sub-codes; with guidance each sub-code's logits are ``u + s * (c - u)`` and the code
sampled from them is fed to both the conditional and the unconditional row. ``use_cache=False`` recomputes the
whole prefix at every position instead (the reference the cached path is tested and benchmarked against); with
the causal attention merger that includes re-embedding the whole image so far, while the cached path keeps the
merger's own keys/values (:class:`~unitok.mllm.projector.MergerCache`), so both give the same codes.

Text answers are in :mod:`unitok.mllm.chat`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

from unitok.mllm.sequence import pad_sequences
from unitok.tokenizer.quantizer import unchecked_code_vectors

if TYPE_CHECKING:
    from PIL.Image import Image
    from torch import nn

    from unitok.mllm.model import UniTokMLLM

logger = logging.getLogger(__name__)


@dataclass
class GeneratedImages:
    """Result of :func:`generate_images`: codes [B,h,w,K] and, when decoded, one PIL image per prompt."""

    codes: torch.Tensor
    images: list[Image] | None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(temperature: float, top_k: int, top_p: float, cfg_scale: float | None = None) -> None:
    """Raise ``ValueError`` for sampling settings outside their ranges (NaN, Inf, wrong types included)."""
    if not _is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if cfg_scale is not None and (not _is_number(cfg_scale) or cfg_scale < 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale!r}")


def sample_logits(
    logits_NV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "multinomial",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one index per row of ``logits_NV``; ``temperature == 0`` is greedy (argmax).

    ``top_k`` keeps the k largest logits (0 = all); ``top_p`` keeps the smallest set of largest-probability
    entries whose mass reaches p (always at least one). Returns LongTensor [N].

    ``method``: ``"multinomial"`` (``torch.multinomial``, which checks its input on the host: a device sync per
    call) or ``"race"``: the exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d., the same distribution
    without any host sync (a different random stream, so other draws for the same seed). ``noise`` [N,V] gives the
    race its ``E`` drawn beforehand (``generator`` is then unused).
    """
    if method not in ("multinomial", "race"):
        raise ValueError(f"method must be 'multinomial' or 'race', got {method!r}")
    if temperature == 0:
        return logits_NV.argmax(dim=-1)
    logits = logits_NV.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if method == "race":
        if noise is None:
            noise = torch.empty_like(probs).exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_compile(compile: bool | str) -> None:
    """Raise ``ValueError`` unless ``compile`` is a bool or the name of a ``torch.compile`` backend."""
    if isinstance(compile, bool):
        return
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(compile, str) or compile not in backends:
        raise ValueError(
            f"compile must be True, False or a torch.compile backend name {backends}, got {compile!r}"
        )


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [R,T] that skip left padding (0 at the first real token)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


class StaticImageLoop:
    """The sync-free image loop over preallocated state, for one batch shape and one set of sampling settings.

    It holds the LLM's ``transformers.StaticCache`` sized to prompt + positions, the causal merger's
    :class:`~unitok.mllm.projector.StaticMergerCache` (the window projector's
    :class:`~unitok.mllm.projector.StaticWindowCache`), the next cache slot as a 0-d tensor on the device, and the
    depth head and projector in the LLM's dtype (the model's own modules when they already are, else copies whose
    weights are refreshed at every run). :meth:`step` is one whole position: the depth head's K sub-steps with
    guidance and exponential-race sampling (its ``E`` drawn beforehand, so no generator inside), the new position's
    embedding, and the LLM's one-token step. No shape changes from one position to the next and nothing is read
    back to the host, so ``compile=True`` hands :meth:`step` to ``torch.compile`` whole (mode "reduce-overhead",
    i.e. CUDA graphs, on CUDA). A loop is reused by later runs of the same shape, so it compiles once; runs of one
    loop from several threads take turns.
    """

    def __init__(
        self,
        model: UniTokMLLM,
        batch: int,
        rows: int,
        prompt_len: int,
        total: int,
        settings: dict[str, Any],
        compile: bool | str,
    ) -> None:
        from transformers import StaticCache

        from unitok.mllm.model import _embedding
        from unitok.mllm.projector import StaticMergerCache, StaticWindowCache

        self.batch, self.rows, self.prompt_len, self.total = batch, rows, prompt_len, total
        self.guided = rows != batch
        self.cfg_scale = settings["cfg_scale"]
        self.temperature = settings["temperature"]
        self.sampling = (settings["temperature"], settings["top_k"], settings["top_p"])
        self.depth_cache = settings["depth_cache"]
        self.reference_merger_cache = settings["reference_merger_cache"]
        device = model.device
        self.dtype = _embedding(model.llm).weight.dtype
        self.depth_head = _in_dtype(model.depth_head, self.dtype)
        self.projector = _in_dtype(model.projector, self.dtype)
        self.cache = StaticCache(config=model.llm.config, max_cache_len=prompt_len + total)
        self.merger_cache = None
        if model.config.projector == "causal_attn" and not self.reference_merger_cache:
            attn = model.projector.attn_projection.attn
            width = model.config.projector_attn_width
            self.merger_cache = StaticMergerCache(
                rows, attn.num_heads, total, width // attn.num_heads, self.dtype, device
            )
        elif model.config.projector == "window":
            width = model.unitok.config.vocab_width
            self.merger_cache = StaticWindowCache(rows, total, width, self.dtype, device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.slot)
        self.slots = torch.arange(prompt_len + total, device=device)
        # Set by each run: the slots each row may attend to, and the position id of the first image position.
        self.visible: torch.Tensor | None = None
        self.first_position: torch.Tensor | None = None
        self.lock = threading.Lock()
        self.step = self._step
        backend = "inductor" if compile is True else compile
        if backend:
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            self.step = torch.compile(self._step, backend=backend, mode=mode, dynamic=False)
        self.cuda_graphs = backend == "inductor" and device.type == "cuda"

    def _refresh(self, model: UniTokMLLM) -> None:
        """Bring the copies in the LLM's dtype up to date with the model's weights (in place: same addresses)."""
        for own, theirs in ((self.depth_head, model.depth_head), (self.projector, model.projector)):
            if own is not theirs:
                for mine, source in zip(own.state_dict().values(), theirs.state_dict().values()):
                    mine.copy_(source)

    def _pick(self, k: int, logits_RV: torch.Tensor, noise_NKV: torch.Tensor | None) -> torch.Tensor:
        """Guidance + sampling of sub-code ``k`` for every row (a guided code goes to both of its rows)."""
        if self.guided:
            cond, uncond = logits_RV[: self.batch].float(), logits_RV[self.batch :].float()
            logits_RV = uncond + self.cfg_scale * (cond - uncond)
        noise = None if noise_NKV is None else noise_NKV[:, k]
        code = sample_logits(logits_RV, *self.sampling, method="race", noise=noise)
        return torch.cat([code, code]) if self.guided else code

    def _embed(self, model: UniTokMLLM, codes_RK: torch.Tensor) -> torch.Tensor:
        """The LLM input embedding [R,1,H] of the position just sampled."""
        quantizer = model._quantizer()
        vecs = unchecked_code_vectors(quantizer, codes_RK[:, None])
        if vecs is None:
            vecs = quantizer.codes_to_vectors(codes_RK[:, None])
        if self.merger_cache is not None:
            return self.projector.project_step(vecs, self.merger_cache)
        if model.config.projector == "causal_attn":
            return self.projector.project(vecs)
        return self.projector(vecs.to(self.dtype))

    def _step(
        self, model: UniTokMLLM, hidden_RH: torch.Tensor, noise_NKV: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: its codes [R,K] from the LLM state ``hidden_RH`` [R,H], and the LLM state after it.

        ``noise_NKV``: the race's ``E ~ Exp(1)`` for the N sampled rows (B prompts), None when greedy.
        """
        codes_RK = self.depth_head.sample(
            hidden_RH, lambda k, logits: self._pick(k, logits, noise_NKV), use_cache=self.depth_cache
        )
        embeds = self._embed(model, codes_RK).to(self.dtype)
        slot = self.slot
        # The new token sees the prompt's real tokens and every position up to its own slot.
        mask = self.visible & (self.slots <= slot)
        positions = self.first_position + (slot - self.prompt_len)
        slot.add_(1)
        hidden = model.decode_hidden(embeds, mask, positions, self.cache, sync_free=True)[:, -1]
        return codes_RK, hidden

    def run(
        self,
        model: UniTokMLLM,
        prompt_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None,
        progress: Callable[[int, int], None] | None,
    ) -> torch.Tensor:
        """Prefill the prompts (eager) and generate every position: codes [B,L,K]."""
        with self.lock:
            return self._run(model, prompt_embeds, attention_mask, generator, progress)

    def _run(
        self,
        model: UniTokMLLM,
        prompt_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None,
        progress: Callable[[int, int], None] | None,
    ) -> torch.Tensor:
        self._refresh(model)
        self.cache.reset()
        if self.merger_cache is not None:
            self.merger_cache.reset()
        rows, device = self.rows, prompt_embeds.device
        ones = attention_mask.new_ones(rows, self.total)
        self.visible = torch.cat([attention_mask, ones], dim=1).bool()
        positions = _positions(attention_mask)
        self.first_position = positions[:, -1:] + 1
        prefill_mask = torch.cat([attention_mask, torch.zeros_like(ones)], dim=1)
        # Contiguous like the step's own output: a compiled step would otherwise be built twice (strides differ).
        hidden_RTH = model.decode_hidden(prompt_embeds, prefill_mask, positions, self.cache)
        hidden_RH = hidden_RTH[:, -1].contiguous()
        self.slot.fill_(self.prompt_len)
        noise_shape = (self.batch, model.num_codebooks, model.codebook_size)
        out = []
        for i in range(self.total):
            noise = None
            if self.temperature > 0:
                noise = torch.empty(noise_shape, device=device).exponential_(generator=generator)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            codes_RK, hidden_RH = self.step(model, hidden_RH, noise)
            # A CUDA graph's outputs are overwritten by its next replay.
            out.append(codes_RK[: self.batch].clone())
            hidden_RH = hidden_RH.clone()
            if progress is not None:
                progress(i + 1, self.total)
        return torch.stack(out, dim=1)


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` when its floating-point weights are ``dtype``, else a copy cast to it."""
    if all(p.dtype == dtype for p in module.parameters() if p.is_floating_point()):
        return module
    return copy.deepcopy(module).to(dtype)


_LOOPS: weakref.WeakKeyDictionary[Any, dict[tuple, StaticImageLoop]] = weakref.WeakKeyDictionary()
_LOOPS_PER_MODEL = 2


def static_image_loop(
    model: UniTokMLLM,
    batch: int,
    rows: int,
    prompt_len: int,
    total: int,
    settings: dict[str, Any],
    compile: bool | str,
) -> StaticImageLoop:
    """The model's :class:`StaticImageLoop` for this shape and these settings (built, or reused: the most recent
    two per model are kept, so that a compiled step and its caches serve repeated calls)."""
    from unitok.mllm.model import _embedding

    key = (
        batch,
        rows,
        prompt_len,
        total,
        compile,
        str(model.device),
        _embedding(model.llm).weight.dtype,
        model.projector_dtype,
        next(model.depth_head.parameters()).dtype,
        *sorted(settings.items()),
    )
    loops = _LOOPS.setdefault(model, {})
    loop = loops.pop(key, None)
    if loop is None:
        loop = StaticImageLoop(model, batch, rows, prompt_len, total, settings, compile)
        while len(loops) >= _LOOPS_PER_MODEL:
            loops.pop(next(iter(loops)))
    loops[key] = loop
    return loop


@torch.no_grad()
def generate_image_codes(
    model: UniTokMLLM,
    prompts: Sequence[str],
    grid: tuple[int, int],
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    depth_cache: bool = True,
    guide_always: bool = False,
    progress: Callable[[int, int], None] | None = None,
    reference_merger_cache: bool = False,
    fast: bool = False,
    compile: bool | str = False,
) -> torch.Tensor:
    """Sample the code grids of ``prompts`` (see the module docstring).

    Args:
        model: the MLLM (switched to eval mode by the caller).
        prompts: B non-empty prompts.
        grid: (h, w) of the code grid; L = h*w positions are generated in raster order.
        cfg_scale: guidance scale s; 1 means plain conditional sampling (no unconditional rows are run
            unless ``guide_always``, which exists to check that s=1 with guidance equals no guidance).
        temperature, top_k, top_p: sampling of each sub-code (temperature 0 = greedy).
        generator: random generator for the draws (None = torch's global one).
        use_cache: LLM KV cache and merger cache (False recomputes the whole prefix at every position).
        depth_cache: depth-head KV cache (False recomputes its short prefix at every sub-code).
        progress: called as ``progress(done, L)`` after each generated position.
        reference_merger_cache: with the causal merger and ``use_cache``, embed each new position alone, as the
            reference code's cached path does (its published samples were made so); the merger then sees a
            different context than in training. Off by default.
        fast: a loop without host syncs: exponential-race sampling (same distribution as ``multinomial``, other
            draws for the same seed; greedy gives the same codes) and code lookups without the range checks
            (the sampled codes are in range by construction); with ``use_cache`` it runs a
            :class:`StaticImageLoop` (the LLM's KV cache preallocated for prompt + positions, the exponential
            noise of a position drawn in one call, depth head and projector in the LLM's dtype). The default eager
            path is the reference.
        compile: the fast loop with its whole position step compiled by ``torch.compile``: True is inductor (mode
            "reduce-overhead", i.e. CUDA graphs, on CUDA), a string names another ``torch.compile`` backend (e.g.
            "aot_eager", quick to build, for checks). Implies ``fast``, needs ``use_cache``. The first call of a
            shape and setting compiles; later ones reuse it (``torch.compile``'s recompile limit counts the shapes).

    Returns:
        codes LongTensor [B,h,w,K] on the model's device.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"expected a non-empty list of prompts, got {prompts!r}")
    check_sampling(temperature, top_k, top_p, cfg_scale)
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"expected a code grid of at least 1x1, got {grid}")
    model.check_grid(h, w)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable (done, total) -> None, got {type(progress).__name__}")
    check_compile(compile)
    if compile and not use_cache:
        raise ValueError("compile compiles the cached position step; it needs use_cache=True")
    fast = fast or bool(compile)
    builder, device, b = model.builder, model.device, len(prompts)
    guided = cfg_scale != 1.0 or guide_always
    seqs = [builder.generation_prompt(p) for p in prompts]
    if guided:
        seqs += [builder.generation_prompt("", uncond=True)] * b
    batch = pad_sequences(seqs, builder.ids.pad, side="left")
    total = h * w
    limit = model.context_length
    if limit is not None and batch.input_ids.shape[1] + total > limit:
        raise ValueError(
            f"a {h}x{w} code grid ({total} positions) after a prompt of {batch.input_ids.shape[1]} tokens needs "
            f"{batch.input_ids.shape[1] + total} positions, more than the LLM's context of {limit}; "
            "use a smaller image_size or a shorter prompt"
        )
    batch = batch.to(device)
    prompt_embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
    if fast and use_cache:
        settings = dict(
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            depth_cache=depth_cache,
            reference_merger_cache=reference_merger_cache,
        )
        rows, prompt_len = batch.input_ids.shape
        loop = static_image_loop(model, b, rows, prompt_len, total, settings, compile)
        codes = loop.run(model, prompt_embeds, batch.attention_mask, generator, progress)
        return rearrange(codes, "b (h w) k -> b h w k", h=h, w=w)
    mask = batch.attention_mask
    positions = _positions(mask)
    cache = model.new_cache() if use_cache else None
    state = model.new_image_state()
    hidden_RH = model.decode_hidden(prompt_embeds, mask, positions, cache)[:, -1]

    method = "race" if fast else "multinomial"

    def pick(_: int, logits_RV: torch.Tensor) -> torch.Tensor:
        if guided:
            cond, uncond = logits_RV[:b].float(), logits_RV[b:].float()
            guided_logits = uncond + cfg_scale * (cond - uncond)
            code = sample_logits(guided_logits, temperature, top_k, top_p, generator, method)
            return torch.cat([code, code])
        return sample_logits(logits_RV, temperature, top_k, top_p, generator, method)

    out: list[torch.Tensor] = []
    for i in range(total):
        codes_RK = model.depth_head.sample(hidden_RH, pick, use_cache=depth_cache)
        out.append(codes_RK)
        if progress is not None:
            progress(i + 1, total)
        if i == total - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if use_cache:
            step = model.embed_next(codes_RK[:, None], state, reference_merger_cache, checked=not fast)
            step = step.to(prompt_embeds.dtype)
            hidden_RH = model.decode_hidden(step, mask, positions[:, -1:], cache, sync_free=fast)[:, -1]
        else:
            image = model.embed_image(torch.stack(out, dim=1), checked=not fast).to(prompt_embeds.dtype)
            embeds = torch.cat([prompt_embeds, image], dim=1)
            hidden_RH = model.decode_hidden(embeds, mask, positions)[:, -1]
    codes = torch.stack(out, dim=1)[:b]
    return rearrange(codes, "b (h w) k -> b h w k", h=h, w=w)


def generate_images(
    model: UniTokMLLM,
    prompts: str | Sequence[str],
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    image_size: int | None = None,
    decode: bool = True,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    reference_merger_cache: bool = False,
    fast: bool = False,
    compile: bool | str = False,
) -> GeneratedImages:
    """Text -> image: sample code grids and decode them with the UniTok.

    ``image_size`` (pixels, a multiple of the UniTok's downsampling factor; default the UniTok's) sets the grid;
    ``seed`` makes the draws reproducible; ``progress(done, total)`` is called after each generated position.
    See :func:`generate_image_codes` for the other arguments. Every argument is checked before any work. With
    ``fast`` or ``compile`` on CUDA the UniTok decodes under bf16 autocast.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    check_sampling(temperature, top_k, top_p, cfg_scale)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    check_compile(compile)
    grid = model.grid(image_size)
    was_training = model.training
    model.eval()
    try:
        codes = generate_image_codes(
            model,
            prompts,
            grid,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=_make_generator(seed, model.device),
            use_cache=use_cache,
            depth_cache=use_cache,
            progress=progress,
            reference_merger_cache=reference_merger_cache,
            fast=fast,
            compile=compile,
        )
        images = None
        if decode:
            with _decode_autocast(model.device, fast or bool(compile)):
                images = model.decode_codes(codes)
    finally:
        model.train(was_training)
    return GeneratedImages(codes=codes, images=images)


def _decode_autocast(device: torch.device, fast: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for the UniTok decoder of the fast path on CUDA (no change elsewhere)."""
    if fast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
