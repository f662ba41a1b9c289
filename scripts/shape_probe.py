"""How fast can a tokenizer's encoder learn shape at all? A supervised probe on the synthetic world.

    python -m unitok.scripts.shape_probe --world runs/quickstart/world [--config unitok-tiny-synth]
        [--steps 1600] [--every 400] [--features encoder tokens codes cnn]

The quick start's tokenizer learns shape only from the pixel losses and the contrastive loss. This probe asks the
easier question first: with the shapes given as labels, how many steps does the same network need? For each
``--features`` choice a fresh model (random init, the run config's architecture and AdamW settings) is trained
with a multi-label head (which of the 8 shapes are in the image, binary cross-entropy) on the world's train
split, at the run config's batch size, and scored every ``--every`` steps on the test split:

- ``encoder``: mean of the encoder's tokens (before the attention projection);
- ``tokens``: mean of the decoder-side tokens of the continuous latent (projection, L2 norm, projection back);
- ``codes``: the same through the quantizer (straight-through), i.e. what the MLLM and the CLIP head read;
- ``cnn``: a plain 4-layer strided CNN with global max pooling (a baseline of the same data and batch).

Scores: exact match (every shape's presence right) and per-label accuracy; predicting "absent" everywhere
scores about 0.82 per label on this world and 0 exact.

    python -m unitok.scripts.shape_probe --world runs/quickstart/world --tokenizer runs/quickstart/tokenizer/final
        [--readers position window conv] [--steps 1600] [--batch 32]

With ``--tokenizer`` the probe asks the MLLM's question instead: do a trained tokenizer's (frozen) codes hold
shape, and what must read them? The world's images are encoded once; a small reader of the code vectors, max
pooled over the grid, is trained with the same multi-label head (AdamW, lr ``--lr``):

- ``position``: the MLLM's per-position projector (:class:`~unitok.mllm.projector.VisualProjector`): each
  position on its own;
- ``window``: the MLLM's window projector (:class:`~unitok.mllm.projector.WindowProjector`, reach 1): each
  position with its earlier neighbours on the grid;
- ``conv``: two full 3x3 convolutions over the grid (a reader that sees every neighbour).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from unitok.data.world import SHAPE_NAMES

logger = logging.getLogger(__name__)

FEATURES = ("encoder", "tokens", "codes", "cnn")


def load_split(world: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N,3,S,S]`` in [-1,1] and shape-presence labels ``[N, len(SHAPE_NAMES)]`` of a world split."""
    path = world / "captions" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: expected a world written by `unitok data synth`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    images = np.stack([np.asarray(Image.open(world / row["image"]).convert("RGB")) for row in rows])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.zeros(len(rows), len(SHAPE_NAMES))
    for i, row in enumerate(rows):
        for obj in row["objects"]:
            labels[i, SHAPE_NAMES.index(obj["shape"])] = 1
    return pixels, labels


