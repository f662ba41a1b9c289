"""Write the built-in synthetic world to disk: ``unitok data synth --out DIR --num-images N ...``.

Layout under ``out_dir`` (paths inside files are relative to ``out_dir``):

- ``images/{split}/{id}.png`` and ``captions/{split}.jsonl`` (``{"id", "image", "caption", "objects",
  "qa", "background"}`` per line)
- ``shards/{split}-{000000..}.tar``: WebDataset/DataComp shards, ``{id}.jpg``, ``{id}.txt`` (caption),
  ``{id}.json`` (the same record as the JSON line, plus ``key``, ``width``, ``height``)
- ``llava/{split}.json``: LLaVA conversations over the questions and a caption turn
- ``classify/{shape,color}/{split}/{class}/{id}.png`` and ``classify/{attribute}/classnames.txt``:
  single-object scenes for zero-shot classification, classes sorted (label i = line i)
- ``geneval/evaluation_metadata.jsonl`` and ``geneval/object_names.txt``: GenEval-style prompts
- ``metadata.json``: config, counts, class names and colours, file lists

Determinism: image ``i`` of the world is drawn from ``numpy.random.default_rng([seed, 0, i])``
alone (classification images and prompts from their own streams), and every writer produces
fixed bytes, so the same config gives byte-identical files whatever the number of workers.
Images are split by index: the first ``n_train`` are train, then val, then test.

Atomicity: the world is written into ``out_dir/.synth-staging-<pid>/`` and moved into place entry by
entry, ``metadata.json`` (the world's manifest) last, under a ``.synth-commit.json`` marker listing
the entries being moved. A run killed while generating leaves only the staging folder, one killed
while moving leaves the marker: the next run removes either and starts over. ``overwrite`` deletes
only the entries that an existing world's manifest lists, never a folder that no manifest claims.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .formats import (
    CAPTION_QUESTION,
    SHORT_ANSWER_PROMPT,
    dumps_line,
    encode_jpeg,
    encode_png,
    llava_record,
    write_json,
    write_jsonl,
    write_tar_shard,
)
from .geneval import GENEVAL_TAG_COUNTS, GENEVAL_TAGS, make_geneval_prompts
from .language import QA_KINDS, caption, questions
from .world import (
    BACKGROUND_KINDS,
    COLOR_NAMES,
    COLORS,
    SHAPE_NAMES,
    SIZE_RANGES,
    check_object_scale,
    sample_scene,
    single_object_scene,
)

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSIFY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": tuple(sorted(SHAPE_NAMES)),
    "color": tuple(sorted(COLOR_NAMES)),
}
ZERO_SHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a photo of a {}.", "a {} shape.", "a colored {} on a gray background."),
    "color": ("a photo of a {} object.", "a {} shape.", "something {} on a gray background."),
}
# Top-level entries the world owns in out_dir (the only things --overwrite removes).
OUTPUT_ENTRIES: tuple[str, ...] = (
    "images",
    "captions",
    "shards",
    "llava",
    "classify",
    "geneval",
    "metadata.json",
)
# Independent random streams: rng([seed, stream, ...]).
_STREAM_WORLD, _STREAM_CLASSIFY, _STREAM_GENEVAL = 0, 1, 2
FORMAT_VERSION = 2
WORLD_NAME = "unitok-synthetic-world"
STAGING_PREFIX = ".synth-staging-"
COMMIT_MARKER = ".synth-commit.json"


@dataclass
class SynthConfig:
    """What to generate. ``num_images`` counts the captioned world images of all splits together;
    ``classify_per_class`` is the number of classification images per class and per split."""

    num_images: int = 1000
    size: int = 64
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    shard_size: int = 1000
    max_objects: int = 4
    # Object widths as a multiple of the size classes' ranges (world.SIZE_RANGES): 1.3 draws larger shapes,
    # whose outlines cover more of a 64 px image.
    object_scale: float = 1.0
    classify_per_class: int = 20
    geneval_per_tag: dict[str, int] = field(default_factory=lambda: dict(GENEVAL_TAG_COUNTS))

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        if not (
            0 <= self.val_fraction < 1
            and 0 <= self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got {self.val_fraction} and {self.test_fraction}"
            )
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 1 <= self.max_objects <= 4:
            raise ValueError(f"max_objects must be in 1..4, got {self.max_objects}")
        check_object_scale(self.object_scale)
        if self.classify_per_class < 0:
            raise ValueError(f"classify_per_class must be >= 0, got {self.classify_per_class}")
        unknown = set(self.geneval_per_tag) - set(GENEVAL_TAGS)
        if unknown:
            raise ValueError(
                f"geneval_per_tag has unknown tags {sorted(unknown)}; expected among {', '.join(GENEVAL_TAGS)}"
            )

    def split_sizes(self) -> dict[str, int]:
        """Number of world images per split (val and test rounded, train gets the rest)."""
        n_val = round(self.num_images * self.val_fraction)
        n_test = round(self.num_images * self.test_fraction)
        return {"train": self.num_images - n_val - n_test, "val": n_val, "test": n_test}

    def id_width(self) -> int:
        """Digits of the zero-padded image ids (at least 6)."""
        return max(6, len(str(self.num_images - 1)))

    def to_dict(self) -> dict:
        """JSON form, as stored in metadata.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        """Inverse of ``to_dict``."""
        return cls(**d)


