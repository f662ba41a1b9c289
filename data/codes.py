"""The code store: UniTok codes of pre-tokenised images with their captions and conversations, in Arrow shards.

Written once by ``unitok extract-codes`` (:mod:`unitok.data.extract`) and read by the MLLM trainer, which
then never runs the UniTok encoder. Layout::

    STORE/store.json              format, version, the tokenizer's K / V / grid, the input, the shard plan
    STORE/shards/000000.arrow     one Arrow IPC stream file per shard, renamed into place when complete
    STORE/shards/000001.arrow     ...

One row per image: ``id`` (string), ``codes`` (bytes: uint16 little-endian, C order ``[h,w,K]``), ``h`` and
``w`` (int32), ``caption`` (string or null) and ``conversations`` (LLaVA turns as a JSON string, or null).
Each shard's schema metadata holds its summary (rows written, samples skipped per reason), so a shard file is
its own completion record.

Why Arrow and not WebDataset tars: once an image is 4 KiB of codes (256 positions x 8 sub-codes x 2 bytes),
the tar format's strength, streaming large media blobs sequentially through shuffle buffers, no longer
matters, while random access does: a memory-mapped Arrow file gives any row in O(1) without reading the
others, so the mixture sampler draws any permutation deterministically, resumes mid-epoch by position
without re-reading, and every DataLoader worker shares one page cache. The stream files also open with
``datasets.Dataset.from_file`` and plain ``pyarrow``.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

STORE_FORMAT = "unitok-code-store"
STORE_VERSION = 1
STORE_FILE = "store.json"
SHARD_FOLDER = "shards"
SUMMARY_KEY = b"unitok.shard_summary"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("codes", pa.binary()),
        ("h", pa.int32()),
        ("w", pa.int32()),
        ("caption", pa.string()),
        ("conversations", pa.string()),
    ]
)


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside ``STORE/shards``."""
    return f"{index:06d}.arrow"


@dataclass
class CodeRecord:
    """One row of the store: an image's codes ``[h,w,K]`` (int64) and its texts (either may be ``None``)."""

    id: str
    codes: np.ndarray
    caption: str | None
    conversations: list[dict[str, str]] | None


def encode_codes(codes_hwK: np.ndarray, codebook_size: int) -> bytes:
    """Codes ``[h,w,K]`` -> uint16 little-endian bytes (ValueError when a value does not fit ``[0, V)``)."""
    codes = np.asarray(codes_hwK)
    if codes.ndim != 3:
        raise ValueError(f"expected codes [h,w,K], got shape {list(codes.shape)}")
    if codebook_size > 2**16:
        raise ValueError(f"uint16 codes hold at most 65536 entries per sub-codebook, got V={codebook_size}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]")
    return np.ascontiguousarray(codes, dtype="<u2").tobytes()


def decode_codes(payload: bytes, h: int, w: int, num_codebooks: int) -> np.ndarray:
    """Inverse of :func:`encode_codes`: bytes -> int64 codes ``[h,w,K]``."""
    flat = np.frombuffer(payload, dtype="<u2")
    if flat.size != h * w * num_codebooks:
        raise ValueError(f"a code row holds {flat.size} values, expected h*w*K = {h}*{w}*{num_codebooks}")
    return flat.reshape(h, w, num_codebooks).astype(np.int64)


def write_shard(path: str | Path, rows: Iterable[dict[str, Any]], skipped: dict[str, int]) -> int:
    """Write one shard atomically (temporary file, then ``os.replace``); returns the number of rows.

    ``rows`` are dicts with the keys of :data:`SCHEMA`; ``skipped`` (reason -> count) goes into the shard's
    summary, so that the store's summary can add up what extraction dropped.
    """
    path = Path(path)
    rows = list(rows)
    columns = {name: [row.get(name) for row in rows] for name in SCHEMA.names}
    summary = {"rows": len(rows), "skipped": dict(skipped)}
    schema = SCHEMA.with_metadata({SUMMARY_KEY: json.dumps(summary).encode()})
    table = pa.Table.from_pydict(columns, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=4096)
    os.replace(tmp, path)
    return len(rows)


def read_shard_summary(path: str | Path) -> dict[str, Any]:
    """The summary (``{"rows", "skipped"}``) a complete shard carries in its schema metadata."""
    with pa.memory_map(str(path)) as source:
        schema = pa.ipc.open_stream(source).schema
    return json.loads(schema.metadata[SUMMARY_KEY])