class _CNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        widths = (3, width // 4, width // 2, width, width)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(widths):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
        self.body = nn.Sequential(*layers[:-1], nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _TokenizerFeatures(nn.Module):
    def __init__(self, model_config, features: str) -> None:
        super().__init__()
        from unitok.tokenizer import UniTok

        self.model = UniTok(model_config)
        self.features = features
        self.width = model_config.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features == "encoder":
            return self.model.encoder(x).mean(1)
        latents = self.model._latents(x)
        if self.features == "codes":
            latents = self.model.quantizer(latents).quantized
        return self.model._post_quant(latents).mean(1)


READERS = ("position", "window", "conv")


class _CodeReader(nn.Module):
    """Code vectors ``[B,h,w,D]`` -> ``[B,width]``: a reader of the grid, then a max over positions."""

    def __init__(self, kind: str, code_width: int, grid_width: int, width: int = 128) -> None:
        super().__init__()
        from unitok.mllm.projector import VisualProjector, WindowProjector

        self.kind, self.width = kind, width
        if kind == "position":
            self.net = VisualProjector(code_width, width)
        elif kind == "window":
            self.net = WindowProjector(code_width, width, grid_width, window=1)
        elif kind == "conv":
            self.net = nn.Sequential(
                nn.Conv2d(code_width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1)
            )
        else:
            raise ValueError(f"unknown reader {kind!r}; expected one of {READERS}")

    def forward(self, vecs_BhwD: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            out = self.net(vecs_BhwD.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        else:
            out = self.net(vecs_BhwD.flatten(1, 2))
        return F.gelu(out).amax(dim=1)


def _train_and_score(
    net: nn.ModuleDict,
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    opt: torch.optim.Optimizer,
    batch: int,
    steps: int,
    every: int,
    seed: int,
) -> list[dict]:
    """Multi-label training of ``net["body"]`` + ``net["head"]``; a scored row every ``every`` steps."""
    (train_x, train_y), (test_x, test_y) = train, test
    body, head = net["body"], net["head"]
    generator = torch.Generator().manual_seed(seed)
    rows, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(train_x), (batch,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(head(body(train_x[index])), train_y[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                net.eval()
                right = torch.cat(
                    [
                        (head(body(test_x[i : i + 256])) > 0) == (test_y[i : i + 256] > 0)
                        for i in range(0, len(test_x), 256)
                    ]
                )
                net.train()
            row = {
                "features": name,
                "step": step,
                "loss": round(loss.item(), 4),
                "exact": round(float(right.all(1).float().mean()), 4),
                "per_label": round(float(right.float().mean()), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
            logger.info("%s", row)
            rows.append(row)
    return rows


@torch.no_grad()
def encode_split(tokenizer, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The frozen code vectors ``[N,h,w,D]`` of images ``[N,3,S,S]`` (codes looked up in the tokenizer's codebooks)."""
    return torch.cat(
        [
            tokenizer.codes_to_vectors(tokenizer.encode(pixels[i : i + batch]))
            for i in range(0, len(pixels), batch)
        ]
    )


def probe_codes(
    world: Path,
    tokenizer_dir: Path,
    reader: str,
    steps: int,
    every: int,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[dict]:
    """Train one reader of a trained tokenizer's frozen codes; rows as :func:`probe` gives, named ``codes:READER``."""
    from unitok.tokenizer import UniTok

    tokenizer = UniTok.from_pretrained(tokenizer_dir).eval()
    train_x, train_y = load_split(world, "train")
    test_x, test_y = load_split(world, "test")
    if train_x.shape[-1] != tokenizer.config.image_size:
        raise ValueError(
            f"the world's images are {train_x.shape[-1]} px, the tokenizer takes {tokenizer.config.image_size}"
        )
    train_v, test_v = encode_split(tokenizer, train_x), encode_split(tokenizer, test_x)
    torch.manual_seed(seed)
    body = _CodeReader(reader, train_v.shape[-1], train_v.shape[2])
    net = nn.ModuleDict({"body": body, "head": nn.Linear(body.width, len(SHAPE_NAMES))})
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    return _train_and_score(
        net, f"codes:{reader}", (train_v, train_y), (test_v, test_y), opt, batch, steps, every, seed
    )


def probe(world: Path, config_name: str, features: str, steps: int, every: int, seed: int = 0) -> list[dict]:
    """Train one probe; rows of ``step``, ``loss``, ``exact``, ``per_label``, ``seconds`` every ``every`` steps."""
    from unitok.tokenizer.training.config import load_run_config
    from unitok.tokenizer.training.optim import build_adamw

    config = load_run_config(config_name)
    model_config = config.model.tokenizer_config()
    train_x, train_y = load_split(world, "train")
    test_x, test_y = load_split(world, "test")
    if train_x.shape[-1] != model_config.image_size:
        raise ValueError(
            f"the world's images are {train_x.shape[-1]} px, the model takes {model_config.image_size}"
        )
    torch.manual_seed(seed)
    body = _CNN(model_config.width) if features == "cnn" else _TokenizerFeatures(model_config, features)
    net = nn.ModuleDict({"body": body, "head": nn.Linear(body.width, len(SHAPE_NAMES))})
    optim = config.optim
    opt = build_adamw(net, optim.lr, tuple(optim.betas), optim.weight_decay, optim.eps)
    return _train_and_score(
        net,
        features,
        (train_x, train_y),
        (test_x, test_y),
        opt,
        config.train.local_batch_size,
        steps,
        every,
        seed,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, type=Path, help="a world folder of `unitok data synth`")
    parser.add_argument(
        "--config", default="unitok-tiny-synth", help="run config: architecture, AdamW, batch"
    )
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=400, help="score on the test split every N steps")
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=["encoder", "codes", "cnn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", type=Path, help="probe this trained tokenizer's frozen codes instead (a UniTok folder)"
    )
    parser.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS))
    parser.add_argument("--batch", type=int, default=32, help="batch of the frozen-code probe")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the frozen-code probe")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.steps < 1 or args.every < 1:
        raise SystemExit("--steps and --every must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.tokenizer is not None:
        rows = [
            row
            for name in args.readers
            for row in probe_codes(
                args.world, args.tokenizer, name, args.steps, args.every, args.batch, args.lr, args.seed
            )
        ]
    else:
        rows = [
            row
            for name in args.features
            for row in probe(args.world, args.config, name, args.steps, args.every, args.seed)
        ]
    print("| features | step | train loss | exact match | per-label accuracy | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['features']} | {row['step']} | {row['loss']:.4f} | {100 * row['exact']:.1f} % "
            f"| {100 * row['per_label']:.1f} % | {row['seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
