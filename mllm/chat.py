"""Text generation with a :class:`~unitok.mllm.model.UniTokMLLM`: image(s) + question -> text.

:func:`chat`, :func:`chat_stream` and :func:`answer` run ``transformers``' ``generate`` on the input embeddings of
the prompt built by :meth:`~unitok.mllm.sequence.SequenceBuilder.chat_prompt`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from unitok.mllm.generation import check_sampling
from unitok.mllm.sequence import TokenSequence, check_messages, pad_sequences

if TYPE_CHECKING:
    from unitok.mllm.model import UniTokMLLM


def _as_image_list(images: Any) -> list[Any]:
    """None, one image / code grid, a batched tensor, or a list -> a list of single images / code grids."""
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        return list(images) if images.ndim == 4 and images.shape[0] > 1 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def chat_sequence(model: UniTokMLLM, messages: Sequence[dict[str, str]], images: Any = None) -> TokenSequence:
    """The prompt of a conversation with its images placed (see :meth:`UniTokMLLM.chat`)."""
    turns = check_messages(messages)
    items = _as_image_list(images)
    placeholder = model.config.image_token
    found = sum(user.count(placeholder) for user, _ in turns)
    messages = [dict(m) for m in messages]
    if items and found == 0:
        messages[0]["content"] = placeholder * len(items) + "\n" + messages[0]["content"]
    elif found != len(items):
        raise ValueError(
            f"the user turns hold {found} {placeholder} placeholder(s) but {len(items)} image(s) were given; "
            f"write one {placeholder} per image, or none to put the images before the first user turn"
        )
    codes = [model.to_codes(item) for item in items]
    return model.builder.chat_prompt(messages, codes)


def _generate_kwargs(
    model: UniTokMLLM,
    seqs: list[TokenSequence],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    use_cache: bool,
) -> dict[str, Any]:
    batch = pad_sequences(seqs, model.builder.ids.pad, side="left").to(model.device)
    limit = model.context_length
    if limit is not None and batch.input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {batch.input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the LLM's "
            f"context of {limit} positions"
        )
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
    return kwargs


def _check_text_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    check_sampling(temperature, 0, top_p)


def _decode(model: UniTokMLLM, out: torch.Tensor) -> list[str]:
    # With inputs_embeds only, generate returns just the new tokens.
    return [text.strip() for text in model.text_tokenizer.batch_decode(out, skip_special_tokens=True)]


def _start_chat(
    model: UniTokMLLM,
    messages: Sequence[dict[str, str]],
    images: Any,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[dict[str, Any], bool]:
    """Check a conversation and put the model in eval mode: the ``generate`` arguments and the former training flag.

    The caller restores the flag after generating; a refused input restores it here.
    """
    _check_text_options(max_new_tokens, temperature, top_p)
    was_training = model.training
    model.eval()
    try:
        seq = chat_sequence(model, messages, images)
        kwargs = _generate_kwargs(model, [seq], max_new_tokens, temperature, top_p, use_cache=True)
    except BaseException:
        model.train(was_training)
        raise
    return kwargs, was_training


def chat(
    model: UniTokMLLM,
    messages: Sequence[dict[str, str]],
    images: Any = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any = None,
) -> str:
    """See :meth:`UniTokMLLM.chat`."""
    kwargs, was_training = _start_chat(model, messages, images, max_new_tokens, temperature, top_p)
    if streamer is not None:
        kwargs["streamer"] = streamer
    try:
        with torch.no_grad():
            out = model.llm.generate(**kwargs)
    finally:
        model.train(was_training)
    return _decode(model, out)[0]


def chat_stream(
    model: UniTokMLLM,
    messages: Sequence[dict[str, str]],
    images: Any = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any = None,
) -> Iterator[str]:
    """See :meth:`UniTokMLLM.chat_stream`. Every input is checked before the first piece is yielded."""
    kwargs, was_training = _start_chat(model, messages, images, max_new_tokens, temperature, top_p)
    return _stream(model, kwargs, was_training, extra=streamer)


def answer(
    model: UniTokMLLM,
    images_or_codes: Any,
    questions: str | Sequence[str],
    max_new_tokens: int = 64,
    stream: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    stop: Sequence[str] = (),
) -> list[str] | Iterator[str]:
    """Image(s) + question -> answer text: one-turn :func:`chat` per question, run as one batch.

    Args:
        model: the MLLM.
        images_or_codes: per question one of: a PIL image, a path, an image tensor [3,H,W] / [1,3,H,W] in
            [-1,1], a code grid [h,w,K], or None (text only); also a batched tensor [B,3,H,W] / [B,h,w,K]; or
            None for all.
        questions: one question or a list; ``<image>`` marks where the image goes (prepended when missing).
        max_new_tokens: answer length limit in tokens.
        stream: yield the answer text piece by piece (one question only) instead of returning it.
        temperature, top_p: sampling (temperature 0 = greedy).
        use_cache: the LLM KV cache (False recomputes the prefix at each token; for tests).
        stop: strings that end an answer: each answer stops being generated once its text (leading whitespace
            removed, as in the returned answer) holds one of them, while the others of the batch go on. The stop
            string itself may still be at the end of the returned text; the caller cuts it off.

    Returns:
        the answers (special tokens removed, stripped), or an iterator of text pieces when ``stream``.
    """
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise ValueError("expected at least one question, got none")
    _check_text_options(max_new_tokens, temperature, top_p)
    if stream and len(questions) != 1:
        raise ValueError(f"stream=True answers one question at a time, got {len(questions)}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be non-empty strings, got {stop!r}")
    items = _per_question(images_or_codes, len(questions))
    placeholder = model.config.image_token
    for question in questions:
        if not isinstance(question, str) or not question.replace(placeholder, "").strip():
            raise ValueError(f"expected a non-empty question, got {question!r}")
    seqs = [
        chat_sequence(model, [{"role": "user", "content": q}], None if item is None else [item])
        for q, item in zip(questions, items)
    ]
    was_training = model.training
    model.eval()
    try:
        kwargs = _generate_kwargs(model, seqs, max_new_tokens, temperature, top_p, use_cache)
        if stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopAtText(model.text_tokenizer, stop)])
        if stream:
            return _stream(model, kwargs, was_training)
        with torch.no_grad():
            out = model.llm.generate(**kwargs)
    finally:
        if not stream:
            model.train(was_training)
    return _decode(model, out)


class StopAtText(StoppingCriteria):
    """Marks a row of a ``generate`` batch done once its new text, left-stripped, contains one of ``stop``.

    ``generate`` on input embeddings hands the criterion only the new tokens; a finished row is then padded while
    the rest of the batch goes on. Decoding a row's text costs microseconds next to an LLM step.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = [any(s in text.lstrip() for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _per_question(images_or_codes: Any, n: int) -> list[Any]:
    """The visual input of :func:`answer` as one item (image, code grid or None) per question."""
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
    return items


class _TeeStreamer:
    """Forwards the tokens ``generate`` produces to several streamers."""

    def __init__(self, *streamers: Any) -> None:
        self.streamers = streamers

    def put(self, value: torch.Tensor) -> None:
        for streamer in self.streamers:
            streamer.put(value)

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()


def _stream(
    model: UniTokMLLM, kwargs: dict[str, Any], was_training: bool, extra: Any = None
) -> Iterator[str]:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.text_tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.llm.generate(
                    **kwargs, streamer=streamer if extra is None else _TeeStreamer(streamer, extra)
                )
        except BaseException as err:  # re-raised in the consumer's thread
            errors.append(err)
            streamer.end()

    def pieces() -> Iterator[str]:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            thread.join()
            model.train(was_training)
        if errors:
            raise errors[0]

    return pieces()
