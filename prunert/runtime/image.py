"""Image loading for the runtime (Pillow only): open a file or decode bytes, apply the EXIF orientation, convert to RGB.

Every image becomes RGB as the artifacts' preprocessor configs ask (`do_convert_rgb: true`) and as Hugging Face,
llama.cpp and ollama do: transparency is composited onto white, grayscale replicated into three channels, palette /
CMYK / YCbCr converted. Images are refused when unreadable, too small to use, or over MAX_IMAGE_PIXELS (checked from
the header, before any pixel is decoded: a decompression bomb costs nothing).

Family preprocessing (CLIP resize / crop, any-resolution tiles, Qwen's smart_resize) lives in each family's
host adapter (prunert.adapters.<family>.host). This module must never import torch or transformers.
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prunert.errors import ImageError

DEFAULT_MIN_SIDE = 16  # runtime policy: images whose shorter side is below this are rejected as tiny
MAX_IMAGE_PIXELS = 8192 * 8192  # runtime policy: larger images are refused before decoding (decompression bombs)
# What decode_image_bytes accepts (JPEG includes phones' MPO files), where this Pillow has the reader. Pillow's other
# readers (EPS runs Ghostscript, ...) are not for bytes from a network client.
BYTES_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_VIA = {"La": "LA"}  # premultiplied grayscale + alpha: Pillow converts it to LA only
WHITE = (255, 255, 255, 255)


def load_image(path: str | PathLike[str], min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Open an image file, apply its EXIF orientation (as HF's `load_image` does), convert it to RGB.

    Raises ImageError naming the path for a missing or unreadable file, an image over MAX_IMAGE_PIXELS, a mode that
    has no RGB meaning, or an image smaller than `min_side`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image '{path}': file not found, expected an existing image file (JPEG, PNG, ...)")
    if not path.is_file():
        raise ImageError(f"image '{path}': is not a regular file, expected an image file (JPEG, PNG, ...)")
    return _open(path, str(path), min_side, None)


def decode_image_bytes(data: bytes, name: str = "image", min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Encoded image bytes (a server's request: a data URI's payload, a file's contents) -> an RGB image.

    Only BYTES_FORMATS are read. Raises ImageError naming `name` for empty or undecodable data, data that is not an
    image, an image over MAX_IMAGE_PIXELS (refused from its header, before decoding) or smaller than `min_side`.
    """
    if not data:
        raise ImageError(f"{name}: no data, expected an encoded image ({', '.join(BYTES_FORMATS)})")
    Image.init()  # every plugin registered (once): `formats` names some that Pillow's first, lazy set lacks
    return _open(io.BytesIO(data), name, min_side, tuple(f for f in BYTES_FORMATS if f in Image.OPEN))


def _open(source: Path | IO[bytes], name: str, min_side: int, formats: tuple[str, ...] | None) -> Image.Image:
    """Open -> check the header's size -> decode -> EXIF orientation -> check_image; every failure one ImageError."""
    label = f"image '{name}'" if isinstance(source, Path) else name
    try:
        with Image.open(source, formats=formats) as opened:
            _check_pixels(opened.size, label)  # from the header: nothing is decoded yet
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a copy, detached from the file
    except ImageError:
        raise
    except UnidentifiedImageError:
        accepted = ", ".join(formats) if formats else "JPEG, PNG, ..."
        raise ImageError(f"{label}: not a recognised image file, expected an image Pillow can read ({accepted})") from None
    except Image.DecompressionBombError:  # Pillow's own header check, beyond twice its MAX_IMAGE_PIXELS
        raise ImageError(f"{label}: a decompression bomb (its header declares too many pixels), expected at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure on the input's bytes is the input's fault
        raise ImageError(f"{label}: could not be read ({type(e).__name__}: {e}), expected a complete, valid image file") from None
    return check_image(image, name, min_side, label)


def _check_pixels(size: tuple[int, int], label: str) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{label}: {width}x{height} is {width * height:,} pixels, expected at most {MAX_IMAGE_PIXELS:,} "
                         "pixels (refused from its header, before decoding: a decompression bomb guard)")


def check_image(image: Image.Image, name: str, min_side: int = DEFAULT_MIN_SIDE, label: str | None = None) -> Image.Image:
    """Validate an in-memory image and return it as RGB (to_rgb). `name` is used in error messages (`label`: the
    whole prefix instead of "image 'name'")."""
    label = label or f"image '{name}'"
    if not isinstance(image, Image.Image):
        raise ImageError(f"{label}: got {type(image).__name__}, expected a PIL.Image.Image")
    _check_pixels(image.size, label)
    width, height = image.size
    if min(width, height) < min_side:
        raise ImageError(f"{label}: size {width}x{height} is too small, expected the shorter side to be at least {min_side} px")
    return to_rgb(image, label)


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """Any Pillow mode -> RGB, as HF's convert_to_rgb (transformers.image_transforms): an image with an alpha band or a
    transparency key is composited onto white through RGBA; any other is converted directly (grayscale replicated,
    palette / CMYK / YCbCr converted). 16-bit grayscale keeps its top 8 bits, as llama.cpp's stb_image loads it
    (Pillow's conversion would clip every value above 255 to white)."""
    if image.mode == "RGB":
        return image
    if image.mode in _16_BIT_MODES:
        image = Image.fromarray((np.asarray(image, np.uint16) >> 8).astype(np.uint8), "L")  # [H, W]
    alpha = any(band in ("A", "a") for band in image.getbands()) or image.info.get("transparency") is not None
    try:
        if not alpha:
            return image.convert("RGB")
        rgba = image.convert(_VIA[image.mode]).convert("RGBA") if image.mode in _VIA else image.convert("RGBA")
    except (ValueError, OSError) as e:
        raise ImageError(f"{label}: mode '{image.mode}' has no RGB conversion ({e}), expected an RGB, grayscale, palette "
                         "or CMYK image") from None
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
