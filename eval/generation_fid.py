"""Generation FID (MJHQ-30K style): ``unitok eval-gen-fid``.

FID between a folder of generated images and a reference: a folder of real images (MJHQ-30K's
``mjhq30k_imgs/``) or precomputed statistics (``.npz`` with ``mu`` [2048] and ``sigma`` [2048,2048]). Features are
those of the tokenizer's rFID (:class:`unitok.eval.inception.InceptionFeatures`: torch-fidelity's FID
Inception-v3, pool3) and the distance is :func:`unitok.eval.fid.frechet_distance`, so generation FID and rFID
go through one Fréchet path.

With ``--model`` and ``--prompts`` the command first generates one image per prompt into ``<out>/images/``
(batched, seeded per chunk, resumable: images already there are kept). Prompt files: MJHQ-30K's
``meta_data.json`` (``{id: {"prompt", "category"}}``), JSON lines with ``prompt`` (and optional ``id``), or plain
text with one prompt per line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .fid import FeatureStats, frechet_distance
from .geneval import SamplingSettings, make_grid
from .harness import default_device, fmt, load_mllm, markdown_table, run_cli, write_json_atomic
from .inception import FID_LAYERS, InceptionFeatures

logger = logging.getLogger(__name__)


def read_prompt_list(path: str | Path) -> list[tuple[str, str]]:
    """``(id, prompt)`` pairs from MJHQ's ``meta_data.json``, a JSON-lines file or a text file (see module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed entry (file and line or key named), duplicate ids, or no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    pairs: list[tuple[str, str]] = []
    if path.suffix == ".json":
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if not isinstance(meta, dict):
            raise ValueError(
                f"{path}: expected MJHQ's {{id: {{'prompt': ...}}}} object, got {type(meta).__name__}"
            )
        for key, entry in meta.items():
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("prompt"), str)
                or not entry["prompt"].strip()
            ):
                raise ValueError(f"{path}: entry {key!r} has no 'prompt' string")
            pairs.append((str(key), entry["prompt"]))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                    prompt = row["prompt"]
                    if not isinstance(prompt, str) or not prompt.strip():
                        raise ValueError("empty prompt")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"{path}:{lineno}: malformed prompt line ({err}); expected {{'prompt': ...}}"
                    ) from None
                pairs.append((str(row.get("id", f"{len(pairs):06d}")), prompt))
            else:
                pairs.append((f"{len(pairs):06d}", line.strip()))
    if not pairs:
        raise ValueError(f"{path} holds no prompts")
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} has duplicate prompt ids")
    for i in ids:
        if "/" in i or i.startswith("."):
            raise ValueError(f"{path}: prompt id {i!r} cannot be a file name")
    return pairs


def generate_for_fid(
    model: Any,
    prompts: Sequence[tuple[str, str]],
    out_dir: str | Path,
    settings: SamplingSettings | None = None,
    progress: bool = True,
) -> dict:
    """One image per prompt into ``out_dir/<id>.png``; chunks of ``batch_size`` prompts, seed ``seed + chunk``.

    Chunks whose images all exist are skipped (a rerun resumes); each PNG is written through a temporary name.
    Returns ``{"images", "generated", "resumed", "seconds", "images_per_second"}``.
    """
    settings = settings or SamplingSettings(n_samples=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bs = settings.batch_size
    chunks = [list(prompts[s : s + bs]) for s in range(0, len(prompts), bs)]
    todo = [(k, c) for k, c in enumerate(chunks) if not all((out / f"{i}.png").is_file() for i, _ in c)]
    generated, start = 0, time.perf_counter()
    bar = tqdm(total=sum(len(c) for _, c in todo), desc="generate", unit="img", disable=not progress)
    for k, chunk in todo:
        result = model.generate_images(
            [p for _, p in chunk],
            cfg_scale=settings.cfg_scale,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed + k,
            image_size=settings.image_size,
        )
        for (i, _), image in zip(chunk, result.images):
            if not (out / f"{i}.png").is_file():
                tmp = out / f".{i}.tmp.png"
                image.save(tmp)
                tmp.replace(out / f"{i}.png")
                generated += 1
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "images": len(prompts),
        "generated": generated,
        "resumed": len(prompts) - sum(len(c) for _, c in todo),
        "seconds": seconds,
        "images_per_second": generated / seconds if generated and seconds > 0 else None,
    }


