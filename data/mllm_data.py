"""MLLM training data: the three sample kinds, a deterministic per-rank mixture sampler, length grouping.

Sample kinds (built into token sequences by :class:`unitok.mllm.SequenceBuilder`):

- ``understanding``: a store row's LLaVA conversation (multi-turn, ``<image>`` placeholder) over its codes;
  loss on the assistant turns only.
- ``generation``: a store row's caption -> its codes; loss on the codes and ``<eoi>``; a fraction
  ``cfg_dropout`` of them (drawn per sample and epoch from the seed) get the unconditional prompt.
- ``text``: text-only language modelling from JSON lines ``{"text": ...}``.

Every candidate is checked once, when the dataset is built (:meth:`MixtureDataset.scan`), from exact token
counts: a conversation that is malformed or has no assistant turn, or a bad text row, is skipped; an
over-long text is truncated, an over-long conversation loses its trailing turns (never its image turn), an
over-long generation sample is dropped (never cut inside its image). Everything is counted in
``dataset.summary``.

:class:`MixtureSampler` draws, per epoch, a kind for each of ``num_samples`` slots with the mixture ratios
and walks a fresh permutation of each kind, all from ``(seed, epoch)``: every rank computes the same global
order, the launcher's batch sharding gives each rank its part, and a resumed run skips to its position in
the same order. With ``group_by_length`` the order is cut into mega-batches whose samples are sorted by
length before batching (the batches are shuffled again), which cuts the padding of mixed batches.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .codes import CodeStore
from .datasets import SkipCounter, _json_lines

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("understanding", "generation", "text")
# Seeds: rng([seed, stream, ...]) keeps the draws of the sampler and of the CFG drop independent.
_STREAM_KINDS, _STREAM_ORDER, _STREAM_GROUP, _STREAM_CFG = 0, 1, 2, 3


@dataclass
class KindSummary:
    """What the scan of one sample kind found: candidates, kept, truncated, and skipped per reason."""

    candidates: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Entry:
    """One kept sample: its store row or text line, its token length, and how many turns to keep."""

    source: int
    index: int
    length: int
    turns: int = 0


def read_text_samples(path: str | Path, counter: SkipCounter) -> list[str]:
    """Texts of a JSON-lines file of ``{"text": str}`` rows; bad rows are skipped and counted."""
    out = []
    for lineno, row in _json_lines(Path(path), counter):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            counter.skip("bad_row", f"{path}:{lineno}: no 'text' string")
            continue
        out.append(text)
    return out


def conversation_turns(conversations: Any) -> list[tuple[str, str]] | None:
    """(user, assistant) pairs of LLaVA turns, or None when malformed (no assistant turn, wrong roles)."""
    if not isinstance(conversations, list) or len(conversations) < 2 or len(conversations) % 2:
        return None
    turns = []
    for i in range(0, len(conversations), 2):
        user, assistant = conversations[i], conversations[i + 1]
        if not (isinstance(user, dict) and isinstance(assistant, dict)):
            return None
        if user.get("from") != "human" or assistant.get("from") != "gpt":
            return None
        if not isinstance(user.get("value"), str) or not isinstance(assistant.get("value"), str):
            return None
        if not assistant["value"].strip():
            return None
        turns.append((user["value"], assistant["value"]))
    return turns


class MixtureDataset(Dataset):
    """Token sequences of the three sample kinds, indexed by the keys of :class:`MixtureSampler`.

    Args:
        builder: the model's :class:`~unitok.mllm.SequenceBuilder` (tokenizer, template, max length).
        stores: code store folders (rows with a conversation give understanding samples, rows with a caption
            generation samples).
        texts: JSON-lines files of text-only samples.
        seed: seeds the per-sample CFG drop.
        cfg_dropout: fraction of generation samples given the unconditional prompt (default: the config's).

    ``dataset[key]`` returns a dict of tensors (``input_ids``, ``labels``, ``visual_mask``, ``code_mask``
    [T], ``codes`` [T,K]); :func:`collate` pads a list of them into the fields of an ``MLLMBatch``.
    """

    def __init__(
        self,
        builder: Any,
        stores: Sequence[str | Path] = (),
        texts: Sequence[str | Path] = (),
        seed: int = 0,
        cfg_dropout: float | None = None,
    ) -> None:
        self.builder = builder
        self.seed = seed
        self.cfg_dropout = builder.config.cfg_dropout if cfg_dropout is None else cfg_dropout
        self.stores = [CodeStore(p) for p in stores]
        for store in self.stores:
            if (store.num_codebooks, store.codebook_size) != (builder.num_codebooks, builder.codebook_size):
                raise ValueError(
                    f"code store {store.path} holds K={store.num_codebooks}, V={store.codebook_size} codes but the "
                    f"model's UniTok has K={builder.num_codebooks}, V={builder.codebook_size}; extract with its tokenizer"
                )
        self.text_counter = SkipCounter("text samples")
        self.texts = [t for path in texts for t in read_text_samples(path, self.text_counter)]
        self.summary: dict[str, KindSummary] = {kind: KindSummary() for kind in KINDS}
        self.entries: dict[str, list[_Entry]] = {kind: [] for kind in KINDS}
        self.scan()
        self.sizes = {kind: len(self.entries[kind]) for kind in KINDS}
        self.offsets = dict(zip(KINDS, np.cumsum([0] + [self.sizes[k] for k in KINDS]).tolist()))
        self.total = int(sum(self.sizes.values()))

    # ------------------------------------------------------------------ scan: validity and exact lengths

    def _length(self, build: Any, *args: Any, **kwargs: Any) -> int | None:
        """Length of the sequence ``build(*args, **kwargs)`` makes, or None when the builder finds it over-long."""
        try:
            return self.builder.measure(build, *args, **kwargs)
        except ValueError as err:
            if "max_length" in str(err):
                return None
            raise

    def scan(self) -> None:
        """Check every candidate and measure its sequence (fills ``entries`` and ``summary``).

        Lengths come from the model's own sequence builder (zero codes of each row's grid stand in for the
        codes, which do not change lengths), so they are exact for any template.
        """
        limit = self.builder.config.max_length
        for source, store in enumerate(self.stores):
            self._scan_generation(source, store)
            self._scan_understanding(source, store)
        summary = self.summary["text"]
        summary.candidates = len(self.texts) + self.text_counter.total
        skipped = Counter(self.text_counter.counts)
        for index, text in enumerate(self.texts):
            try:
                length = self.builder.measure(self.builder.text, text)
            except ValueError:
                skipped["bad_text"] += 1
                continue
            summary.truncated += length >= limit and self._untruncated_length(text) > limit
            self.entries["text"].append(_Entry(0, index, length))
        summary.kept = len(self.entries["text"])
        summary.skipped = dict(skipped)
        for kind in KINDS:
            logger.info("%s samples: %s", kind, self.summary[kind].to_dict())

    def _untruncated_length(self, text: str) -> int:
        ids = self.builder.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + 2

    def _zeros(self, store: CodeStore, row: int) -> torch.Tensor:
        """Zero codes of the row's grid: the builder's lengths depend on the grid only."""
        return torch.zeros(
            int(store.heights[row]), int(store.widths[row]), store.num_codebooks, dtype=torch.long
        )

    def _scan_generation(self, source: int, store: CodeStore) -> None:
        summary = self.summary["generation"]
        rows = np.flatnonzero(store.has_caption)
        summary.candidates += len(rows)
        skipped: Counter[str] = Counter(summary.skipped)
        for row, caption in zip(rows, store.texts("caption", rows)):
            codes = self._zeros(store, int(row))
            try:
                length = self._length(self.builder.generation, caption, codes)
                uncond = self._length(self.builder.generation, caption, codes, uncond=True)
            except ValueError:
                skipped["bad_caption"] += 1
                continue
            # Dropped whole: an image is never cut.
            if length is None or uncond is None:
                skipped["too_long"] += 1
                continue
            self.entries["generation"].append(_Entry(source, int(row), length))
            summary.kept += 1
        summary.skipped = dict(skipped)

    def _scan_understanding(self, source: int, store: CodeStore) -> None:
        summary = self.summary["understanding"]
        rows = np.flatnonzero(store.has_conversations)
        summary.candidates += len(rows)
        skipped: Counter[str] = Counter(summary.skipped)
        image_token = self.builder.config.image_token
        for row, text in zip(rows, store.texts("conversations", rows)):
            turns = conversation_turns(json.loads(text))
            if turns is None:
                skipped["bad_conversation"] += 1
                continue
            images = [user.count(image_token) for user, _ in turns]
            codes = [self._zeros(store, int(row))]
            # Only whole trailing turns are cut, never the one holding the image.
            length, kept = None, len(turns)
            try:
                while kept > 0 and sum(images[:kept]) == 1:
                    length = self._length(self.builder.understanding, turns[:kept], codes)
                    if length is not None:
                        break
                    kept -= 1
            except ValueError:
                skipped["bad_conversation"] += 1
                continue
            if sum(images) != 1:
                skipped["bad_conversation"] += 1
                continue
            if length is None:
                skipped["too_long"] += 1
                continue
            summary.truncated += kept < len(turns)
            self.entries["understanding"].append(_Entry(source, int(row), length, kept))
            summary.kept += 1
        summary.skipped = dict(skipped)

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return self.total

    def kind_of(self, key: int) -> tuple[str, int]:
        """(kind, entry index) of a dataset key (epoch folded out)."""
        index = key % self.total
        for kind in reversed(KINDS):
            if index >= self.offsets[kind] and self.sizes[kind]:
                return kind, index - self.offsets[kind]
        raise IndexError(f"key {key} is outside a dataset of {self.total} samples")

    def length(self, key: int) -> int:
        """Token length of the sample behind ``key`` (for length grouping)."""
        kind, i = self.kind_of(key)
        return self.entries[kind][i].length

    def lengths(self) -> np.ndarray:
        """Token lengths of all samples, in key order."""
        return np.asarray([e.length for kind in KINDS for e in self.entries[kind]], dtype=np.int64)

    def _uncond(self, key: int) -> bool:
        epoch, index = divmod(key, self.total)
        draw = np.random.default_rng([self.seed, _STREAM_CFG, epoch, index]).random()
        return bool(draw < self.cfg_dropout)

    def build(self, key: int) -> Any:
        """The :class:`~unitok.mllm.sequence.TokenSequence` of ``key`` (key = epoch * len + index)."""
        kind, i = self.kind_of(key)
        entry = self.entries[kind][i]
        if kind == "text":
            return self.builder.text(self.texts[entry.index])
        record = self.stores[entry.source][entry.index]
        codes = torch.from_numpy(record.codes)
        if kind == "generation":
            return self.builder.generation(record.caption, codes, uncond=self._uncond(key))
        turns = conversation_turns(record.conversations)
        return self.builder.understanding(turns[: entry.turns], [codes])

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        seq = self.build(int(key))
        return {f.name: getattr(seq, f.name) for f in fields(seq)}


def collate(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``MixtureDataset`` items into the fields of an ``MLLMBatch`` (a dict of tensors)."""
    from unitok.mllm.sequence import TokenSequence, pad_sequences

    batch = pad_sequences([TokenSequence(**item) for item in items], pad_id, side="right")
    return {f.name: getattr(batch, f.name) for f in fields(batch)}


