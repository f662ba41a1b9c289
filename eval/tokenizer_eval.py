"""Tokenizer evaluation: ``unitok eval-tokenizer`` and the library functions behind it.

Reconstruction metrics over a set of images, in one pass: rFID (FID between the Inception features of
the reconstructions and of the originals, or of a reference set), PSNR, SSIM, LPIPS and per-sub-codebook
usage / perplexity; plus zero-shot classification on a class folder with the quantized CLIP features.
Reconstructions are quantised to 8 bits before every metric, i.e. measured as they would be saved to PNG,
which is what the paper's rFID (reconstructions written to disk, read back by torch-fidelity) measures.

Metrics whose weights are not available (rFID without FID Inception weights, LPIPS without VGG
weights) are reported as ``null`` with a log line saying why, instead of failing the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .codebook import CodebookStats
from .context import autocast, eval_mode
from .fid import FeatureStats, frechet_distance, frechet_distance_torch
from .image_metrics import psnr, ssim
from .inception import FID_LAYERS, InceptionFeatures, find_cached_inception_weights, to_uint8
from .zero_shot import TEMPLATE_SETS, evaluate_zero_shot, evenly_spaced_subset

logger = logging.getLogger(__name__)

DOWNLOAD = "download"
DATA_FORMATS = ("auto", "images", "image-text", "shards")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# "scipy": sqrtm as torch-fidelity computes it; "torch": two symmetric eigendecompositions, ~10x faster.
FID_BACKENDS = {"scipy": frechet_distance, "torch": frechet_distance_torch}
# LPIPS needs its VGG trunk to keep a spatial extent through 4 poolings.
LPIPS_MIN_SIZE = 16
# Per-image PSNR of a perfect (bit-exact) reconstruction is infinite; it enters the mean as this value.
PSNR_CAP_DB = 100.0


def _split_batch(batch) -> tuple[torch.Tensor | None, int]:
    """Images and the number of skipped files of one loader batch (tensor, tuple/list or dict)."""
    if isinstance(batch, dict):
        return batch["images"], int(batch.get("skipped", 0))
    if isinstance(batch, tuple | list):
        return batch[0], 0
    return batch, 0


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _quantize_8bit(img_B3HW: torch.Tensor) -> torch.Tensor:
    return to_uint8(img_B3HW).float() / 127.5 - 1.0


def _ref_mean_cov(ref_stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ref_stats, FeatureStats):
        return ref_stats.mean, ref_stats.cov
    mu, sigma = ref_stats
    return np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module,
    loader: Iterable,
    inception: InceptionFeatures | None = None,
    lpips: nn.Module | None = None,
    ref_stats: FeatureStats | tuple[np.ndarray, np.ndarray] | None = None,
    max_images: int | None = None,
    grid_path: str | Path | None = None,
    grid_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    fid_backend: str = "scipy",
    progress: bool = True,
) -> dict:
    """Reconstruct every image of ``loader`` and measure the reconstructions.

    Args:
        model: a UniTok (``encode``/``decode``, ``config.num_codebooks``/``codebook_size``); put in eval
            mode for the pass and restored after.
        loader: yields images [B,3,H,W] in [-1,1]; or tuples whose first item is that (image-text
            datasets); or ``{"images", "skipped"}`` dicts (:func:`unitok.eval.image_files.collate_images`).
        inception: FID feature extractor; ``None`` leaves rFID out. Moved to the model's device.
        lpips: ``forward(rec, img) -> batch mean`` (``unitok.tokenizer.losses.LPIPS``); ``None`` leaves LPIPS out.
        ref_stats: reference features for rFID (a :class:`FeatureStats` or ``(mu, sigma)``); default:
            the originals of this loader.
        max_images: stop after this many images.
        grid_path: write a PNG of the first ``grid_size`` originals (top row) above their reconstructions.
        autocast_dtype: run the tokenizer under autocast with this dtype (``None``: fp32).
        fid_backend: ``"scipy"`` (:func:`frechet_distance`, as torch-fidelity) or ``"torch"``
            (:func:`frechet_distance_torch`, same value, faster for 2048-d features).
        progress: show a tqdm bar.

    Returns:
        JSON-ready dict: ``num_images``, ``skipped_images``, ``rfid`` (None without ``inception``),
        ``rfid_reference``, ``psnr`` (dB, mean of per-image values, each capped at ``PSNR_CAP_DB``),
        ``ssim``, ``lpips`` (None without ``lpips``), ``codebook`` (:meth:`CodebookStats.summary`),
        ``seconds``, ``images_per_second``.
    """
    if fid_backend not in FID_BACKENDS:
        raise ValueError(f"fid_backend must be one of {sorted(FID_BACKENDS)}, got {fid_backend!r}")
    device = _model_device(model)
    config = model.config
    codebook = CodebookStats(config.num_codebooks, config.codebook_size)
    recon_feats, orig_feats = FeatureStats(), FeatureStats()
    if inception is not None:
        inception.to(device)
    if lpips is not None:
        lpips.to(device)
    # Sums stay on the device until the end: no host read per batch.
    total_dtype = torch.float32 if device.type == "mps" else torch.float64
    totals = {key: torch.zeros((), dtype=total_dtype, device=device) for key in ("psnr", "ssim", "lpips")}
    seen = skipped = 0
    grid_orig, grid_recon = [], []
    start = time.perf_counter()
    dataset = getattr(loader, "dataset", None)
    total = max_images or (len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None)
    bar = tqdm(total=total, desc="reconstruct", unit="img", disable=not progress)
    with eval_mode(model):
        for batch in loader:
            img_B3HW, batch_skipped = _split_batch(batch)
            skipped += batch_skipped
            if img_B3HW is None:
                continue
            if max_images is not None:
                img_B3HW = img_B3HW[: max_images - seen]
            img_B3HW = img_B3HW.to(device, non_blocking=True).float()
            with autocast(device, autocast_dtype):
                codes_BhwK = model.encode(img_B3HW)
                recon_B3HW = model.decode(codes_BhwK)
            recon_B3HW = _quantize_8bit(recon_B3HW.float())
            codebook.update(codes_BhwK)
            totals["psnr"] += psnr(recon_B3HW, img_B3HW).clamp(max=PSNR_CAP_DB).sum()
            totals["ssim"] += ssim(recon_B3HW, img_B3HW).sum()
            if lpips is not None:
                totals["lpips"] += lpips(recon_B3HW, img_B3HW) * img_B3HW.shape[0]
            if inception is not None:
                recon_feats.update(inception(recon_B3HW))
                if ref_stats is None:
                    orig_feats.update(inception(img_B3HW))
            if grid_path is not None and sum(len(g) for g in grid_orig) < grid_size:
                grid_orig.append(img_B3HW.cpu())
                grid_recon.append(recon_B3HW.cpu())
            seen += img_B3HW.shape[0]
            bar.update(img_B3HW.shape[0])
            if max_images is not None and seen >= max_images:
                break
    bar.close()
    totals = {key: float(value) for key, value in totals.items()}
    seconds = time.perf_counter() - start
    if seen == 0:
        raise ValueError(f"no readable images to evaluate ({skipped} skipped)")

    rfid = None
    if inception is not None:
        if seen < 2:
            logger.warning("rFID needs at least 2 images, got %d; reporting null", seen)
        else:
            mu_ref, sigma_ref = _ref_mean_cov(ref_stats if ref_stats is not None else orig_feats)
            rfid = FID_BACKENDS[fid_backend](recon_feats.mean, recon_feats.cov, mu_ref, sigma_ref)
    if grid_path is not None and grid_orig:
        save_grid(torch.cat(grid_orig)[:grid_size], torch.cat(grid_recon)[:grid_size], grid_path)
    return {
        "num_images": seen,
        "skipped_images": skipped,
        "rfid": rfid,
        "rfid_reference": None if inception is None else ("originals" if ref_stats is None else "given"),
        "psnr": totals["psnr"] / seen,
        "ssim": totals["ssim"] / seen,
        "lpips": totals["lpips"] / seen if lpips is not None else None,
        "codebook": codebook.summary(),
        "seconds": seconds,
        "images_per_second": seen / seconds,
    }


@torch.no_grad()
def reference_stats(
    inception: InceptionFeatures,
    loader: Iterable,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FeatureStats:
    """FID feature statistics of a reference set (e.g. the ImageNet reference batch) for ``ref_stats``."""
    inception.to(device)
    stats = FeatureStats()
    for batch in tqdm(loader, desc="reference features", disable=not progress):
        img_B3HW, _ = _split_batch(batch)
        if img_B3HW is None:
            continue
        if max_images is not None:
            img_B3HW = img_B3HW[: max_images - stats.count]
        stats.update(inception(img_B3HW.to(device).float()))
        if max_images is not None and stats.count >= max_images:
            break
    return stats


def save_grid(orig_B3HW: torch.Tensor, recon_B3HW: torch.Tensor, path: str | Path) -> Path:
    """PNG with the originals [B,3,H,W] in [-1,1] on the top row and their reconstructions below."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(torch.cat([orig_B3HW, recon_B3HW]), nrow=orig_B3HW.shape[0], padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((grid + 1) / 2, path)
    return path


