"""Text tokenizers for the MLLM: loading one, adding the image special tokens, and building a tiny one.

The tiny tokenizer (a word-level vocabulary trained on a corpus with the ``tokenizers`` package) lets the
tests and the quick start run without downloading Llama-2's sentencepiece model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TINY_SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens the sequence builder needs; ``bos`` is ``None`` for tokenizers without one."""

    boi: int
    eoi: int
    image: int
    eos: int
    pad: int
    bos: int | None


def build_tiny_tokenizer(corpus: Iterable[str], path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Train a whitespace word-level tokenizer on ``corpus`` (every word seen becomes a token).

    Args:
        corpus: texts (captions, questions, answers, prompt templates) whose words form the vocabulary.
        path: if given, the tokenizer is saved there (``AutoTokenizer.from_pretrained(path)`` reloads it).

    Returns:
        a fast tokenizer with ``<pad>``, ``<unk>``, ``<s>`` (bos) and ``</s>`` (eos); unseen words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token=TINY_SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(TINY_SPECIAL_TOKENS.values()), min_frequency=1)
    backend.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **TINY_SPECIAL_TOKENS)
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


def builtin_corpus() -> list[str]:
    """Texts whose words make the built-in tiny vocabulary: the synthetic world's words and the prompt words."""
    from unitok.data.language import NUMBER_WORDS, RELATION_PHRASES
    from unitok.data.world import COLOR_NAMES, SHAPE_NAMES, SIZE_NAMES

    words = [*COLOR_NAMES, *SHAPE_NAMES, *SIZE_NAMES, *NUMBER_WORDS, *RELATION_PHRASES.values()]
    return [
        " ".join(words),
        " ".join(f"{s}s" for s in SHAPE_NAMES),
        "USER: ASSISTANT: a an the of on in at to and is are there how many what which where colour color shape",
        "yes no left right top bottom center centre corner middle image photo picture rendering background",
        "Generate an image based on this description . , ? ! <unconditional>",
    ]


def load_text_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` (a sentencepiece model for Llama-2), never with remote code.

    ``"builtin:tiny"`` builds the word-level tokenizer of :func:`builtin_corpus` locally (no download).
    """
    from unitok.mllm.config import BUILTIN_TINY_TOKENIZER

    if str(name_or_path) == BUILTIN_TINY_TOKENIZER:
        return build_tiny_tokenizer(builtin_corpus())
    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)


def add_image_tokens(
    tokenizer: PreTrainedTokenizerBase, boi: str, eoi: str, image: str, extend_vocab: bool = True
) -> SpecialTokenIds:
    """Add ``boi``/``eoi``/``image`` as special tokens (if missing) and give the tokenizer a pad token.

    A tokenizer without a pad token (Llama-2) pads with its unk token, or its eos token if it has no unk.
    Returns the ids; the caller resizes the LLM embeddings to ``len(tokenizer)``.

    With ``extend_vocab=False`` (the released layout) nothing is added: ``boi``/``eoi`` must already be tokens, and
    ``image`` stays a text placeholder; its id is then the pad id (the filler of visual positions).
    """
    vocab = tokenizer.get_vocab()
    if extend_vocab:
        missing = [t for t in (boi, eoi, image) if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            logger.info("added special tokens %s; vocabulary is now %d", missing, len(tokenizer))
    else:
        missing = [t for t in (boi, eoi) if t not in vocab]
        if missing:
            raise ValueError(
                f"extend_vocab=False needs boi/eoi tokens that already exist in the text vocabulary; "
                f"missing {missing} (the released model uses Llama's byte tokens '<0x00>' and '<0x01>')"
            )
    if tokenizer.eos_token_id is None:
        raise ValueError("the text tokenizer needs an eos token (it ends answers and images)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    boi_id, eoi_id = tokenizer.convert_tokens_to_ids([boi, eoi])
    image_id = tokenizer.convert_tokens_to_ids(image) if extend_vocab else tokenizer.pad_token_id
    return SpecialTokenIds(
        boi=boi_id,
        eoi=eoi_id,
        image=image_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        bos=tokenizer.bos_token_id,
    )
