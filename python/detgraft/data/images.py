"""Image files as a detector reads them: 8-bit RGB whatever the file holds, turned upright.

Labelling tools export JPEG and PNG in every mode: grayscale, palette, RGBA, 16-bit, and photos
whose camera orientation is only in the EXIF tag (the labels were drawn on the upright picture).
``load_image`` decodes them all to a ``uint8`` tensor ``[3, H, W]`` with the EXIF orientation
applied, through torchvision's decoders (what torchvision's detection references use) and Pillow
for what those do not read (BMP, TIFF, ...). A file that cannot be read raises ``ImageError``
naming it; ``detgraft data check`` finds every such file before training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

__all__ = ["IMAGE_SUFFIXES", "ImageError", "find_images", "image_size", "load_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class ImageError(ValueError):
    """An image file that is missing or cannot be decoded (the message names it)."""


def load_image(path: str | Path) -> Tensor:
    """The image at ``path`` as ``uint8 [3, H, W]``, RGB, upright."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {str(path)!r} does not exist")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        return _load_with_pillow(path)
    if image.dtype != torch.uint8:  # a 16-bit PNG
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _load_with_pillow(path: Path) -> Tensor:
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the high byte
                image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(
            f"cannot read image {str(path)!r} ({err}): re-export it, or leave it out (detgraft data check --skip-bad)"
        ) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def image_size(path: str | Path, decode: bool = False) -> tuple[int, int]:
    """(width, height) of the upright image, from its header; with ``decode``, after decoding the
    whole file (a truncated JPEG fails here, not at step 400). ``ImageError`` if it cannot be read."""
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {str(path)!r} ({err})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def find_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the image files in the folder (sorted, not recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is neither an image file nor a folder")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
