"""Generation with a :class:`~unitok.mllm.model.UniTokMLLM`: text -> image codes, and image(s) + question -> text.

Shape legend: B prompts, R rows run by the LLM (B, or 2B with classifier-free guidance: conditional rows then
unconditional rows), L visual positions (h*w), K sub-codebooks, V entries per sub-codebook, H LLM hidden size.

Image generation runs the LLM with its KV cache: one prefill of the prompts (each ending with ``<boi>``), then
one step per visual position that feeds the projected embedding of the position just sampled. The depth head
picks that position's K sub-codes; with guidance each sub-code's logits are ``u + s * (c - u)`` and the code
sampled from them is fed to both the conditional and the unconditional row. ``use_cache=False`` recomputes the
whole prefix at every position instead (the reference the cached path is tested and benchmarked against).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

from unitok.mllm.sequence import pad_sequences

if TYPE_CHECKING:
    from PIL.Image import Image

    from unitok.mllm.model import UniTokMLLM

logger = logging.getLogger(__name__)


@dataclass
class GeneratedImages:
    """Result of :func:`generate_images`: codes [B,h,w,K] and, when decoded, one PIL image per prompt."""

    codes: torch.Tensor
    images: list[Image] | None


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError`` for sampling settings outside their ranges."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_logits(
    logits_NV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one index per row of ``logits_NV``; ``temperature == 0`` is greedy (argmax).

    ``top_k`` keeps the k largest logits (0 = all); ``top_p`` keeps the smallest set of largest-probability
    entries whose mass reaches p (always at least one). Returns LongTensor [N].
    """
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
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [R,T] that skip left padding (0 at the first real token)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


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
        use_cache: LLM KV cache (False recomputes the whole prefix at every position).
        depth_cache: depth-head KV cache (False recomputes its short prefix at every sub-code).

    Returns:
        codes LongTensor [B,h,w,K] on the model's device.
    """
    if not prompts:
        raise ValueError("expected at least one prompt, got none")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    check_sampling(temperature, top_k, top_p)
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"expected a code grid of at least 1x1, got {grid}")
    builder, device, b = model.builder, model.device, len(prompts)
    guided = cfg_scale != 1.0 or guide_always
    seqs = [builder.generation_prompt(p) for p in prompts]
    if guided:
        seqs += [builder.generation_prompt("", uncond=True)] * b
    batch = pad_sequences(seqs, builder.ids.pad, side="left").to(device)
    embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
    mask = batch.attention_mask
    positions = _positions(mask)
    cache = model.new_cache() if use_cache else None
    hidden_RH = model.decode_hidden(embeds, mask, positions, cache)[:, -1]

    def pick(_: int, logits_RV: torch.Tensor) -> torch.Tensor:
        if guided:
            cond, uncond = logits_RV[:b].float(), logits_RV[b:].float()
            code = sample_logits(uncond + cfg_scale * (cond - uncond), temperature, top_k, top_p, generator)
            return torch.cat([code, code])
        return sample_logits(logits_RV, temperature, top_k, top_p, generator)

    out = []
    for i in range(h * w):
        codes_RK = model.depth_head.sample(hidden_RH, pick, use_cache=depth_cache)
        out.append(codes_RK[:b])
        if i == h * w - 1:
            break
        step = model.embed_codes(codes_RK)[:, None].to(embeds.dtype)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if use_cache:
            hidden_RH = model.decode_hidden(step, mask, positions[:, -1:], cache)[:, -1]
        else:
            embeds = torch.cat([embeds, step], dim=1)
            hidden_RH = model.decode_hidden(embeds, mask, positions)[:, -1]
    return rearrange(torch.stack(out, dim=1), "b (h w) k -> b h w k", h=h, w=w)


def generate_images(
    model: UniTokMLLM,
    prompts: Sequence[str],
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    image_size: int | None = None,
    decode: bool = True,
    use_cache: bool = True,
) -> GeneratedImages:
    """Text -> image: sample code grids and decode them with the UniTok.

    ``image_size`` (pixels, a multiple of the UniTok's downsampling factor; default the UniTok's) sets the grid;
    ``seed`` makes the draws reproducible. See :func:`generate_image_codes` for the other arguments.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
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
        )
        images = model.decode_codes(codes) if decode else None
    finally:
        model.train(was_training)
    return GeneratedImages(codes=codes, images=images)


