"""Sequence building: conversations, prompts and image codes -> token ids, labels and visual-position masks.

Shape legend: B batch, T sequence length (text tokens and visual positions), K sub-codebooks, h/w code grid.

Layout of one sequence (``[bos]`` only if the tokenizer has one; the template is ``MLLMConfig.prompt_template``):

- text only:         ``[bos] text </s>``                                          loss on every token after bos
- image -> text:     ``[bos] system USER: ..<boi> v_1..v_L <eoi>.. ASSISTANT: answer </s> ...``  loss on answers + </s>
- text -> image:     ``[bos] system USER: prompt ASSISTANT: <boi> v_1..v_L <eoi> </s>``  loss on the L positions' codes
  (through the depth head) and on ``<eoi> </s>`` (through the LM head).

Each ``<image>`` placeholder of a user turn becomes ``<boi>``, one visual position per code-grid cell (raster
order), ``<eoi>``. Visual positions hold the ``<image>`` id in ``input_ids`` only as filler: their input
embeddings come from the projector.

With ``conversation="vicuna_v1"`` (the released model) the layout is the released one instead:

- image -> text:     ``[bos] <system> USER: <q1 text, v_1..v_L in place of <image>> ASSISTANT: a1 </s> USER: ...``
  (no markers around the visual positions; loss on the answers + ``</s>``)
- text -> image:     ``[bos] prompt + t2i_suffix <boi> v_1..v_L <eoi> </s>`` (no template; the unconditional row
  is ``[bos] uncond_prompt <boi>``); loss on ``<boi>``, the codes, ``<eoi>`` and ``</s>``.

Text around an ``<image>`` placeholder is tokenized chunk by chunk (the placeholder need not be a token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from einops import rearrange
from transformers import PreTrainedTokenizerBase

from unitok.mllm.config import MLLMConfig
from unitok.mllm.text_tokenizer import SpecialTokenIds

IGNORE_INDEX = -100
# Distinct strings whose token ids a SequenceBuilder keeps (cleared when full).
_TOKEN_CACHE_SIZE = 1 << 16


@dataclass
class TextSample:
    """A text-only training sample (language modelling on all of it)."""

    text: str


@dataclass
class UnderstandingSample:
    """Image(s) -> text: ``turns`` of (user text, answer); user texts hold one ``<image>`` per entry of ``codes``.

    ``codes`` are UniTok code grids, each LongTensor [h,w,K].
    """

    turns: list[tuple[str, str]]
    codes: list[torch.Tensor]

    @classmethod
    def from_llava(
        cls, conversations: list[dict[str, str]], codes: list[torch.Tensor]
    ) -> UnderstandingSample:
        """From a LLaVA conversation list (alternating ``{"from": "human"|"gpt", "value": ...}``)."""
        roles = [turn.get("from") for turn in conversations]
        if len(roles) % 2 or any(r != ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(roles)):
            raise ValueError(f"expected alternating human/gpt turns starting with human, got roles {roles}")
        values = [turn["value"] for turn in conversations]
        return cls(turns=list(zip(values[::2], values[1::2])), codes=list(codes))


@dataclass
class GenerationSample:
    """Text -> image: a prompt and the UniTok code grid [h,w,K] of its image."""

    prompt: str
    codes: torch.Tensor


@dataclass
class TokenSequence:
    """One built sequence of length T.

    Attributes:
        input_ids: [T] token ids (the ``<image>`` id at visual positions).
        labels: [T] the text token to predict at each position, ``IGNORE_INDEX`` where there is no text loss.
        visual_mask: [T] True at visual positions (embedded by the projector).
        code_mask: [T] True at visual positions whose codes are generation targets.
        codes: [T,K] the codes of visual positions, 0 elsewhere.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    visual_mask: torch.Tensor
    code_mask: torch.Tensor
    codes: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class MLLMBatch:
    """Padded batch of :class:`TokenSequence` (``[B,T]`` each, codes ``[B,T,K]``) plus ``attention_mask`` [B,T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    visual_mask: torch.Tensor
    code_mask: torch.Tensor
    codes: torch.Tensor

    def to(self, device: torch.device | str) -> MLLMBatch:
        """A copy with every tensor on ``device``."""
        return MLLMBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class _Pieces:
    """Accumulates the parts of one sequence as Python lists; ``build`` makes the tensors once."""

    def __init__(self, num_codebooks: int) -> None:
        self.num_codebooks = num_codebooks
        self.ids: list[int] = []
        self.labels: list[int] = []
        # Visual runs: (start, codes [n,K], supervised); every other position is text (no codes).
        self.runs: list[tuple[int, torch.Tensor, bool]] = []

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, ids: list[int], supervised: bool) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    def visual_positions(self, filler_id: int, codes_LK: torch.Tensor, supervised: bool) -> None:
        n = codes_LK.shape[0]
        self.runs.append((len(self.ids), codes_LK, supervised))
        self.ids.extend([filler_id] * n)
        self.labels.extend([IGNORE_INDEX] * n)

    def build(self) -> TokenSequence:
        length = len(self.ids)
        visual = torch.zeros(length, dtype=torch.bool)
        targets = torch.zeros(length, dtype=torch.bool)
        codes = torch.zeros(length, self.num_codebooks, dtype=torch.long)
        for start, codes_LK, supervised in self.runs:
            end = start + codes_LK.shape[0]
            visual[start:end] = True
            targets[start:end] = supervised
            codes[start:end] = codes_LK.to(torch.long).cpu()
        return TokenSequence(
            input_ids=torch.tensor(self.ids, dtype=torch.long),
            labels=torch.tensor(self.labels, dtype=torch.long),
            visual_mask=visual,
            code_mask=targets,
            codes=codes,
        )


@dataclass(frozen=True)
class _Measured:
    """What a :class:`SequenceBuilder` method returns inside :meth:`SequenceBuilder.measure`: the length only."""

    length: int

    def __len__(self) -> int:
        return self.length


class SequenceBuilder:
    """Turns samples and prompts into :class:`TokenSequence` for one text tokenizer and one UniTok vocabulary.

    Args:
        tokenizer: the text tokenizer, with the special tokens of ``config`` already added.
        config: the MLLM config (template, special tokens, uncond prompt, max length).
        ids: the special token ids (from :func:`~unitok.mllm.text_tokenizer.add_image_tokens`).
        num_codebooks: K of the UniTok.
        codebook_size: V entries per sub-codebook.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        config: MLLMConfig,
        ids: SpecialTokenIds,
        num_codebooks: int,
        codebook_size: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.ids = ids
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self._token_cache: dict[str, tuple[int, ...]] = {}
        self._measuring = False

    def check_codes(self, codes: torch.Tensor, batched: bool = False) -> None:
        """Raise ``ValueError`` unless ``codes`` is an integer tensor [h,w,K] (or [B,h,w,K]) with values in [0,V)."""
        want = "[B,h,w,K]" if batched else "[h,w,K]"
        ndim = 4 if batched else 3
        if not isinstance(codes, torch.Tensor) or codes.ndim != ndim or codes.shape[-1] != self.num_codebooks:
            got = list(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"expected codes of shape {want} with K={self.num_codebooks}, got {got}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        if codes.numel() == 0:
            raise ValueError(f"expected a non-empty code grid {want}, got {list(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")

    def _tokenize(self, text: str) -> list[int]:
        # Data sets repeat their prompts, questions and answers many times: each distinct string is tokenized
        # once (the cache is bounded; ids never change for a builder, whose tokenizer is fixed).
        ids = self._token_cache.get(text)
        if ids is None:
            if len(self._token_cache) >= _TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            ids = self._token_cache[text] = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
        return list(ids)

    def _start(self) -> _Pieces:
        pieces = _Pieces(self.num_codebooks)
        prefix = [] if self.ids.bos is None else [self.ids.bos]
        if self.config.system_prompt:
            prefix += self._tokenize(self.config.system_prompt)
        pieces.text(prefix, supervised=False)
        return pieces

    def _user_turn(
        self, pieces: _Pieces, user_text: str, codes: list[torch.Tensor], allow_empty: bool = False
    ) -> None:
        """Append one rendered user turn, expanding each ``<image>`` into ``<boi>`` + positions + ``<eoi>``."""
        if not allow_empty and not user_text.strip():
            raise ValueError("expected a non-empty prompt / question, got an empty string")
        ids = self._tokenize(self.config.prompt_template.replace("{prompt}", user_text))
        start = 0
        for i, token in enumerate(ids):
            if token == self.ids.image:
                pieces.text([*ids[start:i], self.ids.boi], supervised=False)
                grid = codes.pop(0)
                pieces.visual_positions(self.ids.image, rearrange(grid, "h w k -> (h w) k"), supervised=False)
                pieces.text([self.ids.eoi], supervised=False)
                start = i + 1
        pieces.text(ids[start:], supervised=False)

    def _check_images(self, texts: Sequence[str], codes: Sequence[torch.Tensor]) -> None:
        placeholder = self.config.image_token
        found = sum(t.count(placeholder) for t in texts)
        if found != len(codes):
            raise ValueError(
                f"the prompt has {found} {placeholder} placeholder(s) but {len(codes)} image(s) were given; "
                f"write one {placeholder} per image"
            )
        for grid in codes:
            self.check_codes(grid)

    def _finish(self, pieces: _Pieces, truncatable: bool) -> TokenSequence:
        length, limit = len(pieces), self.config.max_length
        if length > limit and not truncatable:
            raise ValueError(
                f"a sequence with images has {length} tokens, more than max_length={limit}; "
                "raise max_length or shorten the text"
            )
        if self._measuring:
            return _Measured(min(length, limit))  # type: ignore[return-value]
        seq = pieces.build()
        if length <= limit:
            return seq
        return TokenSequence(**{f.name: getattr(seq, f.name)[:limit] for f in fields(seq)})

    def measure(self, build: Callable[..., TokenSequence], *args: Any, **kwargs: Any) -> int:
        """``len(build(*args, **kwargs))`` without making the tensors; ``build`` is one of this builder's methods
        (``text``, ``understanding``, ``generation``, ...), and raises what it raises."""
        self._measuring = True
        try:
            return len(build(*args, **kwargs))
        finally:
            self._measuring = False

    def text(self, text: str) -> TokenSequence:
        """A text-only training sequence ``[bos] text </s>`` (truncated to ``max_length``)."""
        if not text.strip():
            raise ValueError("expected a non-empty text sample, got an empty string")
        if self.config.image_token in text:
            raise ValueError(
                f"a text-only sample cannot contain {self.config.image_token}; use an UnderstandingSample"
            )
        pieces = self._start()
        pieces.text([*self._tokenize(text), self.ids.eos], supervised=True)
        return self._finish(pieces, truncatable=True)

    @property
    def vicuna(self) -> bool:
        """Whether sequences follow the released model's layout (``conversation="vicuna_v1"``)."""
        return self.config.conversation == "vicuna_v1"

    def _text_with_images(self, pieces: _Pieces, text: str, codes: list[torch.Tensor]) -> None:
        """Append ``text`` with each ``<image>`` replaced by the visual positions of the next grid (no markers)."""
        chunks = text.split(self.config.image_token)
        for i, chunk in enumerate(chunks):
            if i:
                grid = codes.pop(0)
                pieces.visual_positions(self.ids.image, rearrange(grid, "h w k -> (h w) k"), supervised=False)
            if chunk:
                pieces.text(self._tokenize(chunk), supervised=False)

    def _turns(
        self, turns: Sequence[tuple[str, str | None]], codes: Sequence[torch.Tensor], supervised: bool
    ) -> _Pieces:
        """The pieces of a conversation; the last answer may be ``None`` (an inference prompt)."""
        self._check_images([user for user, _ in turns], codes)
        if any(answer is not None and self.config.image_token in answer for _, answer in turns):
            raise ValueError(f"answers cannot contain {self.config.image_token}")
        pending = list(codes)
        if not self.vicuna:
            pieces = self._start()
            for user, answer in turns:
                self._user_turn(pieces, user, pending)
                if answer is not None:
                    pieces.text([*self._tokenize(answer), self.ids.eos], supervised=supervised)
            return pieces
        pieces = _Pieces(self.num_codebooks)
        pieces.text([] if self.ids.bos is None else [self.ids.bos], supervised=False)
        prefix = f"{self.config.system_prompt} " if self.config.system_prompt else ""
        for user, answer in turns:
            if not user.strip():
                raise ValueError("expected a non-empty prompt / question, got an empty string")
            self._text_with_images(
                pieces, prefix + self.config.prompt_template.replace("{prompt}", user), pending
            )
            prefix = ""
            if answer is not None:
                pieces.text([*self._tokenize(answer.strip()), self.ids.eos], supervised=supervised)
        return pieces

    def understanding(self, turns: Sequence[tuple[str, str]], codes: Sequence[torch.Tensor]) -> TokenSequence:
        """A training sequence for image(s) -> text; loss on the answers and their ``</s>``."""
        if not turns:
            raise ValueError("expected at least one (question, answer) turn")
        return self._finish(self._turns(turns, codes, supervised=True), truncatable=False)

    def chat_prompt(self, messages: Sequence[dict[str, str]], codes: Sequence[torch.Tensor]) -> TokenSequence:
        """Inference prompt of a conversation, ending where the next assistant answer starts.

        Args:
            messages: ``{"role": "user"|"assistant", "content": str}`` dicts, alternating, starting and ending
                with a user turn.
            codes: one code grid [h,w,K] per ``<image>`` placeholder in the user turns, in order.
        """
        return self._finish(self._turns(check_messages(messages), codes, supervised=False), truncatable=False)

    def generation(self, prompt: str, codes_hwK: torch.Tensor, uncond: bool = False) -> TokenSequence:
        """A training sequence for text -> image; ``uncond`` swaps the prompt for the unconditional one."""
        pieces = self._generation_prompt_pieces(prompt, uncond)
        self.check_codes(codes_hwK)
        pieces.visual_positions(self.ids.image, rearrange(codes_hwK, "h w k -> (h w) k"), supervised=True)
        pieces.text([self.ids.eoi, self.ids.eos], supervised=True)
        return self._finish(pieces, truncatable=False)

    def _generation_prompt_pieces(self, prompt: str, uncond: bool = False) -> _Pieces:
        """The prompt part of a text -> image sequence, ending with ``<boi>``."""
        if not uncond and self.config.image_token in prompt:
            raise ValueError(f"a text-to-image prompt cannot contain {self.config.image_token}")
        if not uncond and not prompt.strip():
            raise ValueError("expected a non-empty prompt / question, got an empty string")
        text = self.config.uncond_prompt if uncond else prompt + self.config.t2i_suffix
        if self.vicuna:
            pieces = _Pieces(self.num_codebooks)
            bos = [] if self.ids.bos is None else [self.ids.bos]
            pieces.text([*bos, *self._tokenize(text)], supervised=False)
            # The released model is trained to predict <boi> after the prompt.
            pieces.text([self.ids.boi], supervised=True)
            return pieces
        pieces = self._start()
        self._user_turn(pieces, text, [], allow_empty=uncond)
        pieces.text([self.ids.boi], supervised=False)
        return pieces

    def generation_prompt(self, prompt: str, uncond: bool = False) -> TokenSequence:
        """Inference prompt for text -> image (ends with ``<boi>``; the first visual position comes next)."""
        return self._finish(self._generation_prompt_pieces(prompt, uncond), truncatable=False)

    def understanding_prompt(self, question: str, codes: Sequence[torch.Tensor]) -> TokenSequence:
        """Inference prompt for image(s) -> text, ending where the answer starts."""
        return self.chat_prompt([{"role": "user", "content": question}], codes)


def check_messages(messages: Sequence[dict[str, str]]) -> list[tuple[str, str | None]]:
    """Validate chat messages and pair them as (user, answer) turns; the last answer is ``None``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(
            'expected messages as a non-empty list of {"role": "user"|"assistant", "content": str} dicts, '
            f"got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != want:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(
                f"messages must alternate user/assistant starting with a user turn; message {i} should have "
                f"role {want!r}, got {got!r}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {i} needs a str 'content', got {type(message.get('content')).__name__}"
            )
    if len(messages) % 2 == 0:
        raise ValueError("the last message must be a user turn (the model answers it)")
    users = [m["content"] for m in messages[::2]]
    answers: list[str | None] = [m["content"] for m in messages[1::2]]
    return list(zip(users, [*answers, None]))


def pad_sequences(seqs: Sequence[TokenSequence], pad_id: int, side: str = "right") -> MLLMBatch:
    """Pad sequences to the longest one (``side`` "right" for training, "left" for generation prompts)."""
    if not seqs:
        raise ValueError("expected at least one sequence to pad")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in seqs)
    fills = {
        "input_ids": pad_id,
        "labels": IGNORE_INDEX,
        "visual_mask": False,
        "code_mask": False,
        "codes": 0,
    }
    out: dict[str, list[torch.Tensor]] = {name: [] for name in [*fills, "attention_mask"]}
    for s in seqs:
        n = length - len(s)
        for name, fill in fills.items():
            value = getattr(s, name)
            pad = torch.full((n, *value.shape[1:]), fill, dtype=value.dtype)
            out[name].append(torch.cat([value, pad] if side == "right" else [pad, value]))
        real, pad = torch.ones(len(s), dtype=torch.long), torch.zeros(n, dtype=torch.long)
        out["attention_mask"].append(torch.cat([real, pad] if side == "right" else [pad, real]))
    return MLLMBatch(**{name: torch.stack(values) for name, values in out.items()})


class MLLMCollator:
    """Builds and right-pads a mixed batch of :class:`TextSample`, :class:`UnderstandingSample` and
    :class:`GenerationSample`.

    A fraction ``cfg_dropout`` (default: the config's) of generation samples get the unconditional prompt, drawn
    with ``generator`` (or torch's global generator, which DataLoader workers seed differently).
    """

    def __init__(
        self,
        builder: SequenceBuilder,
        cfg_dropout: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.builder = builder
        self.cfg_dropout = builder.config.cfg_dropout if cfg_dropout is None else cfg_dropout
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        self.generator = generator

    def build(self, sample: TextSample | UnderstandingSample | GenerationSample) -> TokenSequence:
        """The :class:`TokenSequence` of one sample (the CFG drop is drawn here)."""
        if isinstance(sample, TextSample):
            return self.builder.text(sample.text)
        if isinstance(sample, UnderstandingSample):
            return self.builder.understanding(sample.turns, sample.codes)
        if isinstance(sample, GenerationSample):
            uncond = bool(torch.rand((), generator=self.generator) < self.cfg_dropout)
            return self.builder.generation(sample.prompt, sample.codes, uncond=uncond)
        raise ValueError(
            f"expected TextSample, UnderstandingSample or GenerationSample, got {type(sample).__name__}"
        )

    def __call__(self, samples: Sequence[TextSample | UnderstandingSample | GenerationSample]) -> MLLMBatch:
        return pad_sequences([self.build(s) for s in samples], self.builder.ids.pad, side="right")
