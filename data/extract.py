"""Code extraction: ``unitok extract-codes --tokenizer DIR --data PATH --out STORE``.

Encodes every image of a data set once with a UniTok checkpoint and writes its codes, with the sample's
caption and/or LLaVA conversation, into a code store (:mod:`unitok.data.codes`). Inputs (``--data``):

- a folder holding ``captions/{split}.jsonl`` (images + JSON lines, images relative to the folder; ``--split``,
  default train), joined by image path with ``llava/{split}.json`` when that exists (the synthetic world's layout), so that an
  image used both for captioning and for questions is encoded once;
- a ``.jsonl`` file of ``{"image", "caption"}`` rows, or of LLaVA records (``{"image", "conversations"}``);
- a ``.json`` file of LLaVA records (a list);
- WebDataset shards (``.tar`` file, glob, brace pattern, or a folder of ``.tar``): ``{key}.jpg|png``,
  ``{key}.txt`` (caption), optional ``{key}.json`` with ``conversations``.

Images of JSON inputs resolve against ``--image-root`` (default: the folder of the data, or of the data
file). The work is cut into shards (``--shard-size`` records, or one per tar); under ``torchrun`` rank r
takes shards r, r + W, ... and encodes on its own GPU. Each shard is written atomically, so a rerun of the
same command skips finished shards. A missing or undecodable image, a bad JSON row or a malformed
conversation is skipped and counted; the summary lists the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .codes import (
    SHARD_FOLDER,
    STORE_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    encode_codes,
    read_store_info,
    shard_name,
    store_summary,
    write_shard,
)
from .datasets import SkipCounter, _json_lines, expand_urls, iter_tar_samples, read_conversations
from .formats import write_json

logger = logging.getLogger(__name__)


@dataclass
class RawItem:
    """One image to encode: where its pixels come from (a path or encoded bytes) and its texts."""

    id: str
    image: str | bytes
    caption: str | None = None
    conversations: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Unit:
    """One output shard's worth of input: a slice of the record list, or one tar shard."""

    index: int
    start: int = 0
    stop: int = 0
    tar: str | None = None