@dataclass(frozen=True)
class _ShardTask:
    out_dir: str
    config: SynthConfig
    split: str
    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class _ClassifyTask:
    out_dir: str
    config: SynthConfig
    attribute: str
    split: str
    start: int
    stop: int


def _world_record(
    config: SynthConfig, index: int, split: str
) -> tuple[dict, list[tuple[str, str]], Image.Image]:
    """Scene ``index``: its JSON record, its LLaVA turns and the rendered PIL image."""
    rng = np.random.default_rng([config.seed, _STREAM_WORLD, index])
    scene, groups = sample_scene(rng, config.size, config.max_objects, config.object_scale)
    text = caption(scene, groups, rng)
    qa = questions(scene, rng)
    turns = [(f"{item['question']}\n{SHORT_ANSWER_PROMPT}", item["answer"]) for item in qa]
    # Questions come in a random order, so that a model has to read them (any kind may come first, as at test
    # time, where every question is asked alone).
    turns = [turns[i] for i in rng.permutation(len(turns))]
    turns.insert(int(rng.integers(len(turns) + 1)), (CAPTION_QUESTION, text))
    sample_id = f"{index:0{config.id_width()}d}"
    truth = scene.to_dict()
    record = {
        "id": sample_id,
        "image": f"images/{split}/{sample_id}.png",
        "caption": text,
        "objects": truth["objects"],
        "qa": qa,
        "background": truth["background"],
    }
    return record, turns, scene.render()


@dataclass(frozen=True)
class _ShardResult:
    split: str
    shard: int
    caption_lines: list[str]  # JSON lines of captions/{split}.jsonl
    conversations: list[str]  # JSON objects of llava/{split}.json


def _run_shard(task: _ShardTask) -> _ShardResult:
    # Serialised here, in the worker, so that the parent only concatenates text.
    out = Path(task.out_dir)
    lines, conversations, members = [], [], []
    for index in range(task.start, task.stop):
        record, turns, image = _world_record(task.config, index, task.split)
        (out / record["image"]).write_bytes(encode_png(image))
        shard_json = {"key": record["id"], **record, "width": task.config.size, "height": task.config.size}
        members.append(
            (
                record["id"],
                {
                    "jpg": encode_jpeg(image),
                    "txt": record["caption"].encode("utf-8"),
                    "json": dumps_line(shard_json).encode("utf-8"),
                },
            )
        )
        lines.append(dumps_line(record))
        conversations.append(dumps_line(llava_record(record["id"], record["image"], turns)))
    write_tar_shard(out / shard_path(task.split, task.shard), members)
    return _ShardResult(task.split, task.shard, lines, conversations)


def _run_classify(task: _ClassifyTask) -> int:
    out = Path(task.out_dir)
    classes = CLASSIFY_ATTRIBUTES[task.attribute]
    attr_id, split_id = list(CLASSIFY_ATTRIBUTES).index(task.attribute), SPLITS.index(task.split)
    for index in range(task.start, task.stop):
        rng = np.random.default_rng([task.config.seed, _STREAM_CLASSIFY, attr_id, split_id, index])
        name = classes[index % len(classes)]
        scene = single_object_scene(
            rng, task.config.size, object_scale=task.config.object_scale, **{task.attribute: name}
        )
        path = out / "classify" / task.attribute / task.split / name / f"{index:06d}.png"
        path.write_bytes(encode_png(scene.render()))
    return task.stop - task.start