def _codes_per_sample(model: UniTokMLLM, images_or_codes: Any, n: int) -> list[torch.Tensor | None]:
    """Normalise the visual input of :func:`answer` to one code grid [h,w,K] (or None) per question."""
    if images_or_codes is None:
        return [None] * n
    if isinstance(images_or_codes, torch.Tensor):
        items: list[Any] = list(images_or_codes) if images_or_codes.ndim == 4 else [images_or_codes]
    elif isinstance(images_or_codes, (list, tuple)):
        items = list(images_or_codes)
    else:
        items = [images_or_codes]
    if len(items) != n:
        raise ValueError(
            f"expected one image (or code grid) per question: got {len(items)} for {n} question(s)"
        )
    return [None if item is None else model.to_codes(item) for item in items]


def answer(
    model: UniTokMLLM,
    images_or_codes: Any,
    questions: str | Sequence[str],
    max_new_tokens: int = 64,
    stream: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> list[str] | Iterator[str]:
    """Image(s) + question -> answer text through ``transformers``' ``generate`` on input embeddings.

    Args:
        model: the MLLM.
        images_or_codes: per question one of: a PIL image, an image tensor [3,H,W] in [-1,1], a code grid
            [h,w,K], or None (text only); also a batched tensor [B,3,H,W] / [B,h,w,K]; or None for all.
        questions: one question or a list; ``<image>`` marks where the image goes (prepended when missing).
        max_new_tokens: answer length limit in tokens.
        stream: yield the answer text piece by piece (one question only) instead of returning it.
        temperature, top_p: sampling (temperature 0 = greedy).
        use_cache: the LLM KV cache (False recomputes the prefix at each token; for tests).

    Returns:
        the answers (special tokens removed, stripped), or an iterator of text pieces when ``stream``.
    """
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise ValueError("expected at least one question, got none")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, 0, top_p)
    if stream and len(questions) != 1:
        raise ValueError(f"stream=True answers one question at a time, got {len(questions)}")
    codes = _codes_per_sample(model, images_or_codes, len(questions))
    placeholder = model.config.image_token
    seqs = []
    for question, grid in zip(questions, codes):
        if not question.replace(placeholder, "").strip():
            raise ValueError(f"expected a non-empty question, got {question!r}")
        if grid is not None and placeholder not in question:
            question = f"{placeholder}\n{question}"
        seqs.append(model.builder.understanding_prompt(question, [] if grid is None else [grid]))
    batch = pad_sequences(seqs, model.builder.ids.pad, side="left").to(model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            embeds = model.embed(batch.input_ids, batch.visual_mask, batch.codes)
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": batch.attention_mask,
            "max_new_tokens": max_new_tokens,
            "pad_token_id": model.builder.ids.pad,
            "eos_token_id": model.builder.ids.eos,
            "use_cache": use_cache,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if stream:
            return _stream(model, kwargs, was_training)
        with torch.no_grad():
            out = model.llm.generate(**kwargs)
    finally:
        if not stream:
            model.train(was_training)
    # With inputs_embeds only, generate returns just the new tokens.
    return [text.strip() for text in model.text_tokenizer.batch_decode(out, skip_special_tokens=True)]


def _stream(model: UniTokMLLM, kwargs: dict[str, Any], was_training: bool) -> Iterator[str]:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.text_tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.llm.generate(**kwargs, streamer=streamer)
        except BaseException as err:  # re-raised in the consumer's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        thread.join()
        model.train(was_training)
    if errors:
        raise errors[0]
