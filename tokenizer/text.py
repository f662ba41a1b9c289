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