def _run_task(task: _ShardTask | _ClassifyTask) -> _ShardResult | int:
    return _run_shard(task) if isinstance(task, _ShardTask) else _run_classify(task)


def shard_path(split: str, shard: int) -> str:
    """Relative path of shard number ``shard`` of ``split``."""
    return f"shards/{split}-{shard:06d}.tar"


def _plan(out_dir: Path, config: SynthConfig) -> tuple[list[_ShardTask], list[_ClassifyTask]]:
    shard_tasks, start = [], 0
    for split, n in config.split_sizes().items():
        for shard, lo in enumerate(range(start, start + n, config.shard_size)):
            shard_tasks.append(
                _ShardTask(str(out_dir), config, split, shard, lo, min(lo + config.shard_size, start + n))
            )
        start += n
    classify_tasks = []
    chunk = 200
    for attribute, classes in CLASSIFY_ATTRIBUTES.items():
        for split in SPLITS:
            total = config.classify_per_class * len(classes)
            for lo in range(0, total, chunk):
                classify_tasks.append(
                    _ClassifyTask(str(out_dir), config, attribute, split, lo, min(lo + chunk, total))
                )
    return shard_tasks, classify_tasks


def _manifest_entries(out_dir: Path) -> list[str] | None:
    """Top-level entries that the world in ``out_dir`` claims in its ``metadata.json``, or None when
    there is no readable synthetic-world manifest."""
    try:
        metadata = json.loads((out_dir / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get("name") != WORLD_NAME:
        return None
    entries = metadata.get("entries", list(OUTPUT_ENTRIES))
    return [name for name in entries if name in OUTPUT_ENTRIES]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _recover(out_dir: Path) -> None:
    """Remove what an interrupted generation left: staging folders and half-moved entries."""
    for staging in out_dir.glob(f"{STAGING_PREFIX}*"):
        logger.warning("removing %s, left by an interrupted generation", staging)
        shutil.rmtree(staging, ignore_errors=True)
    marker = out_dir / COMMIT_MARKER
    if marker.is_file():
        try:
            entries = json.loads(marker.read_text(encoding="utf-8"))["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = []
        logger.warning("removing the half-moved world in %s (%s)", out_dir, ", ".join(entries))
        for name in entries:
            if name in OUTPUT_ENTRIES:
                _remove(out_dir / name)
        marker.unlink()


def _check_target(out_dir: Path, overwrite: bool) -> list[str]:
    """The entries to delete before the new world moves in (those of an existing world, with ``overwrite``)."""
    existing = [name for name in OUTPUT_ENTRIES if (out_dir / name).exists()]
    if not existing:
        return []
    claimed = _manifest_entries(out_dir)
    if claimed is None:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(existing)} but no synthetic-world manifest (metadata.json) "
            "claims them, so they are not replaced even with --overwrite; choose another --out or remove them"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True (--overwrite) to replace them"
        )
    foreign = [name for name in existing if name not in claimed]
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds {', '.join(foreign)}, which its world's manifest does not list; not replacing them"
        )
    return claimed


