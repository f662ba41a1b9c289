"""Readers for real image-text formats (and the synthetic world written in them).

- ``ImageTextFolder``: images + JSON lines (``{"image": relative path, "caption": str, ...}``), map-style.
- ``ImageTextWebDataset``: WebDataset / DataComp tar shards (``{key}.jpg|png``, ``{key}.txt``,
  optional ``{key}.json``), iterable, split by DDP rank and then by DataLoader worker. Read with the
  standard library's ``tarfile`` in streaming mode (no dependency on the ``webdataset`` package's
  pipeline API, whose defaults change between versions); members are grouped into samples by the
  WebDataset rule (key = path up to the first dot of the file name). Shards may be local paths or
  URLs: ``http(s)://``, ``pipe:CMD``, ``gs://``, ``hf://`` ... open through webdataset's ``gopen``,
  other schemes (``s3://``) through fsspec (with its filesystem package, e.g. ``s3fs``).
- ``ClassFolder``: ImageNet-style ``root/{class}/*.png``, returns ``(img, label)``, classes sorted.
- ``read_conversations``: LLaVA conversation JSON (or JSON lines), validated.
- ``read_geneval_prompts``: GenEval ``evaluation_metadata.jsonl``, validated.

Bad data never crashes a reader: an unreadable image (whatever the decoder raises, Pillow's
``DecompressionBombError`` for a huge declared size included), a missing caption, a bad JSON line or
a truncated shard (also one cut exactly between two members) is skipped and counted in the reader's
``SkipCounter`` (``.skipped``), with a rate-limited warning. Map-style training datasets replace a bad
sample by the next readable index; for evaluation (``replace_bad=False``) they return ``None`` so that
no image is counted twice. JSON lines may start with a UTF-8 byte-order mark. Counts are per process: with
DataLoader workers each worker counts (and logs) its own skips.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .geneval import GENEVAL_TAGS
from .transforms import ImageTransform, to_pm1, to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TextTokenizer = Callable[[list[str]], Any]


class SkipCounter:
    """Counts skipped samples per reason and logs them, rate-limited.

    The first ``log_first`` skips of each reason are logged with their detail, after that only when
    the count of that reason reaches a power of ten.
    """

    def __init__(self, name: str, log_first: int = 5) -> None:
        self.name = name
        self.log_first = log_first
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, detail: str = "") -> None:
        """Record one skipped sample."""
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.log_first or _is_power_of_ten(n):
            logger.warning("%s: skipped a sample (%s, %d so far): %s", self.name, reason, n, detail)

    @property
    def total(self) -> int:
        """Skipped samples over all reasons."""
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {dict(self.counts)})"


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _open_image(source: str | Path | bytes, jpeg_draft: int | None = None) -> Image.Image:
    """Decode fully (so truncation shows now, not later in a transform) and convert to RGB.

    ``jpeg_draft``: a JPEG is decoded at the smallest of the decoder's scales (1/2, 1/4, 1/8) that keeps both
    sides at least this many pixels (``Image.draft``): a 2000 px photo for a 256 px crop decodes several
    times faster. The pixels differ slightly from a full decode followed by the resize.
    Any exception means "unreadable": decoders raise many kinds (OSError, SyntaxError, ValueError,
    Pillow's DecompressionBombError, struct.error, ...), and readers skip the file whichever it is.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        if jpeg_draft is not None and image.format == "JPEG":
            image.draft("RGB", (jpeg_draft, jpeg_draft))
        image.load()
        return to_rgb(image)


def _encode_text(text: str, tokenizer: TextTokenizer | None) -> Any:
    if tokenizer is None:
        return text
    return tokenizer([text])[0]


class ImageTextFolder(Dataset):
    """Images + JSON-lines captions: ``root/captions/{split}.jsonl`` with ``image`` relative to ``root``.

    Yields ``(img_3HW float in [-1, 1] (or what ``transform`` returns), caption str)``, or the
    caption's token ids when ``tokenizer`` (``list[str] -> [1, L]``) is given.
    Lines that are not JSON, or lack the image path or a non-empty caption, are skipped at load;
    unreadable images are replaced by the next readable index, or with ``replace_bad=False`` (for
    evaluation: no image counted twice) returned as ``None``. See ``.skipped``. Relative image paths
    are resolved against ``root``; absolute paths and paths leading out of ``root`` are allowed.
    ``jpeg_draft``: decode JPEGs at a reduced scale that keeps both sides at least this many pixels.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        replace_bad: bool = True,
        jpeg_draft: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.replace_bad = replace_bad
        self.jpeg_draft = jpeg_draft
        self.transform = transform or to_pm1
        self.tokenizer = tokenizer
        path = self.root / "captions" / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"no captions file {path}; expected root/captions/{{split}}.jsonl (see `unitok data synth`)"
            )
        self.skipped = SkipCounter(f"ImageTextFolder({path})")
        self.samples: list[tuple[Path, str]] = []
        for lineno, row in _json_lines(path, self.skipped):
            image, text = row.get(image_key), row.get(caption_key)
            if not isinstance(image, str) or not image:
                self.skipped.skip("missing_image_path", f"line {lineno}")
            elif not isinstance(text, str) or not text.strip():
                self.skipped.skip("missing_caption", f"line {lineno}")
            else:
                self.samples.append((self.root / image, text))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        for offset in range(len(self.samples)):
            path, text = self.samples[(index + offset) % len(self.samples)]
            try:
                image = _open_image(path, self.jpeg_draft)
            except Exception as err:
                self.skipped.skip("bad_image", f"{path}: {type(err).__name__}: {err}")
                if not self.replace_bad:
                    return None
                continue
            return self.transform(image), _encode_text(text, self.tokenizer)
        raise RuntimeError(f"no readable image in {self.root} split {self.split!r} ({self.skipped})")


def _json_lines(path: Path, counter: SkipCounter) -> Iterator[tuple[int, dict]]:
    # utf-8-sig: a byte-order mark (as some editors write) would otherwise break the first line.
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                counter.skip("bad_json", f"{path}:{lineno}: {err}")
                continue
            if not isinstance(row, dict):
                counter.skip("bad_json", f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row


_URL = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]+://)")


def is_url(shard: str) -> bool:
    """Whether ``shard`` is a URL (``scheme://...`` or ``pipe:CMD``) rather than a local path."""
    return bool(_URL.match(str(shard))) and not str(shard).startswith("file://")


def open_shard(shard: str):
    """A binary stream of one shard: a local file, a ``gopen`` URL (``http(s)``, ``pipe:``, ``gs``, ``hf``,
    ...) or an fsspec URL (``s3://`` and other schemes gopen lacks)."""
    shard = str(shard)
    if shard.startswith("file://"):
        shard = shard[len("file://") :]
    if not is_url(shard):
        return open(shard, "rb")
    from webdataset.gopen import gopen, gopen_schemes

    scheme = "pipe" if shard.startswith("pipe:") else shard.split("://", 1)[0]
    if scheme in gopen_schemes:
        return gopen(shard, "rb")
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"reading {shard} needs fsspec (pip install fsspec s3fs)") from None
    return fsspec.open(shard, "rb").open()


def expand_urls(urls: str | Path | list[str | Path]) -> list[str]:
    """Shard paths from a brace pattern (``train-{000000..000009}.tar``), a glob, a folder of .tar, or a list.

    URLs (``s3://``, ``https://``, ``pipe:``) are brace-expanded only: they are not listed or globbed.
    """
    items = urls if isinstance(urls, list | tuple) else [urls]
    found: list[str] = []
    for item in items:
        item = str(item)
        if is_url(item):
            found += list(braceexpand(item))
            continue
        if os.path.isdir(item):
            found += sorted(glob.glob(os.path.join(item, "*.tar")))
            continue
        for pattern in braceexpand(item):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            found += matches
    return found


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        resolved = (rank, world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        resolved = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    else:
        resolved = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if not 0 <= resolved[0] < resolved[1]:
        raise ValueError(f"expected 0 <= rank < world_size, got rank {resolved[0]} of {resolved[1]}")
    return resolved


class ImageTextWebDataset(IterableDataset):
    """Image-text pairs from WebDataset tar shards, for DataLoader workers and DDP ranks.

    Shards are split first by rank (``shards[rank::world_size]``), then by DataLoader worker, so every
    shard is read by exactly one process per epoch; use at least ``world_size * num_workers`` shards
    (a process left without shards logs a warning and yields nothing). Ranks read whole shards, so
    their sample counts differ by up to a shard; a DDP trainer bounds its steps per epoch by the
    smallest share. With ``shuffle=True`` the
    shard order is permuted per epoch (``set_epoch``) with the same seed on every rank, and samples
    pass through a shuffle buffer of ``shuffle_buffer``.

    Yields ``(img, caption)`` like ``ImageTextFolder``, plus the sample's parsed ``.json`` when
    ``return_json``. A truncated shard, a sample without image or caption, an undecodable image or
    (with ``return_json``) a bad JSON member is skipped and counted in ``.skipped``. ``jpeg_draft`` as in
    ``ImageTextFolder``.
    """

    def __init__(
        self,
        urls: str | Path | list[str | Path],
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        *,
        image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
        text_key: str = "txt",
        return_json: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        jpeg_draft: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_urls(urls)
        self.jpeg_draft = jpeg_draft
        if not self.shards:
            raise ValueError(
                f"no tar shards found for {urls!r}; expected a brace pattern, glob, folder or list of .tar files"
            )
        self.transform = transform or to_pm1
        self.tokenizer = tokenizer
        self.image_keys = image_keys
        self.text_key = text_key
        self.return_json = return_json
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.skipped = SkipCounter(f"ImageTextWebDataset({len(self.shards)} shards)")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard and sample shuffle (call before each epoch, on every rank)."""
        self.epoch = epoch

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` reads this epoch."""
        shards = list(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.shards_for(worker, num_workers)
        if not shards:
            logger.warning(
                "rank %d worker %d has no shard to read (%d shards for %d ranks x %d workers)",
                self.rank,
                worker,
                len(self.shards),
                self.world_size,
                num_workers,
            )
        raw = (
            (shard, key, members)
            for shard in shards
            for key, members in iter_tar_samples(shard, self.skipped)
        )
        if self.shuffle and self.shuffle_buffer > 1:
            # Shuffle encoded samples: a buffer of decoded images would cost far more memory.
            raw = _shuffled(
                raw, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            )
        for shard, key, members in raw:
            sample = self._decode(shard, key, members)
            if sample is not None:
                yield sample

    def _decode(self, shard: str, key: str, members: dict[str, bytes]) -> tuple[Any, ...] | None:
        image_bytes = next((members[k] for k in self.image_keys if k in members), None)
        if image_bytes is None:
            self.skipped.skip("missing_image", f"{shard}: {key}")
            return None
        text = members.get(self.text_key, b"").decode("utf-8", errors="replace").strip()
        if not text:
            self.skipped.skip("missing_caption", f"{shard}: {key}")
            return None
        try:
            image = _open_image(image_bytes, self.jpeg_draft)
        except Exception as err:
            self.skipped.skip("bad_image", f"{shard}: {key}: {type(err).__name__}: {err}")
            return None
        out: tuple[Any, ...] = (self.transform(image), _encode_text(text, self.tokenizer))
        if self.return_json:
            try:
                meta = json.loads(members["json"])
            except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as err:
                self.skipped.skip("bad_json", f"{shard}: {key}: {err!r}")
                return None
            out = (*out, meta)
        return out


def iter_tar_samples(path: str, counter: SkipCounter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` from a tar shard, grouping consecutive members by key.

    The key is the member path up to the first dot of its file name, the extension the rest (lower
    case), as in WebDataset. ``path`` is a local file or a URL (see ``open_shard``). A shard that cannot
    be opened or breaks off (also exactly between two members, where ``tarfile`` itself sees a clean
    end: the end-of-archive block is missing) is counted as ``bad_shard``; the samples completed
    before the break are still returned.
    """
    key, members = None, {}
    try:
        with open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, name = os.path.split(info.name)
                if "." not in name or name.startswith("."):
                    continue
                stem, ext = name.split(".", 1)
                member_key = os.path.join(folder, stem)
                payload = tar.extractfile(info).read()  # type: ignore[union-attr]
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                members[ext.lower()] = payload
            # After the last member tarfile reads one more header: a complete archive gives it a zero
            # block; fewer than 512 bytes there means the file was cut.
            if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive block after {tar.offset} bytes (truncated?)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        counter.skip("bad_shard", f"{path}: {err}")
        # The sample being read when the shard broke off may be incomplete; drop it.
        return
    if key is not None:
        yield key, members


def _shuffled(items: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = item
    order = rng.permutation(len(buffer))
    for i in order:
        yield buffer[int(i)]


class ClassFolder(Dataset):
    """ImageNet-style folder ``root/{class_name}/*.{png,jpg,...}`` -> ``(img, label)``.

    ``.classes`` are the sub-folder names sorted (label i = ``classes[i]``), ``.samples`` the
    ``(path, label)`` pairs sorted by class then file name, ``.targets`` the labels. Unreadable images
    are replaced by the next readable index and counted in ``.skipped``.
    """

    def __init__(self, root: str | Path, transform: ImageTransform | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no class folder {self.root}; expected root/{{class_name}}/*.png")
        self.transform = transform or to_pm1
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders; expected root/{{class_name}}/*.png")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        self.targets = [label for _, label in self.samples]
        self.skipped = SkipCounter(f"ClassFolder({self.root})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = _open_image(path)
            except Exception as err:
                self.skipped.skip("bad_image", f"{path}: {type(err).__name__}: {err}")
                continue
            return self.transform(image), label
        raise RuntimeError(f"no readable image in {self.root} ({self.skipped})")


def _conversation_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    if "id" not in record:
        return "no 'id'"
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "'conversations' must be a list of at least two turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i} must be {{'from', 'value': str}}"
        if turn.get("from") != ("human" if i % 2 == 0 else "gpt"):
            return f"turn {i} must come from {'human' if i % 2 == 0 else 'gpt'}, got {turn.get('from')!r}"
    if "image" in record and (not isinstance(record["image"], str) or "<image>" not in turns[0]["value"]):
        return "a record with an 'image' needs it as a path string and '<image>' in the first human turn"
    return None


def read_conversations(path: str | Path, counter: SkipCounter | None = None) -> list[dict]:
    """Read LLaVA conversations (a JSON list, or JSON lines when the file ends in .jsonl).

    Each record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``
    with turns alternating from human; records that break that are skipped and counted.
    """
    path = Path(path)
    counter = counter or SkipCounter(f"read_conversations({path})")
    if path.suffix == ".jsonl":
        records: list[Any] = [row for _, row in _json_lines(path, counter)]
    else:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); expected a list of LLaVA conversation records"
            ) from err
        if not isinstance(records, list):
            raise ValueError(
                f"{path} must hold a JSON list of conversation records, got {type(records).__name__}"
            )
    valid = []
    for i, record in enumerate(records):
        problem = _conversation_problem(record)
        if problem is None:
            valid.append(record)
        else:
            counter.skip("bad_conversation", f"record {i}: {problem}")
    return valid


def _geneval_problem(row: dict) -> str | None:
    if row.get("tag") not in GENEVAL_TAGS:
        return f"'tag' must be one of {', '.join(GENEVAL_TAGS)}, got {row.get('tag')!r}"
    if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        return "no 'prompt' string"
    for field in ("include", "exclude"):
        items = row.get(field, [])
        if not isinstance(items, list) or (field == "include" and not items):
            return f"'{field}' must be a list" + (" with at least one item" if field == "include" else "")
        for item in items:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("class"), str)
                or not isinstance(item.get("count"), int)
            ):
                return f"every '{field}' item needs 'class' (str) and 'count' (int), got {item!r}"
    return None


def read_geneval_prompts(path: str | Path, counter: SkipCounter | None = None) -> list[dict]:
    """Read GenEval metadata lines (``{"tag", "include", "exclude"?, "prompt"}``); bad lines are skipped and counted."""
    path = Path(path)
    counter = counter or SkipCounter(f"read_geneval_prompts({path})")
    rows = []
    for lineno, row in _json_lines(path, counter):
        problem = _geneval_problem(row)
        if problem is None:
            rows.append(row)
        else:
            counter.skip("bad_metadata", f"{path}:{lineno}: {problem}")
    return rows