# -------------------------------------------------------------------------------------------------
# building blocks of the command line


def build_image_dataset(data: str, image_size: int, data_format: str = "auto", split: str = "val"):
    """The dataset behind ``--data``: a folder of images (recursive), an image-text folder
    (``captions/{split}.jsonl`` + images), or WebDataset shards (brace pattern, glob, ``.tar``, folder of tars).

    Returns:
        ``(dataset, format name)``; image files come as :class:`ImageFiles` items, the others as ``(img, caption)``.
    """
    from unitok.data import ImageTextFolder, ImageTextWebDataset, eval_transform

    from .image_files import ImageFiles, has_images

    if data_format not in DATA_FORMATS:
        raise ValueError(f"data format must be one of {DATA_FORMATS}, got {data_format!r}")
    path = Path(data)
    captions = path / "captions"
    if (
        data_format in ("auto", "image-text")
        and captions.is_dir()
        and not (captions / f"{split}.jsonl").is_file()
    ):
        # Falling through to "every image under the folder" would evaluate the training split too.
        splits = sorted(p.stem for p in captions.glob("*.jsonl"))
        raise ValueError(f"--split {split!r}: {captions} has no {split}.jsonl; its splits are {splits}")
    if data_format == "auto":
        if not path.is_dir():
            data_format = "shards"
        elif (path / "captions" / f"{split}.jsonl").is_file():
            data_format = "image-text"
        elif has_images(path):
            data_format = "images"
        elif any(path.glob("*.tar")):
            data_format = "shards"
        else:
            raise ValueError(
                f"{data} holds no images, no captions/{split}.jsonl and no .tar shards; expected a folder of "
                "images, an image-text folder or WebDataset shards"
            )
    if data_format == "images":
        return ImageFiles(path, image_size), data_format
    if data_format == "image-text":
        # No replacement of unreadable images by the next one: that would count an image twice.
        dataset = ImageTextFolder(path, split=split, transform=eval_transform(image_size), replace_bad=False)
        return dataset, data_format
    # One process reads every shard: the evaluation is not split over ranks.
    shards = ImageTextWebDataset(str(data), transform=eval_transform(image_size), rank=0, world_size=1)
    return shards, data_format