def folder_stats(
    inception: InceptionFeatures,
    folder: str | Path,
    image_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureStats:
    """FID feature statistics of every image under ``folder`` (short side resized to ``image_size``, centre crop)."""
    from .image_files import ImageFiles
    from .tokenizer_eval import make_loader, reference_stats

    dataset = ImageFiles(folder, image_size)
    stats = reference_stats(
        inception, make_loader(dataset, batch_size, num_workers), device=device, progress=progress
    )
    if stats.count < 2:
        raise ValueError(f"FID needs at least 2 readable images, {folder} gave {stats.count}")
    return stats


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from an ``.npz`` with arrays ``mu`` and ``sigma``."""
    with np.load(path, allow_pickle=False) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"{path} must hold arrays 'mu' [F] and 'sigma' [F,F], got {list(stats)}")
        return stats["mu"], stats["sigma"]


def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write ``mu``/``sigma`` (and the image count) to an ``.npz`` usable as ``--ref``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=stats.mean, sigma=stats.cov, count=np.asarray(stats.count))
    return path


def generation_fid(
    inception: InceptionFeatures,
    images: str | Path,
    ref: str | Path,
    image_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """FID of the images under ``images`` against ``ref`` (a folder of images or an ``.npz`` of statistics).

    Returns ``{"fid", "images", "reference", "reference_images"}`` (``reference_images`` None for an ``.npz``).
    """
    gen = folder_stats(inception, images, image_size, batch_size, device, progress=progress)
    if str(ref).endswith(".npz"):
        mu, sigma = load_stats(ref)
        ref_count = None
    else:
        ref_stats = folder_stats(inception, ref, image_size, batch_size, device, progress=progress)
        mu, sigma, ref_count = ref_stats.mean, ref_stats.cov, ref_stats.count
    return {
        "fid": frechet_distance(gen.mean, gen.cov, mu, sigma),
        "images": gen.count,
        "reference": str(ref),
        "reference_images": ref_count,
        "stats": gen,
    }


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok eval-gen-fid``."""
    d = SamplingSettings(n_samples=1)
    p = argparse.ArgumentParser(
        prog=prog,
        description="Generation FID (MJHQ-30K style) of a folder of generated images against reference images or "
        "statistics, with the FID Inception of the tokenizer's rFID. Optionally generates the images first.",
    )
    p.add_argument(
        "--out", required=True, help="output folder (images/ when generating, results.json, results.md)"
    )
    p.add_argument("--ref", required=True, help="reference: folder of images, or .npz with mu and sigma")
    p.add_argument("--images", help="folder of generated images (default: <out>/images)")
    p.add_argument(
        "--model", help="MLLM checkpoint folder: generate one image per prompt into <out>/images first"
    )
    p.add_argument("--prompts", help="MJHQ meta_data.json, JSON lines with 'prompt', or one prompt per line")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument(
        "--inception",
        required=True,
        help="FID Inception weights (weights-inception-2015-12-05-6726825d.pth), or 'download'",
    )
    p.add_argument("--fid-layer", choices=FID_LAYERS, default="2048", help="2048 (pool3) is FID")
    p.add_argument(
        "--image-size", type=int, help="side the images are resized/cropped to (default: the generated size)"
    )
    p.add_argument("--save-stats", help="write the generated set's mu/sigma to this .npz")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=default_device())
    p.add_argument("--no-progress", action="store_true")
    return p


def _first_image_size(folder: Path) -> int:
    from PIL import Image

    from .image_files import list_images

    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{folder} holds no images")
    with Image.open(paths[0]) as im:
        return min(im.size)


def run(args: argparse.Namespace, inception: InceptionFeatures | None = None) -> dict:
    """Generate (with ``--model``), measure FID, write the reports; ``inception`` overrides ``--inception``."""
    from .tokenizer_eval import load_inception

    out = Path(args.out)
    progress = not args.no_progress
    images = Path(args.images) if args.images else out / "images"
    ref = Path(args.ref)
    if not ref.exists():
        raise FileNotFoundError(f"reference {ref} does not exist (expected a folder of images or an .npz)")
    report: dict[str, Any] = {"model": args.model, "images_dir": str(images)}
    if args.model is not None:
        if args.prompts is None:
            raise ValueError("--model needs --prompts (the prompts to generate)")
        prompts = read_prompt_list(args.prompts)[: args.limit]
        settings = SamplingSettings(
            n_samples=1,
            batch_size=args.batch_size,
            cfg_scale=args.cfg_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        model = load_mllm(args.model, args.device)
        report["sampling"] = asdict(settings)
        report["generation"] = generate_for_fid(model, prompts, images, settings, progress)
    if not images.is_dir():
        raise FileNotFoundError(
            f"no generated images folder {images} (pass --images or --model with --prompts)"
        )
    if inception is None:
        inception = load_inception(args.inception, args.fid_layer)
    image_size = args.image_size or _first_image_size(images)
    result = generation_fid(inception, images, ref, image_size, args.batch_size, args.device, progress)
    stats = result.pop("stats")
    if args.save_stats:
        report["saved_stats"] = str(save_stats(args.save_stats, stats))
    report.update(result, image_size=image_size, fid_layer=args.fid_layer)
    from PIL import Image

    from .image_files import list_images

    sample = [Image.open(p).convert("RGB") for p in list_images(images)[:16]]
    make_grid(sample, columns=min(8, len(sample))).save(out / "grid.png")
    report["grid"] = str(out / "grid.png")
    write_json_atomic(out / "results.json", report)
    (out / "results.md").write_text(format_markdown(report), encoding="utf-8")
    return report


def format_markdown(report: dict) -> str:
    """``results.md``: the FID and what it was measured on."""
    rows = [
        ("FID", fmt(report["fid"], ".3f")),
        ("generated images", str(report["images"])),
        ("reference", f"{report['reference']} ({report['reference_images'] or 'statistics'})"),
        ("image size (px)", str(report["image_size"])),
        (
            "Inception layer",
            report["fid_layer"] + ("" if report["fid_layer"] == "2048" else " (quick check only)"),
        ),
    ]
    gen = report.get("generation")
    if gen and gen.get("images_per_second"):
        rows.append(("generation throughput (images/s)", fmt(gen["images_per_second"], ".2f")))
    return (
        f"# Generation FID: {report.get('model') or report['images_dir']}\n\n"
        + markdown_table(["metric", "value"], rows)
        + "\n![samples](grid.png)\n"
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok eval-gen-fid``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    report = run_cli(run, args)
    if report is None:
        return 2
    print(format_markdown(report))
    return 0
