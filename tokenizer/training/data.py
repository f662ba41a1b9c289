"""The trainer's data stream: image-text micro-batches from a position, reproducible across restarts.

Both readers of ``unitok.data`` are supported: ``ImageTextFolder`` (map-style, ``format: folder``) and
``ImageTextWebDataset`` (tar shards, ``format: webdataset``). Every process reads its own share and
yields ``batches_per_epoch`` micro-batches of ``local_batch_size`` per epoch, the same number on every
process (a process whose shards run dry starts them over), so no process waits for another.

Reproducibility: the random crop of every sample runs under its own seed, derived from the run seed,
the epoch and the sample's index (folder) or its place in this worker's stream (shards). Results thus
depend neither on the number of DataLoader workers nor on the global RNG, and a resumed run sees the
same crops as an uninterrupted one: the folder reader jumps straight to the position (its sampler is a
seeded permutation per epoch), the shard reader replays the epoch up to it (``data.resume: exact``) or
starts a freshly shuffled one (``reseed``).

Corrupt samples are skipped by the readers; each sample carries how many were skipped before it, so
the counts of all DataLoader workers reach the trainer (``BatchStream.skipped``); skips after a
worker's last sample travel in a final image-less item, and the partial batches at the end of a
worker's shards are dropped but their skip counts kept. A pass over the shards that gives not one
full batch (every shard unreadable, say) stops the run with an error instead of starting them over
forever.

Batches travel as uint8 (a quarter of the pinned memory and of the host-to-device copy) whenever the
[-1,1] floats of the transform are exactly the 256 values of 8-bit pixels, and become those same floats
on the training device (``BatchStream.next``), bit for bit; any other batch travels as floats.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from unitok.data.datasets import IMAGE_EXTENSIONS, ImageTextFolder, ImageTextWebDataset, expand_urls, is_url
from unitok.data.negatives import WordSwap
from unitok.data.transforms import train_transform
from unitok.tokenizer.text import tokenize

from .checkpointing import TrainingError
from .config import DataSection
from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPosition:
    """Where a process stands in the data: ``epoch`` and micro-batches consumed in it (per process)."""

    epoch: int
    batch_in_epoch: int


def sample_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (run seed, epoch, index, ...)."""
    low, high = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def _seeded_call(seed: int, fn: Any, *args: Any) -> Any:
    # A private torch RNG stream per sample: the global stream of the process stays untouched. Only the CPU
    # generator is seeded (what the CPU-side transforms draw from): ``torch.manual_seed`` would also queue a
    # lazy seed for every accelerator backend, recording a stack trace each time (~2 ms per sample).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn(*args)


class _SeededFolder(Dataset):
    """``ImageTextFolder`` indexed by ``(epoch, index)``; returns ``(img, caption, skipped before it)``."""

    def __init__(self, folder: ImageTextFolder, seed: int):
        self.folder = folder
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str, int]:
        epoch, index = key
        before = self.folder.skipped.total
        img, caption = _seeded_call(sample_seed(self.seed, epoch, index), self.folder.__getitem__, index)
        return img, caption, self.folder.skipped.total - before


class EpochSampler(Sampler):
    """A seeded permutation of ``range(dataset_size)`` per epoch, split over processes, from a start.

    Process ``rank`` takes every ``world_size``-th index of the permutation and yields ``(epoch, index)``
    for the first ``samples_per_epoch`` of its share, skipping the first ``start``.
    """

    def __init__(
        self,
        dataset_size: int,
        samples_per_epoch: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
    ):
        if samples_per_epoch * world_size > dataset_size:
            raise ValueError(
                f"an epoch of {samples_per_epoch} samples on each of {world_size} processes needs "
                f"{samples_per_epoch * world_size} samples, the dataset has {dataset_size}"
            )
        self.dataset_size, self.samples_per_epoch = dataset_size, samples_per_epoch
        self.rank, self.world_size, self.seed, self.epoch, self.start = rank, world_size, seed, epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.dataset_size, generator=generator)
        mine = order[self.rank :: self.world_size][self.start : self.samples_per_epoch]
        return ((self.epoch, i) for i in mine.tolist())

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


class _SeededShards(IterableDataset):
    """``ImageTextWebDataset`` whose samples are transformed under per-sample seeds; yields
    ``(img, caption, skipped before it)``. ``stream_seed`` varies per epoch (and per restart)."""

    def __init__(self, shards: ImageTextWebDataset, stream_seed: int):
        super().__init__()
        self.shards = shards
        self.stream_seed = stream_seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        samples = iter(self.shards)
        count, before = 0, self.shards.skipped.total
        while True:
            try:
                img, caption = _seeded_call(sample_seed(self.stream_seed, worker, count), next, samples)
            except StopIteration:
                trailing = self.shards.skipped.total - before
                if trailing:
                    yield None, "", trailing
                return
            count += 1
            skipped, before = self.shards.skipped.total - before, self.shards.skipped.total
            yield img, caption, skipped