class Plan:
    """The inputs of an extraction cut into units; ``items(unit, counter)`` yields that unit's images."""

    def __init__(self, data: str, image_root: str | None, shard_size: int, split: str = "train") -> None:
        self.data = data
        self.split = split
        self.counter = SkipCounter(f"extract-codes({data})")
        path = Path(data)
        self.records: list[RawItem] = []
        self.tars: list[str] = []
        if path.is_dir() and (path / "captions").is_dir():
            self.kind = "folder"
            self.records = self._read_folder(path, Path(image_root or path))
        elif path.is_dir() or path.suffix == ".tar" or any(c in data for c in "*{"):
            self.kind = "webdataset"
            self.tars = expand_urls(data)
            if not self.tars:
                raise ValueError(f"no .tar shards found for --data {data!r}")
        elif path.is_file() and path.suffix in (".json", ".jsonl"):
            self.kind = "json"
            self.records = self._read_json_file(path, Path(image_root or path.parent))
        else:
            raise ValueError(
                f"--data {data!r}: expected a folder with captions/*.jsonl, a .json/.jsonl file, "
                "or WebDataset .tar shards (file, glob, brace pattern or folder)"
            )
        if self.tars:
            self.units = [Unit(i, tar=t) for i, t in enumerate(self.tars)]
        else:
            bounds = range(0, len(self.records), shard_size)
            self.units = [Unit(i, lo, min(lo + shard_size, len(self.records))) for i, lo in enumerate(bounds)]

    def fingerprint(self) -> str:
        """A hash of the planned input (ids per unit, or tar paths): a rerun must see the same plan."""
        digest = hashlib.sha256()
        for item in self.records:
            digest.update(f"{item.id}\0{item.image if isinstance(item.image, str) else ''}\n".encode())
        for tar in self.tars:
            digest.update(f"{tar}\n".encode())
        digest.update(str([(u.start, u.stop) for u in self.units]).encode())
        return digest.hexdigest()[:16]

    def _read_folder(self, root: Path, image_root: Path) -> list[RawItem]:
        files = [root / "captions" / f"{self.split}.jsonl"]
        if not files[0].is_file():
            raise ValueError(f"--data {root}: no captions/{self.split}.jsonl (choose the split with --split)")
        by_image: dict[str, RawItem] = {}
        for file in files:
            for lineno, row in _json_lines(file, self.counter):
                item = self._caption_item(row, image_root, f"{file}:{lineno}")
                if item is not None:
                    by_image.setdefault(item.image, item)
        llava = root / "llava"
        for file in [llava / f"{self.split}.json"] if (llava / f"{self.split}.json").is_file() else []:
            for record in read_conversations(file, self.counter):
                if "image" not in record:
                    continue
                key = str(image_root / record["image"])
                if key in by_image:
                    by_image[key].conversations = record["conversations"]
                else:
                    by_image[key] = RawItem(str(record["id"]), key, None, record["conversations"])
        return list(by_image.values())

    def _caption_item(self, row: dict, image_root: Path, where: str) -> RawItem | None:
        image, caption = row.get("image"), row.get("caption", row.get("text"))
        if not isinstance(image, str) or not image:
            self.counter.skip("bad_row", f"{where}: no 'image' path")
            return None
        if not isinstance(caption, str) or not caption.strip():
            self.counter.skip("bad_row", f"{where}: no 'caption' text")
            return None
        return RawItem(str(row.get("id", Path(image).stem)), str(image_root / image), caption.strip())

    def _read_json_file(self, path: Path, image_root: Path) -> list[RawItem]:
        if path.suffix == ".jsonl":
            rows = [row for _, row in _json_lines(path, SkipCounter("probe"))][:1]
            if not rows or "conversations" not in rows[0]:
                out = []
                for lineno, row in _json_lines(path, self.counter):
                    item = self._caption_item(row, image_root, f"{path}:{lineno}")
                    if item is not None:
                        out.append(item)
                return out
        records = read_conversations(path, self.counter)
        out = []
        for record in records:
            if not isinstance(record.get("image"), str):
                self.counter.skip("no_image", f"{path}: record {record['id']} has no image")
                continue
            out.append(
                RawItem(str(record["id"]), str(image_root / record["image"]), None, record["conversations"])
            )
        return out

    def items(self, unit: Unit, counter: SkipCounter) -> list[RawItem]:
        """The images of ``unit`` (a tar shard is read into memory here; images are decoded later)."""
        if unit.tar is None:
            return self.records[unit.start : unit.stop]
        out = []
        for key, members in iter_tar_samples(unit.tar, counter):
            image = next((members[k] for k in ("jpg", "jpeg", "png", "webp") if k in members), None)
            if image is None:
                counter.skip("missing_image", f"{unit.tar}: {key}")
                continue
            caption = members.get("txt", b"").decode("utf-8", errors="replace").strip() or None
            conversations = None
            if "json" in members:
                try:
                    meta = json.loads(members["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    counter.skip("bad_json", f"{unit.tar}: {key}: {err!r}")
                    continue
                conversations = meta.get("conversations") if isinstance(meta, dict) else None
            if caption is None and conversations is None:
                counter.skip("no_text", f"{unit.tar}: {key}")
                continue
            out.append(RawItem(os.path.basename(key), image, caption, conversations))
        return out


class _Images(Dataset):
    """Decodes and resizes the images of one unit (in DataLoader workers); a bad image becomes its reason."""

    def __init__(self, items: list[RawItem], size: int) -> None:
        self.items = items
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        from unitok.tokenizer.preprocess import load_image

        source = self.items[index].image
        try:
            if isinstance(source, bytes):
                with Image.open(io.BytesIO(source)) as opened:
                    opened.load()
                    image = opened.copy()
            else:
                if not os.path.isfile(source):
                    return index, None, "missing_image"
                image = source
            return index, load_image(image, size=self.size), ""
        except (OSError, ValueError, SyntaxError):
            return index, None, "bad_image"


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> list[tuple[int, torch.Tensor | None, str]]:
    return batch


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _write_store_info(out: Path, plan: Plan, unitok: Any, tokenizer: str) -> None:
    """Create or check ``store.json``: a rerun must extract the same plan with the same tokenizer."""
    cfg = unitok.config
    info = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "tokenizer": str(Path(tokenizer).resolve()),
        "num_codebooks": cfg.num_codebooks,
        "codebook_size": cfg.codebook_size,
        "image_size": cfg.image_size,
        "grid": [cfg.grid_size, cfg.grid_size],
        "data": plan.data,
        "input_kind": plan.kind,
        "plan": plan.fingerprint(),
        "num_shards": len(plan.units),
        "skipped_before_sharding": dict(plan.counter.counts),
    }
    path = out / STORE_FILE
    if path.is_file():
        old = read_store_info(out)
        keys = ("tokenizer", "num_codebooks", "codebook_size", "image_size", "plan", "num_shards")
        changed = [k for k in keys if old.get(k) != info[k]]
        if changed:
            raise ValueError(
                f"{out} holds a store extracted with different {', '.join(changed)}; "
                "use a new --out folder (or delete this one) to extract a different input or tokenizer"
            )
        return
    tmp = out / f".{STORE_FILE}.tmp-{os.getpid()}"
    write_json(tmp, info)
    os.replace(tmp, path)


def extract_codes(
    tokenizer: str | Path,
    data: str,
    out: str | Path,
    *,
    image_root: str | None = None,
    split: str = "train",
    shard_size: int = 10000,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Extract the codes of ``data`` with the UniTok at ``tokenizer`` into the store ``out``.

    This process encodes the shards of its rank (``RANK``/``WORLD_SIZE`` from torchrun; all of them without
    a launcher) that are not finished yet. Returns this process's counts: ``{"shards_written",
    "shards_skipped", "images", "skipped": {reason: n}, "seconds"}``.
    """
    from unitok.tokenizer import UniTok

    if shard_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"expected shard_size >= 1, batch_size >= 1, num_workers >= 0, got {shard_size}, {batch_size}, {num_workers}"
        )
    rank, world = _rank()
    out = Path(out)
    (out / SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
    unitok = UniTok.from_pretrained(tokenizer)
    plan = Plan(data, image_root, shard_size, split)
    # Every rank writes (the same) store.json, so a store is described even if rank 0 has not started yet.
    _write_store_info(out, plan, unitok, str(tokenizer))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    unitok = unitok.to(dev).eval()
    mine = [u for u in plan.units[rank::world] if not (out / SHARD_FOLDER / shard_name(u.index)).is_file()]
    totals: Counter[str] = Counter()
    started, images = time.perf_counter(), 0
    bar = tqdm(total=len(mine), unit="shard", desc=f"extract-codes rank {rank}", disable=not progress)
    for unit in mine:
        counter = SkipCounter(f"extract-codes shard {unit.index}")
        items = plan.items(unit, counter)
        rows = list(_encode_unit(unitok, items, counter, batch_size, num_workers, dev))
        write_shard(out / SHARD_FOLDER / shard_name(unit.index), rows, dict(counter.counts))
        totals.update(counter.counts)
        images += len(rows)
        bar.update(1)
        bar.set_postfix(images=images, skipped=sum(totals.values()))
    bar.close()
    if rank == 0:
        totals.update(plan.counter.counts)
    return {
        "shards_written": len(mine),
        "shards_skipped": len(plan.units[rank::world]) - len(mine),
        "images": images,
        "skipped": dict(sorted(totals.items())),
        "seconds": time.perf_counter() - started,
    }


def _encode_unit(
    unitok: Any,
    items: list[RawItem],
    counter: SkipCounter,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    """Store rows of one unit's images, in input order; unreadable images are counted and left out."""
    if not items:
        return
    loader = DataLoader(
        _Images(items, unitok.config.image_size),
        batch_size=batch_size,
        num_workers=min(num_workers, max(0, len(items) // batch_size)),
        collate_fn=_collate,
    )
    size = unitok.config.codebook_size
    for batch in loader:
        good = [(i, img) for i, img, reason in batch if img is not None]
        for i, img, reason in batch:
            if img is None:
                source = items[i].image
                counter.skip(reason, source if isinstance(source, str) else items[i].id)
        if not good:
            continue
        with torch.no_grad():
            codes = unitok.encode(torch.stack([img for _, img in good]).to(device)).cpu().numpy()
        for (i, _), grid in zip(good, codes):
            item = items[i]
            yield {
                "id": item.id,
                "codes": encode_codes(grid, size),
                "h": int(grid.shape[0]),
                "w": int(grid.shape[1]),
                "caption": item.caption,
                "conversations": None if item.conversations is None else json.dumps(item.conversations),
            }


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok extract-codes``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Pre-tokenise images with a UniTok checkpoint into a sharded, resumable code store "
        "(run one process per GPU with torchrun; a rerun skips finished shards).",
    )
    p.add_argument(
        "--tokenizer", required=True, help="UniTok checkpoint (save_pretrained folder or release .pth)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="folder with captions/*.jsonl (+ llava/*.json), a .json/.jsonl file, or .tar shards (glob/brace/folder)",
    )
    p.add_argument("--out", required=True, help="the code store folder")
    p.add_argument("--image-root", default=None, help="folder the image paths of JSON inputs are relative to")
    p.add_argument(
        "--split", default="train", help="split of a folder input (captions/SPLIT.jsonl, llava/SPLIT.json)"
    )
    p.add_argument("--shard-size", type=int, default=10000, help="images per output shard (JSON inputs)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok extract-codes``; prints this rank's counts and, on rank 0, the store's summary."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = extract_codes(
            args.tokenizer,
            args.data,
            args.out,
            image_root=args.image_root,
            split=args.split,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank, world = _rank()
    print(
        f"rank {rank}/{world}: wrote {result['shards_written']} shards ({result['images']} images, "
        f"{result['seconds']:.1f} s), {result['shards_skipped']} already done, skipped {result['skipped']}"
    )
    if rank == 0:
        summary = store_summary(args.out)
        print(
            f"store {args.out}: {summary['shards_done']}/{summary['shards_planned']} shards, {summary['rows']} images, "
            f"{summary['bytes']} bytes, skipped {summary['skipped'] or 'none'}"
        )
    return 0