def read_store_info(store: str | Path) -> dict[str, Any]:
    """The parsed ``store.json`` of a store (ValueError naming what is wrong)."""
    path = Path(store) / STORE_FILE
    if not path.is_file():
        raise ValueError(
            f"{store} is not a code store: no {STORE_FILE} (write one with `unitok extract-codes`)"
        )
    info = json.loads(path.read_text())
    if info.get("format") != STORE_FORMAT or info.get("version") != STORE_VERSION:
        raise ValueError(
            f"{path}: expected format {STORE_FORMAT!r} version {STORE_VERSION}, "
            f"got {info.get('format')!r} version {info.get('version')!r}"
        )
    return info


def store_summary(store: str | Path) -> dict[str, Any]:
    """Progress and totals of a store: shards done / planned, rows, samples skipped per reason."""
    store = Path(store)
    info = read_store_info(store)
    done, rows, skipped = 0, 0, Counter(info.get("skipped_before_sharding", {}))
    for index in range(info["num_shards"]):
        path = store / SHARD_FOLDER / shard_name(index)
        if path.is_file():
            summary = read_shard_summary(path)
            done += 1
            rows += summary["rows"]
            skipped.update(summary["skipped"])
    return {
        "shards_done": done,
        "shards_planned": info["num_shards"],
        "rows": rows,
        "skipped": dict(sorted(skipped.items())),
        "bytes": sum(p.stat().st_size for p in (store / SHARD_FOLDER).glob("*.arrow")),
    }


class CodeStore:
    """Random access to a complete code store (memory-mapped shards).

    Args:
        path: the store folder written by ``unitok extract-codes``.

    Raises ValueError if a planned shard is missing (an extraction that has not finished: rerun it).
    ``len(store)`` rows; ``store[i]`` is a :class:`CodeRecord`. ``has_caption`` / ``has_conversations``
    are boolean arrays over the rows; ``heights``, ``widths`` and ``grid_positions`` (h*w) the code grids.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.info = read_store_info(self.path)
        self.num_codebooks = int(self.info["num_codebooks"])
        self.codebook_size = int(self.info["codebook_size"])
        names = [shard_name(i) for i in range(self.info["num_shards"])]
        missing = [n for n in names if not (self.path / SHARD_FOLDER / n).is_file()]
        if missing:
            raise ValueError(
                f"code store {self.path} is incomplete: {len(missing)} of {len(names)} shards missing "
                f"(first: {missing[0]}); rerun `unitok extract-codes` with the same arguments to finish it"
            )
        self._tables: list[pa.Table] = []
        for name in names:
            # Zero-copy: the table's buffers point into the mapping, which they keep alive.
            source = pa.memory_map(str(self.path / SHARD_FOLDER / name))
            self._tables.append(pa.ipc.open_stream(source).read_all())
        self._starts = np.cumsum([0] + [t.num_rows for t in self._tables]).tolist()
        self.has_caption = self._column_valid("caption")
        self.has_conversations = self._column_valid("conversations")
        self.heights = self._column_ints("h")
        self.widths = self._column_ints("w")
        self.grid_positions = self.heights * self.widths

    def _column_ints(self, name: str) -> np.ndarray:
        parts = [np.asarray(t[name], dtype=np.int64) for t in self._tables]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _column_valid(self, name: str) -> np.ndarray:
        parts = [np.asarray(t[name].is_valid()) for t in self._tables]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[pa.Table, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a store of {len(self)} rows")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._tables[shard], index - self._starts[shard]

    def __getitem__(self, index: int) -> CodeRecord:
        table, row = self._locate(int(index))
        h, w = table["h"][row].as_py(), table["w"][row].as_py()
        conversations = table["conversations"][row].as_py()
        return CodeRecord(
            id=table["id"][row].as_py(),
            codes=decode_codes(table["codes"][row].as_py(), h, w, self.num_codebooks),
            caption=table["caption"][row].as_py(),
            conversations=None if conversations is None else json.loads(conversations),
        )

    def texts(self, column: str, indices: Sequence[int]) -> list[str | None]:
        """The raw strings of ``column`` ("caption" or "conversations") at ``indices`` (for length scans)."""
        out = []
        for index in indices:
            table, row = self._locate(int(index))
            out.append(table[column][row].as_py())
        return out