# Batches each DataLoader worker prepares ahead (they wait in shared memory, /dev/shm on Linux).
PREFETCH_BATCHES = 4
# Draft-decoded JPEGs keep both sides at least this many times the training size.
JPEG_DRAFT_FACTOR = 2


def check_shared_memory(
    num_workers: int, local_batch_size: int, image_size: int, shm: str = "/dev/shm"
) -> int | None:
    """Warn when ``shm`` has less free space than twice the DataLoader's prefetched batches (uint8 pixels):
    workers that cannot place a batch there die with a bus error. Returns the bytes needed (None without
    workers or without ``shm``)."""
    if num_workers == 0 or not os.path.isdir(shm):
        return None
    needed = num_workers * PREFETCH_BATCHES * local_batch_size * 3 * image_size**2
    free = shutil.disk_usage(shm).free
    if free < 2 * needed:
        log.warning(
            "%s has %.0f MiB free; %d DataLoader workers x %d prefetched batches of %d images at %d px hold "
            "about %.0f MiB there. Workers may die with a bus error: enlarge it (docker run --shm-size) or "
            "lower data.num_workers",
            shm,
            free / 2**20,
            num_workers,
            PREFETCH_BATCHES,
            local_batch_size,
            image_size,
            needed / 2**20,
        )
    return needed


def _pm1_table() -> torch.Tensor:
    """``[256]`` float32: the [-1,1] value ``to_pm1`` gives each 8-bit pixel, by the same ops (bit-identical)."""
    return torch.arange(256).to(torch.uint8).float().div(255).mul_(2.0).sub_(1.0)


_PM1_TABLE = _pm1_table()
_PM1_TABLES: dict[torch.device, torch.Tensor] = {}


def pack_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1,1] -> the uint8 pixels they came from, or ``images`` unchanged when some value is
    not exactly one of ``to_pm1``'s 256 (e.g. a transform that resized the float tensor)."""
    pixels = images.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels if torch.equal(_PM1_TABLE[pixels.int()], images) else images