def make_loader(dataset, batch_size: int, num_workers: int, max_images: int | None = None) -> DataLoader:
    """Ordered DataLoader; a map-style dataset is cut to ``max_images`` spread evenly over it. Batches
    are ``{"images", "skipped"}`` dicts (unreadable files dropped and counted, :func:`collate_images`)."""
    from .image_files import collate_images

    if not isinstance(dataset, IterableDataset):
        dataset = evenly_spaced_subset(dataset, max_images)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)


def load_inception(spec: str | None, layer: str = "2048") -> InceptionFeatures | None:
    """``--inception``: a path (must load), ``download`` (torch-fidelity fetches the weights), or
    nothing (use the weights in the torch hub cache if a previous download left them, else skip rFID)."""
    if layer != "2048":
        logger.warning("rFID on Inception layer %s: a quick check, not comparable with published FIDs", layer)
    if spec == DOWNLOAD:
        return InceptionFeatures(download=True, layer=layer)
    if spec is not None:
        return InceptionFeatures(weights_path=spec, layer=layer)
    cached = find_cached_inception_weights()
    if cached is None:
        logger.warning(
            "rFID skipped: no FID Inception weights (pass --inception PATH to "
            "weights-inception-2015-12-05-6726825d.pth or pt_inception-2015-12-05-6726825d.pth, or --inception download)"
        )
        return None
    logger.info("rFID: using cached FID Inception weights %s", cached)
    return InceptionFeatures(weights_path=cached, layer=layer)


