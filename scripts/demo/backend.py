"""What the demo and the terminal chat do with the models, without any user interface.

:class:`DemoBackend` holds the MLLM (optional: a tokenizer-only checkpoint still serves the tokenizer)
and its UniTok, and serialises every use of them with one lock, so two browser tabs or two events
never interleave their generations. :func:`find_checkpoint` turns ``--model DIR`` (by default the
quick start's output folder) into the checkpoint to load.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from unitok.scripts.demo.uploads import UploadLimits, open_image

if TYPE_CHECKING:
    from PIL.Image import Image

    from unitok.mllm import UniTokMLLM
    from unitok.tokenizer import UniTok

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "runs/quickstart"
CONFIG_NAME = "config.json"
MLLM_MARKER = "text_tokenizer"  # only an MLLM checkpoint directory holds its text tokenizer
FINAL_NAME = "final"
SEARCH_DEPTH = 4
MAX_IMAGES = 4
Message = dict[str, str]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found by :func:`find_checkpoint`: ``kind`` is ``"mllm"`` or ``"tokenizer"``."""

    kind: str
    path: Path


def _kind(path: Path) -> str | None:
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return "tokenizer"
    if not (path / CONFIG_NAME).is_file():
        return None
    return "mllm" if (path / MLLM_MARKER).is_dir() else "tokenizer"


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at ``path``, or the best one below it.

    ``path`` may be an MLLM checkpoint directory, a UniTok directory or released ``.pth``, or a folder
    holding checkpoints (such as the quick start's output). Below a folder, an MLLM is preferred over a
    tokenizer, a directory named ``final`` over intermediate ones, and then the most recently written.

    Raises:
        FileNotFoundError: nothing usable there (the message says how to get a model).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"no model at {root}: run `make quickstart` first, or pass --model with an MLLM or UniTok checkpoint"
        )
    kind = _kind(root)
    if kind is not None:
        return Checkpoint(kind, root)
    found: list[Checkpoint] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        # Temporary directories of interrupted atomic writes start with a dot.
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".")] if depth < SEARCH_DEPTH else []
        kind = _kind(here)
        if kind is not None:
            found.append(Checkpoint(kind, here))
            dirnames[:] = []  # the parts inside a checkpoint are not checkpoints of their own
    if not found:
        raise FileNotFoundError(
            f"no MLLM or UniTok checkpoint (a folder with {CONFIG_NAME}) in {root} or below it: run "
            "`make quickstart` first, or pass --model"
        )
    best = max(
        found,
        key=lambda c: (c.kind == "mllm", c.path.name == FINAL_NAME, (c.path / CONFIG_NAME).stat().st_mtime),
    )
    logger.info("found %d checkpoint(s) under %s; using the %s at %s", len(found), root, best.kind, best.path)
    return best


@dataclass
class Reconstruction:
    """The tokenizer tab's result: the model-sized input and its reconstruction (PIL), and their figures."""

    original: Image
    reconstruction: Image
    grid: tuple[int, int, int]
    bits: float
    psnr: float

    def summary(self) -> str:
        """One line of markdown: code grid ``h x w x K``, bits per image and PSNR."""
        h, w, k = self.grid
        return (
            f"code grid **{h} x {w} x {k}** (h x w positions x K sub-codes) · "
            f"**{self.bits:,.0f} bits** per image · PSNR **{self.psnr:.2f} dB**"
        )