class Collator:
    """Picklable ``collate`` with the tokenizer's pad id (for DataLoader workers)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id)


class MixtureSampler(Sampler[int]):
    """Deterministic global order of dataset keys for one epoch (identical on every rank).

    Args:
        dataset: the :class:`MixtureDataset` (its per-kind sizes and lengths).
        ratios: kind -> weight (normalised over the kinds that have samples; a kind with weight > 0 but no
            samples is an error).
        num_samples: samples per epoch (default: the dataset's size), rounded down to a multiple of
            ``batch_size * world_size``.
        seed: the run's data seed.
        batch_size: the per-device batch size (the DataLoader's).
        world_size: processes; the launcher hands batch j to rank ``j % world_size``.
        group_by_length: sort each mega-batch of ``group_batches`` batches x ``world_size`` by length before
            cutting it into batches, then shuffle those batches.
        group_batches: batches per rank in one mega-batch.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        ratios: dict[str, float],
        num_samples: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        world_size: int = 1,
        group_by_length: bool = False,
        group_batches: int = 16,
    ) -> None:
        unknown = sorted(set(ratios) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown sample kinds {unknown} in the mixture; expected among {list(KINDS)}")
        if any(w < 0 for w in ratios.values()):
            raise ValueError(f"mixture ratios must be >= 0, got {ratios}")
        empty = [k for k, w in ratios.items() if w > 0 and dataset.sizes[k] == 0]
        if empty:
            raise ValueError(
                f"the mixture asks for {empty} but the data holds no usable sample of that kind "
                f"(scan summary: { {k: dataset.summary[k].to_dict() for k in empty} })"
            )
        weights = np.asarray([float(ratios.get(k, 0.0)) for k in KINDS])
        if weights.sum() <= 0:
            raise ValueError(f"the mixture ratios must have a positive sum, got {ratios}")
        self.dataset = dataset
        self.probs = weights / weights.sum()
        self.seed = seed
        self.batch_size = batch_size
        self.world_size = world_size
        self.group_by_length = group_by_length
        self.group_batches = group_batches
        unit = batch_size * world_size
        n = dataset.total if num_samples is None else num_samples
        self.num_samples = (n // unit) * unit
        if self.num_samples == 0:
            raise ValueError(f"an epoch of {n} samples holds no full global batch of {unit}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (the trainer calls it at each epoch start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """Dataset keys of ``epoch`` in the order they are consumed (before length grouping)."""
        kinds = np.random.default_rng([self.seed, _STREAM_KINDS, epoch]).choice(
            len(KINDS), size=self.num_samples, p=self.probs
        )
        keys = np.empty(self.num_samples, dtype=np.int64)
        for k, kind in enumerate(KINDS):
            slots = np.flatnonzero(kinds == k)
            size = self.dataset.sizes[kind]
            if not len(slots):
                continue
            passes = -(-len(slots) // size)
            picks = np.concatenate(
                [
                    np.random.default_rng([self.seed, _STREAM_ORDER, epoch, k, p]).permutation(size)
                    for p in range(passes)
                ]
            )[: len(slots)]
            keys[slots] = self.dataset.offsets[kind] + picks
        return keys + epoch * self.dataset.total

    def grouped(self, keys: np.ndarray, epoch: int) -> np.ndarray:
        """``keys`` regrouped so that each batch holds samples of similar length (batches shuffled)."""
        lengths = self.dataset.lengths()[keys % self.dataset.total]
        group = self.batch_size * self.world_size * self.group_batches
        out = []
        for g, start in enumerate(range(0, len(keys), group)):
            chunk, chunk_len = keys[start : start + group], lengths[start : start + group]
            chunk = chunk[np.argsort(-chunk_len, kind="stable")]
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            # Whole global steps (world_size consecutive batches) are shuffled, so ranks stay balanced.
            steps = [batches[i : i + self.world_size] for i in range(0, len(batches), self.world_size)]
            perm = np.random.default_rng([self.seed, _STREAM_GROUP, epoch, g]).permutation(len(steps))
            out += [b for i in perm for b in steps[i]]
        return np.concatenate(out)

    def __iter__(self) -> Iterator[int]:
        keys = self.order(self.epoch)
        if self.group_by_length:
            keys = self.grouped(keys, self.epoch)
        return iter(keys.tolist())


def padding_fraction(lengths: np.ndarray, batch_size: int) -> float:
    """Share of padding tokens when ``lengths`` (in consumption order) are cut into batches of ``batch_size``."""
    total = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        total += int(batch.sum())
        padded += int(batch.max()) * len(batch)
    return 1.0 - total / padded if padded else 0.0