def unpack_uint8(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Inverse of ``pack_uint8`` on ``device``: uint8 pixels -> [-1,1] float32 by table look-up (no
    device arithmetic, so equal bit for bit to the CPU transform); float batches are only moved."""
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    if images.device not in _PM1_TABLES:
        # Copied once per device: a copy per batch from pageable memory would stall the host each step.
        _PM1_TABLES[images.device] = _PM1_TABLE.to(images.device)
    return _PM1_TABLES[images.device][images.int()]


class _Collate:
    """Stack images (as uint8 when lossless), tokenize captions (open_clip BPE, in the worker), sum the skip counts.

    With ``WordSwap`` vocabularies each caption also gets one hard negative per vocabulary (one word swapped)
    and the text ids become ``[B, 1 + N, T]``: the caption, then its N negatives, an all-zero row where no word
    of the caption can be swapped. The swaps are drawn from a generator seeded by the batch's captions, so a
    resumed run draws the same ones.
    """

    def __init__(self, context_length: int, negatives: list[WordSwap] | None = None):
        self.context_length = context_length
        self.negatives = negatives or []

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = tokenize(captions, self.context_length)
        if not self.negatives:
            return ids
        rng = np.random.default_rng(zlib.crc32("\n".join(captions).encode("utf-8")))
        rows = [ids]
        for swap in self.negatives:
            swapped = [swap.negative(caption, rng) for caption in captions]
            found = [i for i, text in enumerate(swapped) if text is not None]
            negative_ids = torch.zeros_like(ids)
            if found:
                negative_ids[found] = tokenize([swapped[i] for i in found], self.context_length)
            rows.append(negative_ids)
        return torch.stack(rows, dim=1)

    def __call__(
        self, samples: list[tuple[torch.Tensor, str, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        skipped = torch.tensor(sum(item[2] for item in samples))
        samples = [item for item in samples if item[0] is not None]
        if not samples:  # only the skip count of a worker's last shards
            return (
                torch.empty(0, dtype=torch.uint8),
                torch.empty(
                    0,
                    *((1 + len(self.negatives),) if self.negatives else ()),
                    self.context_length,
                    dtype=torch.long,
                ),
                skipped,
            )
        images, captions, _ = zip(*samples)
        return pack_uint8(torch.stack(images)), self._tokenize(list(captions)), skipped


def count_shard_samples(shards: list[str]) -> int:
    """Samples (keys with an image member) in local tar shards, read from the headers only."""
    remote = [shard for shard in shards if is_url(shard)]
    if remote:
        raise ValueError(
            f"data.samples_per_epoch must be set for remote shards ({remote[0]}, ...): counting them would "
            "download every shard"
        )
    total = 0
    for shard in shards:
        keys = set()
        try:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    folder, name = member.name.rsplit("/", 1) if "/" in member.name else ("", member.name)
                    stem, _, ext = name.partition(".")
                    if member.isfile() and f".{ext.lower()}" in IMAGE_EXTENSIONS:
                        keys.add((folder, stem))
        except (tarfile.TarError, OSError, EOFError) as err:
            log.warning("could not count the samples of %s (%s); it counts as empty", shard, err)
        total += len(keys)
    return total


def prepare_synth_world(section: DataSection, info: DistInfo) -> None:
    """Write the synthetic world to the folder ``section.path`` when ``section.synth`` asks for it
    (explicitly: nothing is generated without it) and no world is there yet; a missing ``data.path``
    without ``data.synth`` is an error naming it."""
    path = Path(section.path)
    if section.synth is None:
        if not is_url(section.path) and not _is_pattern(section.path) and not path.exists():
            raise FileNotFoundError(
                f"data.path {section.path} does not exist; point it at your data, or set data.synth (e.g. "
                "--set 'data.synth={num_images: 6000, size: 64}') to generate the synthetic world there"
            )
        return
    if _is_pattern(section.path) or is_url(section.path) or path.suffix == ".tar":
        raise ValueError(
            f"data.synth writes a synthetic world into a folder, but data.path {section.path!r} is a shard "
            "pattern or URL; set data.path to the world's folder (its shards/{split}-*.tar are read)"
        )
    if info.is_main and not (path / "metadata.json").is_file():
        from unitok.data.synth import SynthConfig, generate_world

        log.info("writing the synthetic world to %s", path)
        generate_world(path, SynthConfig(**section.synth))
    barrier(info)


def _is_pattern(path: str) -> bool:
    return any(char in path for char in "{}*?[")


def shard_source(section: DataSection) -> str:
    """Where the shards of ``format: webdataset`` are: ``data.path``, or for a synthetic world's folder its
    ``shards/{split}-*.tar``."""
    path = Path(section.path)
    if not is_url(section.path) and (path / "metadata.json").is_file() and (path / "shards").is_dir():
        return str(path / "shards" / f"{section.split}-*.tar")
    return section.path


class BatchStream:
    """Endless micro-batches ``(img_B3HW in [-1,1], text ids [B, context_length])`` from a ``DataPosition``
    (text ids ``[B, 1 + N, context_length]`` with ``data.negative_words``: each caption and its N hard negatives).

    Attributes:
        batches_per_epoch: micro-batches per process per epoch.
        dataset_size: samples in one epoch's source (images of the folder, or in the shards).
    """

    def __init__(
        self,
        section: DataSection,
        dataset: ImageTextFolder | ImageTextWebDataset,
        dataset_size: int,
        local_batch_size: int,
        grad_accum: int,
        seed: int,
        info: DistInfo,
        position: DataPosition,
        context_length: int,
        resumed: bool,
        negatives: list[WordSwap] | None = None,
    ):
        self.section = section
        self.dataset = dataset
        self.dataset_size = dataset_size
        self.local_batch_size = local_batch_size
        self.seed = seed
        self.info = info
        self.collate = _Collate(context_length, negatives)
        epoch_samples = section.samples_per_epoch or dataset_size
        steps_per_epoch = epoch_samples // (local_batch_size * info.world_size * grad_accum)
        if steps_per_epoch < 1:
            raise ValueError(
                f"an epoch of {epoch_samples} samples is smaller than one global batch of "
                f"{local_batch_size * info.world_size * grad_accum}; use more data or a smaller batch"
            )
        self.batches_per_epoch = steps_per_epoch * grad_accum
        self._skipped = 0
        self._epoch, self._batch = position.epoch, position.batch_in_epoch
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        self._restarts = 0
        self._batches_this_pass = self._batch if resumed else 0
        self._iterator = self._open(fast_forward=resumed and self._batch > 0)

    def _loader(self, dataset: Dataset, sampler: Sampler | None, loader_seed: int) -> DataLoader:
        workers = self.section.num_workers
        return DataLoader(
            dataset,
            batch_size=self.local_batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self.collate,
            # Shards: a worker's partial last batch still carries skip counts (``_read`` drops it).
            drop_last=sampler is not None,
            pin_memory=self.info.device.type == "cuda",
            generator=torch.Generator().manual_seed(loader_seed),
            persistent_workers=False,
            prefetch_factor=PREFETCH_BATCHES if workers else None,
        )

    def _open(self, fast_forward: bool) -> Iterator:
        """An iterator over the rest of the current epoch (or, for shards that ran dry, a restart of them)."""
        loader_seed = sample_seed(self.seed, self._epoch, self._restarts, self.info.rank)
        if isinstance(self.dataset, ImageTextFolder):
            sampler = EpochSampler(
                self.dataset_size,
                self.batches_per_epoch * self.local_batch_size,
                self.info.rank,
                self.info.world_size,
                self.seed,
                self._epoch,
                start=self._batch * self.local_batch_size,
            )
            return iter(self._loader(_SeededFolder(self.dataset, self.seed), sampler, loader_seed))
        reseed = fast_forward and self.section.resume == "reseed"
        stream_seed = sample_seed(
            self.seed, self._epoch, self._restarts, self.info.rank, self._batch if reseed else 0
        )
        self.dataset.set_epoch(
            sample_seed(self.seed, self._epoch, self._restarts, self._batch if reseed else 0)
        )
        iterator = iter(self._loader(_SeededShards(self.dataset, stream_seed), None, loader_seed))
        if fast_forward and not reseed:
            # The checkpoint's skip count already holds the skips of the replayed part.
            counted = self._skipped
            for _ in range(self._batch):
                self._read(iterator)
            self._skipped = counted
        return iterator

    def _read(self, iterator: Iterator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The next full micro-batch of ``iterator``; partial ones (a worker's last samples) only add
        their skip count. Raises StopIteration at the end of the pass."""
        while True:
            images, ids, skipped = next(iterator)
            if images.shape[0] == self.local_batch_size:
                return images, ids, int(skipped)
            self._skipped += int(skipped)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this process: images ``[B,3,S,S]`` in [-1,1] already on the training
        device, text ids ``[B,T]`` (``[B,1+N,T]`` with N hard negatives) on the CPU."""
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch, self._restarts = self._epoch + 1, 0, 0
            self._iterator = self._open(fast_forward=False)
            self._batches_this_pass = 0
        try:
            images, ids, skipped = self._read(self._iterator)
        except StopIteration:
            if self._batches_this_pass == 0:
                raise TrainingError(
                    f"a whole pass over the shards of {self.section.path} gave rank {self.info.rank} not one "
                    f"batch of {self.local_batch_size} samples ({self._skipped} corrupt samples or shards "
                    "skipped so far; unreadable and truncated shards are logged as bad_shard); check the "
                    "shards and the batch size"
                ) from None
            # Shards of this process ran dry before the epoch's batch count: start them over.
            self._restarts += 1
            self._iterator = self._open(fast_forward=False)
            self._batches_this_pass = 0
            return self.next()
        self._batches_this_pass += 1
        self._batch += 1
        self._skipped += skipped
        return unpack_uint8(images, self.info.device), ids

    def position(self) -> DataPosition:
        """The position after the last micro-batch returned."""
        return DataPosition(self._epoch, self._batch)

    def skipped(self) -> int:
        """Corrupt samples skipped by this process's readers (all its DataLoader workers) so far."""
        return self._skipped


def build_stream(
    section: DataSection,
    *,
    image_size: int,
    context_length: int,
    local_batch_size: int,
    grad_accum: int,
    seed: int,
    info: DistInfo,
    position: DataPosition,
    resumed: bool,
    negatives: list[WordSwap] | None = None,
) -> BatchStream:
    """Open the reader that ``section`` names and wrap it in a ``BatchStream`` at ``position``; with
    ``negatives`` each caption comes with one hard negative per vocabulary."""
    transform = train_transform(image_size, scale=section.crop_scale, interpolation=section.interpolation)
    draft = JPEG_DRAFT_FACTOR * image_size if section.jpeg_draft else None
    check_shared_memory(section.num_workers, local_batch_size, image_size)
    if section.format == "folder":
        dataset = ImageTextFolder(section.path, split=section.split, transform=transform, jpeg_draft=draft)
        size = len(dataset)
    else:
        shards = expand_urls(shard_source(section))
        if not shards:
            raise ValueError(
                f"data.path {section.path!r} names no tar shards (a folder, glob or brace pattern)"
            )
        dataset = ImageTextWebDataset(
            shards,
            transform=transform,
            shuffle=section.shuffle_buffer > 0,
            shuffle_buffer=max(section.shuffle_buffer, 1),
            seed=seed,
            rank=info.rank,
            world_size=info.world_size,
            jpeg_draft=draft,
        )
        size = section.samples_per_epoch or count_shard_samples(shards)
    if size == 0:
        raise ValueError(f"data.path {section.path!r} holds no samples")
    return BatchStream(
        section,
        dataset,
        size,
        local_batch_size,
        grad_accum,
        seed,
        info,
        position,
        context_length,
        resumed,
        negatives,
    )