class DemoBackend:
    """The models behind the demo tabs and the terminal chat, used one request at a time.

    Args:
        tokenizer: the UniTok (for an MLLM, its own frozen UniTok).
        mllm: the MLLM, or None when only a tokenizer checkpoint was given (chat and text-to-image
            then raise ``RuntimeError``).
        limits: upload limits applied by :meth:`load_image`.
    """

    def __init__(
        self, tokenizer: UniTok, mllm: UniTokMLLM | None = None, limits: UploadLimits | None = None
    ) -> None:
        self.tokenizer = tokenizer.eval()
        self.mllm = mllm.eval() if mllm is not None else None
        self.limits = limits or UploadLimits()
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike, limits: UploadLimits | None = None) -> DemoBackend:
        """Load what :func:`find_checkpoint` finds at ``path`` (on a GPU when there is one)."""
        checkpoint = find_checkpoint(path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if checkpoint.kind == "mllm":
            from unitok.mllm import UniTokMLLM

            mllm = UniTokMLLM.from_pretrained(checkpoint.path).to(device)
            return cls(mllm.unitok, mllm, limits)
        from unitok.tokenizer import UniTok

        logger.warning("%s is a tokenizer checkpoint: chat and text-to-image are off", checkpoint.path)
        return cls(UniTok.from_pretrained(checkpoint.path).to(device), None, limits)

    @property
    def image_size(self) -> int:
        """Side in pixels of the square images the tokenizer reads and writes."""
        return self.tokenizer.config.image_size

    def load_image(self, path: str | os.PathLike) -> Image:
        """An uploaded image checked against :attr:`limits` (raises ``UploadError`` with a user message)."""
        return open_image(path, self.limits)

    def _require_mllm(self) -> UniTokMLLM:
        if self.mllm is None:
            raise RuntimeError(
                "this checkpoint is a tokenizer only: chat and text-to-image need an MLLM checkpoint "
                "(pass --model with one)"
            )
        return self.mllm

    # ------------------------------------------------------------------ chat

    def chat_stream(
        self,
        messages: Sequence[Message],
        image: Image | None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[str]:
        """Stream the next assistant turn: yields the answer so far (growing text), piece by piece.

        ``messages`` are the turns so far, ``{"role": "user"|"assistant", "content": str}``, ending with
        the user's new question; ``image`` (or None) is the picture the conversation is about.
        """
        mllm = self._require_mllm()
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("expected the conversation to end with a user turn")
        # The image goes before the first user turn; a typed placeholder token would claim a second image.
        placeholder = mllm.config.image_token
        messages = [{**m, "content": m["content"].replace(placeholder, "")} for m in messages]
        images = None if image is None else [image]
        with self.lock:
            pieces = mllm.chat_stream(
                messages, images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
            )
            text = ""
            try:
                for piece in pieces:
                    text += piece
                    yield text.strip()
            finally:
                # A reader that stops early (a closed browser tab) must not leave the generation running
                # on the model after the lock is released: let it finish (max_new_tokens bounds it).
                for _ in pieces:
                    pass

    # ------------------------------------------------------------------ text to image

    def generate(
        self,
        prompt: str,
        num_images: int = 1,
        *,
        cfg_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image]:
        """``num_images`` (1-4) images of ``prompt``; ``progress(done, total)`` is called per generated position."""
        mllm = self._require_mllm()
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("expected a non-empty prompt")
        if not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"number of images must be between 1 and {MAX_IMAGES}, got {num_images}")
        with self.lock:
            result = mllm.generate_images(
                [prompt] * num_images,
                cfg_scale=cfg_scale,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                progress=progress,
            )
        return list(result.images)

    # ------------------------------------------------------------------ tokenizer

    def reconstruct(self, image: Image) -> Reconstruction:
        """Encode ``image`` (resized and centre-cropped to :attr:`image_size`) to codes and decode it back."""
        from unitok.eval.image_metrics import psnr
        from unitok.tokenizer.preprocess import load_image, to_pil

        config = self.tokenizer.config
        img_13HW = load_image(image, size=config.image_size)[None]
        device = next(self.tokenizer.parameters()).device
        with self.lock, torch.no_grad():
            codes_BhwK = self.tokenizer.encode(img_13HW.to(device))
            recon_13HW = self.tokenizer.decode(codes_BhwK).float().cpu()
        _, h, w, k = codes_BhwK.shape
        return Reconstruction(
            original=to_pil(img_13HW)[0],
            reconstruction=to_pil(recon_13HW)[0],
            grid=(h, w, k),
            bits=h * w * k * math.log2(config.codebook_size),
            psnr=float(psnr(img_13HW, recon_13HW)[0]),
        )