def _prepare_dir(out_dir: Path) -> None:
    for split in SPLITS:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    for sub in ("captions", "shards", "llava", "geneval"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for attribute, classes in CLASSIFY_ATTRIBUTES.items():
        for split in SPLITS:
            for name in classes:
                (out_dir / "classify" / attribute / split / name).mkdir(parents=True, exist_ok=True)


def _move_into_place(staging: Path, out_dir: Path, replaced: list[str]) -> None:
    """Replace the old world's entries by the staged ones, the manifest last, under the commit marker."""
    entries = [name for name in OUTPUT_ENTRIES if (staging / name).exists()]
    marker = out_dir / COMMIT_MARKER
    marker.write_text(json.dumps({"entries": sorted(set(entries) | set(replaced))}), encoding="utf-8")
    for name in replaced:
        _remove(out_dir / name)
    for name in sorted(entries, key=lambda n: n == "metadata.json"):
        os.replace(staging / name, out_dir / name)
    marker.unlink()
    shutil.rmtree(staging)


def generate_world(
    out_dir: str | Path,
    config: SynthConfig | None = None,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Generate the synthetic world into ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: target folder, created if missing.
        config: what to generate (default ``SynthConfig()``).
        workers: processes (default: all CPUs); the output does not depend on it.
        overwrite: replace a world already in ``out_dir`` (only the entries the world owns are removed).
        progress: show a tqdm progress bar (images done).

    Returns:
        The content of ``metadata.json``.
    """
    config = config or SynthConfig()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for all CPUs), got {workers}")
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"--out {target} is a file; expected a folder for the synthetic world")
    target.mkdir(parents=True, exist_ok=True)
    _recover(target)
    replaced = _check_target(target, overwrite)
    out = target / f"{STAGING_PREFIX}{os.getpid()}"
    _prepare_dir(out)
    shard_tasks, classify_tasks = _plan(out, config)
    tasks: list[_ShardTask | _ClassifyTask] = [*shard_tasks, *classify_tasks]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    started = time.perf_counter()

    results: list[_ShardResult] = []
    total = sum(t.stop - t.start for t in tasks)
    with (
        tqdm(total=total, unit="img", desc="synth", dynamic_ncols=True, disable=not progress) as bar,
        multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool,
    ):
        for result in pool.imap_unordered(_run_task, tasks) if pool is not None else map(_run_task, tasks):
            if isinstance(result, _ShardResult):
                results.append(result)
                bar.update(len(result.caption_lines))
            else:
                bar.update(result)

    results.sort(key=lambda r: (SPLITS.index(r.split), r.shard))
    files: dict[str, dict] = {"captions": {}, "llava": {}, "shards": {}}
    for split in SPLITS:
        split_results = [r for r in results if r.split == split]
        files["captions"][split] = f"captions/{split}.jsonl"
        (out / files["captions"][split]).write_text(
            "".join(f"{line}\n" for r in split_results for line in r.caption_lines), encoding="utf-8"
        )
        files["llava"][split] = f"llava/{split}.json"
        # A JSON list of LLaVA records, one record per line.
        items = [conv for r in split_results for conv in r.conversations]
        (out / files["llava"][split]).write_text(
            "[\n" + ",\n".join(items) + "\n]\n" if items else "[]\n", encoding="utf-8"
        )
        files["shards"][split] = [shard_path(split, r.shard) for r in split_results]

    prompts = make_geneval_prompts(
        seed=int(np.random.default_rng([config.seed, _STREAM_GENEVAL]).integers(2**31)),
        per_tag=config.geneval_per_tag,
    )
    write_jsonl(out / "geneval" / "evaluation_metadata.jsonl", prompts)
    (out / "geneval" / "object_names.txt").write_text(
        "".join(f"{s}\n" for s in SHAPE_NAMES), encoding="utf-8"
    )
    for attribute, classes in CLASSIFY_ATTRIBUTES.items():
        (out / "classify" / attribute / "classnames.txt").write_text(
            "".join(f"{c}\n" for c in classes), encoding="utf-8"
        )

    metadata = _metadata(config, files, prompts)
    write_json(out / "metadata.json", metadata)
    _move_into_place(out, target, replaced)
    logger.info(
        "wrote the synthetic world to %s in %.1f s with %d workers",
        target,
        time.perf_counter() - started,
        workers,
    )
    return metadata


def _metadata(config: SynthConfig, files: dict, prompts: list[dict]) -> dict:
    splits = config.split_sizes()
    classify = {
        attribute: {
            "classes": list(classes),
            "classnames": f"classify/{attribute}/classnames.txt",
            "images_per_split": {split: config.classify_per_class * len(classes) for split in SPLITS},
            "templates": list(ZERO_SHOT_TEMPLATES[attribute]),
        }
        for attribute, classes in CLASSIFY_ATTRIBUTES.items()
    }
    return {
        "name": WORLD_NAME,
        "format_version": FORMAT_VERSION,
        "entries": list(OUTPUT_ENTRIES),
        "config": config.to_dict(),
        "splits": splits,
        "counts": {
            "images": splits,
            "captions": splits,
            "llava_conversations": splits,
            "shard_samples": splits,
            "shards": {split: len(files["shards"][split]) for split in SPLITS},
            "classify": {a: c["images_per_split"] for a, c in classify.items()},
            "geneval_prompts": {tag: sum(p["tag"] == tag for p in prompts) for tag in GENEVAL_TAGS},
        },
        "shapes": list(SHAPE_NAMES),
        "colors": {name: list(COLORS[name]) for name in COLOR_NAMES},
        "sizes": {name: [v * config.object_scale for v in r] for name, r in SIZE_RANGES.items()},
        "backgrounds": list(BACKGROUND_KINDS),
        "qa_kinds": list(QA_KINDS),
        "classify": classify,
        "files": {
            **files,
            "geneval": "geneval/evaluation_metadata.jsonl",
            "images": {s: f"images/{s}" for s in SPLITS},
        },
    }


def summary_table(out_dir: str | Path, metadata: dict, seconds: float | None = None) -> str:
    """Human-readable summary of a generated world: counts per split and format, and where they are."""
    counts = metadata["counts"]
    rows = [
        ("images (png)", "images/{split}/", counts["images"]),
        ("captions (jsonl)", "captions/{split}.jsonl", counts["captions"]),
        ("webdataset (tar)", "shards/{split}-*.tar", counts["shard_samples"]),
        ("llava (json)", "llava/{split}.json", counts["llava_conversations"]),
        ("classify shape", "classify/shape/{split}/", counts["classify"]["shape"]),
        ("classify color", "classify/color/{split}/", counts["classify"]["color"]),
    ]
    lines = [f"synthetic world in {out_dir}" + (f" ({seconds:.1f} s)" if seconds is not None else "")]
    lines.append(f"{'format':<18}{'train':>8}{'val':>8}{'test':>8}  path")
    for name, path, per_split in rows:
        lines.append(f"{name:<18}" + "".join(f"{per_split[s]:>8}" for s in SPLITS) + f"  {path}")
    shards = counts["shards"]
    lines.append(f"{'shards (files)':<18}" + "".join(f"{shards[s]:>8}" for s in SPLITS) + "  shards/")
    tags = ", ".join(f"{tag} {n}" for tag, n in counts["geneval_prompts"].items())
    lines.append(
        f"geneval prompts: {sum(counts['geneval_prompts'].values())} ({tags})  geneval/evaluation_metadata.jsonl"
    )
    lines.append("metadata: metadata.json")
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok data synth``."""
    defaults = SynthConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write the built-in synthetic world (shapes with known ground truth) as images + JSON lines, "
        "WebDataset shards, LLaVA conversations, classification folders and GenEval-style prompts.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--num-images",
        type=int,
        default=defaults.num_images,
        help="captioned images over all splits (default %(default)s)",
    )
    p.add_argument(
        "--size", type=int, default=defaults.size, help="image side in pixels (default %(default)s)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="random seed; same seed, same bytes (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: all CPUs); does not change the output",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share of images in val (default %(default)s)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=defaults.test_fraction,
        help="share of images in test (default %(default)s)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=defaults.shard_size,
        help="samples per tar shard (default %(default)s)",
    )
    p.add_argument(
        "--max-objects",
        type=int,
        default=defaults.max_objects,
        help="objects per image, at most (1..4, default %(default)s)",
    )
    p.add_argument(
        "--object-scale",
        type=float,
        default=defaults.object_scale,
        help="object widths as a multiple of the size classes' (default %(default)s)",
    )
    p.add_argument(
        "--classify-per-class",
        type=int,
        default=defaults.classify_per_class,
        help="classification images per class and split (default %(default)s)",
    )
    p.add_argument(
        "--geneval-per-tag",
        type=int,
        default=None,
        help="GenEval prompts per tag (default: GenEval's own counts, capped by the distinct prompts of the world)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok data synth``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    per_tag = (
        dict(GENEVAL_TAG_COUNTS)
        if args.geneval_per_tag is None
        else dict.fromkeys(GENEVAL_TAGS, args.geneval_per_tag)
    )
    try:
        config = SynthConfig(
            num_images=args.num_images,
            size=args.size,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            shard_size=args.shard_size,
            max_objects=args.max_objects,
            object_scale=args.object_scale,
            classify_per_class=args.classify_per_class,
            geneval_per_tag=per_tag,
        )
        started = time.perf_counter()
        metadata = generate_world(
            args.out, config, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(args.out, metadata, time.perf_counter() - started))
    return 0