def load_lpips(spec: str | None, image_size: int) -> nn.Module | None:
    """``--lpips-weights``: a path (combined LPIPS file or torchvision VGG16 weights), ``download``, or
    nothing (use torchvision's VGG16 weights if cached, else skip LPIPS)."""
    if image_size < LPIPS_MIN_SIZE:
        logger.warning(
            "LPIPS skipped: images of %d px are below its %d px minimum", image_size, LPIPS_MIN_SIZE
        )
        return None
    from unitok.tokenizer.losses import LPIPS

    if spec is not None and spec != DOWNLOAD:
        return LPIPS(net="vgg", weights_path=spec, min_size=LPIPS_MIN_SIZE)
    if spec is None:
        import torchvision

        url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        if not (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file():
            logger.warning(
                "LPIPS skipped: no VGG16 weights (pass --lpips-weights PATH or --lpips-weights download)"
            )
            return None
    return LPIPS(net="vgg", pretrained=True, min_size=LPIPS_MIN_SIZE)


def load_model(model: str | None, preset: str | None) -> nn.Module:
    """``--model`` (our directory format, a released ``.pth``, a trainer checkpoint ``checkpoints/step-N``
    or a run folder, whose newest checkpoint is used) or ``--preset`` (random weights, for smoke runs)."""
    from unitok.tokenizer import TokenizerConfig, UniTok
    from unitok.tokenizer.training.export import is_trainer_checkpoint, load_checkpoint_model

    if model is not None:
        if is_trainer_checkpoint(model):
            return load_checkpoint_model(model)
        return UniTok.from_pretrained(model)
    logger.warning("evaluating a randomly initialised %s (no --model given)", preset)
    return UniTok(TokenizerConfig.preset(preset))


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _rfid_reference(report: dict) -> str:
    if report["rfid_reference"] == "originals":
        size = report["image_size"]
        return f"the originals, resized and centre-cropped to {size}x{size} as the tokenizer saw them"
    return report["rfid_reference"]


def format_markdown(report: dict) -> str:
    """The report as a markdown table of the headline numbers."""
    cb = report["codebook"]
    rows = [
        (
            "images",
            str(report["num_images"])
            + (f" ({report['skipped_images']} skipped)" if report["skipped_images"] else ""),
        ),
        (
            "rFID",
            _fmt(report["rfid"], ".3f")
            + (f" (vs {_rfid_reference(report)})" if report["rfid"] is not None else ""),
        ),
        ("PSNR (dB)", _fmt(report["psnr"], ".2f")),
        ("SSIM", _fmt(report["ssim"], ".4f")),
        ("LPIPS (VGG)", _fmt(report["lpips"], ".4f")),
        ("codebook usage % (mean of K)", _fmt(cb["usage_percent_mean"], ".2f")),
        (
            "codebook perplexity (mean of K, of V)",
            f"{_fmt(cb['perplexity_mean'], '.1f')} of {cb['codebook_size']}",
        ),
    ]
    zs = report.get("zero_shot")
    if zs is not None:
        for key in sorted(k for k in zs if k.startswith("top")):
            rows.append((f"zero-shot {key} % ({zs['num_classes']} classes)", _fmt(100 * zs[key], ".2f")))
    rows.append(("reconstruction throughput (images/s)", _fmt(report["images_per_second"], ".1f")))
    if zs is not None:
        rows.append(("zero-shot throughput (images/s)", _fmt(zs["images_per_second"], ".1f")))
    lines = [
        f"# Tokenizer evaluation: {report['model']}",
        "",
        f"data: `{report['data']}` ({report['data_format']}), {report['image_size']} px, device {report['device']}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "Per sub-codebook usage %: " + ", ".join(f"{u:.1f}" for u in cb["usage_percent"]),
        "",
        "Per sub-codebook perplexity: " + ", ".join(f"{p:.1f}" for p in cb["perplexity"]),
        "",
    ]
    return "\n".join(lines)


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``--out``: ``X.json`` -> (X.json, X.md, X_grid.png); a folder -> (report.json, report.md, recon_grid.png) in it."""
    out = Path(out)
    if out.suffix == ".json":
        return out, out.with_suffix(".md"), out.with_name(out.stem + "_grid.png")
    return out / "report.json", out / "report.md", out / "recon_grid.png"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``unitok eval-tokenizer``."""
    from unitok.tokenizer import PRESETS

    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a UniTok tokenizer: rFID, PSNR, SSIM, LPIPS and codebook usage on a set of images, "
        "and zero-shot accuracy on a class folder. Writes report.json, report.md and a grid of reconstructions.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model", help="checkpoint: a save_pretrained directory or the released unitok_tokenizer.pth"
    )
    src.add_argument(
        "--preset", choices=sorted(PRESETS), help="random-init model of this preset (smoke runs, benchmarks)"
    )
    p.add_argument(
        "--data", required=True, help="folder of images (recursive), image-text folder, or WebDataset shards"
    )
    p.add_argument(
        "--data-format", choices=DATA_FORMATS, default="auto", help="how to read --data (default: detect)"
    )
    p.add_argument("--split", default="val", help="split of an image-text folder (default %(default)s)")
    p.add_argument(
        "--ref",
        help="rFID reference: images (any --data form) or an .npz with 'mu' and 'sigma' of "
        "pool3 features (default: the originals of --data)",
    )
    p.add_argument(
        "--inception",
        help=f"FID Inception weights (.pth), or '{DOWNLOAD}'; without it rFID is skipped "
        "unless torch-fidelity's cached weights are found",
    )
    p.add_argument(
        "--fid-layer",
        choices=FID_LAYERS,
        default="2048",
        help="Inception features for rFID: 2048 (pool3) is FID; the others are for quick checks only",
    )
    p.add_argument(
        "--fid-backend",
        choices=sorted(FID_BACKENDS),
        default="scipy",
        help="matrix square root of the FID: scipy sqrtm (as torch-fidelity) or torch eigh (same value, faster)",
    )
    p.add_argument(
        "--lpips-weights", help=f"LPIPS weights (combined lpips_with_vgg.pth or VGG16 .pth), or '{DOWNLOAD}'"
    )
    p.add_argument(
        "--zeroshot", metavar="CLASS_DIR", help="class folder CLASS_DIR/{class}/*.png for zero-shot accuracy"
    )
    p.add_argument(
        "--templates",
        choices=TEMPLATE_SETS,
        default="auto",
        help="zero-shot prompts (default auto: the paper's 80 ImageNet prompts, a synthetic world's own on its folders)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--image-size", type=int, help="resize + centre-crop side (default: the model's image_size)"
    )
    p.add_argument(
        "--max-images", type=int, help="evaluate at most this many images (spread evenly over the set)"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype of the tokenizer"
    )
    p.add_argument("--grid-size", type=int, default=8, help="images in the reconstruction grid PNG")
    p.add_argument(
        "--out", default="runs/eval_tokenizer", help="report path (X.json) or folder (default %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_reference(
    ref: str,
    inception: InceptionFeatures,
    image_size: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> FeatureStats | tuple[np.ndarray, np.ndarray]:
    """``--ref``: precomputed ``(mu, sigma)`` from an ``.npz``, or the features of a set of images."""
    if ref.endswith(".npz"):
        with np.load(ref, allow_pickle=False) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(
                    f"{ref} must hold arrays 'mu' [2048] and 'sigma' [2048,2048], got {list(stats)}"
                )
            return stats["mu"], stats["sigma"]
    dataset, _ = build_image_dataset(ref, image_size)
    stats = reference_stats(
        inception, make_loader(dataset, batch_size, num_workers), device=device, progress=progress
    )
    logger.info("rFID reference: %d images from %s", stats.count, ref)
    return stats


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``unitok eval-tokenizer``; returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1) or args.grid_size < 0:
        parser.error("--batch-size and --max-images must be >= 1 and --grid-size >= 0")
    if args.image_size is not None and args.image_size < 16:
        parser.error(f"--image-size must be at least 16 pixels, got {args.image_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available; use --device cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    autocast_dtype = PRECISIONS[args.precision]
    progress = not args.no_progress

    model = load_model(args.model, args.preset).to(device).eval()
    image_size = args.image_size or model.config.image_size
    inception = load_inception(args.inception, args.fid_layer)
    lpips = load_lpips(args.lpips_weights, image_size)

    dataset, data_format = build_image_dataset(args.data, image_size, args.data_format, args.split)
    logger.info("evaluating on %s (%s)", args.data, data_format)
    ref_stats = None
    if args.ref is not None and inception is None:
        logger.warning("--ref %s ignored: rFID is skipped", args.ref)
    elif args.ref is not None:
        ref_stats = load_reference(
            args.ref, inception, image_size, args.batch_size, args.workers, device, progress
        )

    json_path, md_path, grid_path = output_paths(args.out)
    loader = make_loader(dataset, args.batch_size, args.workers, args.max_images)
    result = evaluate_reconstruction(
        model,
        loader,
        inception=inception,
        lpips=lpips,
        ref_stats=ref_stats,
        max_images=args.max_images,
        grid_path=grid_path if args.grid_size > 0 else None,
        grid_size=args.grid_size,
        autocast_dtype=autocast_dtype,
        fid_backend=args.fid_backend,
        progress=progress,
    )
    if data_format == "shards":
        # The shard reader counts its own skips (per process, so only exact without workers).
        result["skipped_images"] = dataset.skipped.total if args.workers == 0 else None
    if args.ref is not None and ref_stats is not None:
        result["rfid_reference"] = args.ref

    zero_shot = None
    if args.zeroshot is not None:
        zero_shot = evaluate_zero_shot(
            model,
            args.zeroshot,
            templates=args.templates,
            batch_size=args.batch_size,
            image_size=image_size,
            max_images=args.max_images,
            num_workers=args.workers,
            autocast_dtype=autocast_dtype,
            progress=progress,
        )

    report = {
        "model": args.model or f"preset:{args.preset} (random init)",
        "data": str(args.data),
        "data_format": data_format,
        "image_size": image_size,
        "device": str(device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        **result,
        "zero_shot": zero_shot,
        "grid": str(grid_path) if args.grid_size > 0 else None,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(format_markdown(report))
    logger.info("wrote %s and %s", json_path, md_path)
    print(format_markdown(report))
    return 0
