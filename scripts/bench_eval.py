"""Throughput of the tokenizer evaluation: ``python -m unitok.scripts.bench_eval [--preset unitok-tiny]``.

Times, on random images of the preset's size and a random-init model: the reconstruction pass of
``evaluate_reconstruction`` (encode + decode + PSNR/SSIM + codebook counts), the same with FID
Inception features (random weights, same cost as the real ones), the zero-shot image path
(``encode_image``), and the Fréchet distance of 2048-d statistics (scipy sqrtm vs the torch eigen
path). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from unitok.eval import InceptionFeatures, evaluate_reconstruction, frechet_distance, frechet_distance_torch
from unitok.tokenizer import PRESETS, TokenizerConfig, UniTok


def _random_inception() -> InceptionFeatures:
    """torch-fidelity's FID Inception with random weights (the real file is not needed to time it)."""
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_inception.pth"
        torch.save(net.state_dict(), path)
        return InceptionFeatures(weights_path=path)


def _timed(fn, repeats: int, warmup: bool = True) -> float:
    """Best of ``repeats`` runs (after one warm-up run), in seconds; on a shared machine the minimum
    is the least disturbed figure."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="unitok-tiny")
    p.add_argument("--images", type=int, default=64, help="images per timed pass")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-inception", action="store_true", help="skip the Inception row (slow on CPU)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = UniTok(TokenizerConfig.preset(args.preset)).to(device).eval()
    size = model.config.image_size
    images = torch.rand(args.images, 3, size, size) * 2 - 1
    loader = list(images.split(args.batch_size))
    rows = []

    def recon(inception=None):
        return evaluate_reconstruction(model, loader, inception=inception, progress=False)

    seconds = _timed(recon, args.repeats)
    rows.append(("reconstruction (encode, decode, PSNR, SSIM, codebook)", args.images / seconds))
    if not args.no_inception:
        inception = _random_inception().to(device)
        seconds = _timed(lambda: recon(inception), args.repeats)
        rows.append(("reconstruction + FID Inception features (2 x 299 px per image)", args.images / seconds))

    @torch.no_grad()
    def zero_shot_images():
        for batch in loader:
            model.encode_image(batch.to(device))

    seconds = _timed(zero_shot_images, args.repeats)
    rows.append(("zero-shot image features (encode_image)", args.images / seconds))

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(4096, 2048)).astype(np.float32) for _ in range(2)]
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]
    scipy_s = _timed(lambda: frechet_distance(*stats[0], *stats[1]), 1, warmup=False)
    torch_s = _timed(lambda: frechet_distance_torch(*stats[0], *stats[1]), 1, warmup=False)

    print(
        f"preset {args.preset}, {size} px, batch {args.batch_size}, {args.images} images, device {device}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| what | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} |")
    print("\n| Fréchet distance, F = 2048 | seconds |\n|---|---|")
    print(f"| scipy.linalg.sqrtm (float64) | {scipy_s:.2f} |\n| torch eigh (float64) | {torch_s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
