"""Opening user-uploaded images safely: size limit, format allowlist, decompression-bomb check.

Everything a user can upload through the demo or name in the terminal chat goes through
:func:`open_image`, which either returns a loaded RGB image or raises :class:`UploadError` with a
message meant for the user (no traceback, no server paths).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from unitok.data.transforms import to_rgb

# Raster formats PIL decodes itself; formats that shell out (EPS through Ghostscript) are never opened.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class UploadError(ValueError):
    """An upload that is not a usable image; the message says why and what is accepted."""


@dataclass(frozen=True)
class UploadLimits:
    """Limits on one uploaded image: ``max_bytes`` of file, ``max_pixels`` (width * height) once decoded."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(
                f"upload limits must be positive, got max_bytes={self.max_bytes}, max_pixels={self.max_pixels}"
            )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def open_image(path: str | os.PathLike, limits: UploadLimits | None = None) -> Image.Image:
    """Open an uploaded image file and return it decoded as RGB.

    Raises:
        UploadError: the file is missing or empty, larger than ``limits.max_bytes``, not an image in one
            of :data:`ALLOWED_FORMATS`, has more than ``limits.max_pixels`` pixels (a decompression bomb
            is refused from its header, before any pixel is decoded), or is truncated/corrupt.
    """
    limits = limits or UploadLimits()
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise UploadError(f"{name}: the file could not be read") from None
    if size == 0:
        raise UploadError(f"{name}: the file is empty; expected an image ({', '.join(ALLOWED_FORMATS)})")
    if size > limits.max_bytes:
        raise UploadError(
            f"{name} is {_megabytes(size)}, over the upload limit of {_megabytes(limits.max_bytes)}"
        )
    with warnings.catch_warnings():
        # PIL warns (and above twice its own limit raises) on huge images; both mean the same here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=ALLOWED_FORMATS) as image:
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise UploadError(
                        f"{name} declares {width}x{height} pixels, over the limit of {limits.max_pixels:,} "
                        "pixels (refused as a possible decompression bomb)"
                    )
                image.load()
                # Phone photos store their rotation in EXIF; show and encode them upright.
                return to_rgb(ImageOps.exif_transpose(image))
        except UploadError:
            raise
        except UnidentifiedImageError:
            raise UploadError(
                f"{name} is not an image; expected one of: {', '.join(ALLOWED_FORMATS)}"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(
                f"{name} has too many pixels (refused as a possible decompression bomb)"
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise UploadError(f"{name} could not be decoded as an image ({err.__class__.__name__})") from None
