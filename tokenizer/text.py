"""The CLIP text tower (open_clip ``TextTransformer``) and its BPE tokenizer.

Keys under ``text_encoder.*`` are open_clip's own (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``), as in the released checkpoint.
"""

from __future__ import annotations

import torch
from open_clip import tokenizer as open_clip_tokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from .config import TokenizerConfig


def build_text_tower(config: TokenizerConfig) -> TextTransformer:
    """open_clip text transformer: ids ``[B,T]`` (T <= context length) -> pooled embedding ``[B,E]``.

    Causal self-attention, exact GELU, pooled at the end-of-text token (the largest id), then
    ``@ text_projection`` (``text_width x embed_dim``, no bias).
    """
    tower = TextTransformer(
        context_length=config.text_context_length,
        vocab_size=config.text_vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
        mlp_ratio=4.0,
        output_dim=config.embed_dim,
        pool_type="argmax",
        act_layer=nn.GELU,
    )
    tower.set_grad_checkpointing(config.checkpoints("text"))
    return tower


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """open_clip BPE ids ``LongTensor [B, context_length]``: <start>, tokens, <end>, zero padding.

    Lower-cased and whitespace-cleaned; texts that are too long are truncated with <end> kept last.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"expected a list of strings, got {type(texts).__name__}")
    return open_clip_tokenizer.tokenize(list(texts), context_length=context_length)


def check_text_ids(ids: torch.Tensor, context_length: int, vocab_size: int) -> None:
    """Validate open_clip ids ``[B,T]``: an integer tensor, ``0 < T <= context_length``, values in ``[0, vocab_size)``.

    Shape and dtype raise ``ValueError`` at once. The value range needs the values: on the CPU they are read
    (a ``ValueError`` naming the range found); on an accelerator the check is a device-side assertion
    (``torch._assert_async``), which fails the step asynchronously instead of making the host wait for the
    device in every training step.
    """
    if (
        not isinstance(ids, torch.Tensor)
        or ids.ndim != 2
        or ids.is_floating_point()
        or ids.dtype == torch.bool
    ):
        described = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"expected text ids as an integer tensor [B,T], got {described}")
    if not 0 < ids.shape[1] <= context_length:
        raise ValueError(f"expected at most {context_length} text ids per row, got {ids.shape[1]}")
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"text ids out of range: expected values in [0, {vocab_size}), got [{low}, {high}]"
            )
        return
    in_range = (ids.min() >= 0) & (ids.max() < vocab_size)
    torch._assert_async(in_range, f"text ids out of range: expected values in [0, {vocab_size})")
