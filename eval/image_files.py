"""A plain directory of images (searched recursively) as a dataset for reconstruction metrics.

Unreadable files are not replaced by another image (that would count one image twice in rFID):
``__getitem__`` returns ``None`` for them and :func:`collate_images` drops and counts them, so the
count reaches the main process even with DataLoader workers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from unitok.data.datasets import IMAGE_EXTENSIONS
from unitok.tokenizer.preprocess import load_image

logger = logging.getLogger(__name__)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def has_images(root: str | Path) -> bool:
    """Whether ``root`` holds at least one image file (recursively); stops at the first one."""
    return any(_is_image(p) for p in Path(root).rglob("*"))


def list_images(root: str | Path) -> list[Path]:
    """All files under ``root`` (recursively) with an image extension, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image directory {root}")
    return sorted(p for p in root.rglob("*") if _is_image(p))


class ImageFiles(Dataset):
    """Images under ``root`` -> ``[3,S,S]`` in [-1,1] (short side resized, centre crop), or ``None`` if unreadable.

    Args:
        root: a directory, searched recursively for ``.png/.jpg/.jpeg/.webp/.bmp`` files.
        image_size: S.
    """

    def __init__(self, root: str | Path, image_size: int):
        self.root = Path(root)
        self.image_size = image_size
        self.paths = list_images(self.root)
        if not self.paths:
            raise ValueError(f"{self.root} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        path = self.paths[index]
        try:
            return load_image(path, self.image_size)
        except Exception as err:  # any decoder failure (DecompressionBombError, ...) skips the file
            logger.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
            return None


def collate_images(items: list) -> dict:
    """Stack the readable images; ``{"images": [B,3,S,S] or None, "skipped": number of None items}``.

    Items are images, ``(image, caption, ...)`` tuples (image-text readers), or ``None`` for an
    unreadable file.
    """
    images = [item[0] if isinstance(item, tuple | list) else item for item in items if item is not None]
    return {"images": torch.stack(images) if images else None, "skipped": len(items) - len(images)}
