"""Image loading for the runtime (Pillow only): open a file, apply its EXIF orientation, validate it as RGB.

Family preprocessing (CLIP resize / crop, any-resolution tiles, Qwen's smart_resize) lives in each family's
host adapter (prunert.adapters.<family>.host). This module must never import torch or transformers.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from prunert.errors import ImageError

DEFAULT_MIN_SIDE = 16  # runtime policy: images whose shorter side is below this are rejected as tiny

_GRAYSCALE_MODES = frozenset({"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_CONVERTIBLE_MODES = frozenset({"P", "CMYK", "YCbCr"})  # converted to RGB without loss of meaning
_CONVERT_HINT = "convert it first, e.g. Image.open(p).convert('RGB')"


def load_image(path: str | PathLike[str], min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Open an image file, apply its EXIF orientation (as HF's `load_image` does) and validate it.

    Returns an RGB image. Raises ImageError naming the path for a missing or unreadable file, a
    grayscale or transparent image, another non-RGB mode, or an image smaller than `min_side`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image '{path}': file not found, expected an existing image file (JPEG, PNG, ...)")
    if not path.is_file():
        raise ImageError(f"image '{path}': is not a regular file, expected an image file (JPEG, PNG, ...)")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a copy, detached from the file
    except UnidentifiedImageError:
        raise ImageError(
            f"image '{path}': not a recognised image file, expected an image Pillow can read (JPEG, PNG, ...)"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image '{path}': too large to open safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"image '{path}': could not be read ({e}), expected a complete, valid image file") from None
    return check_image(image, str(path), min_side)


def check_image(image: Image.Image, name: str, min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Validate an in-memory image and return it as RGB. `name` is used in error messages.

    Palette ('P' without transparency), 'CMYK' and 'YCbCr' images are converted; grayscale,
    transparent and other modes are rejected with ImageError, as are images too small to use.
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"image '{name}': got {type(image).__name__}, expected a PIL.Image.Image")
    _check_mode(image, name)
    width, height = image.size
    if min(width, height) < min_side:
        raise ImageError(
            f"image '{name}': size {width}x{height} is too small, expected the shorter side to be at least "
            f"{min_side} px"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_mode(image: Image.Image, name: str) -> None:
    """Raise ImageError unless the image is RGB or convertible to RGB without losing meaning."""
    mode = image.mode
    if mode == "RGB":
        return
    if mode in ("LA", "La"):
        raise ImageError(
            f"image '{name}': mode '{mode}' (grayscale with alpha), expected an RGB image (3 channels) "
            f"without transparency; {_CONVERT_HINT}"
        )
    if mode in _GRAYSCALE_MODES:
        raise ImageError(
            f"image '{name}': mode '{mode}' (grayscale), expected an RGB image (3 channels); {_CONVERT_HINT}"
        )
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        raise ImageError(
            f"image '{name}': mode '{mode}' has an alpha channel / transparency, expected an RGB image "
            f"(3 channels) without transparency; flatten it onto a background or {_CONVERT_HINT}"
        )
    if mode not in _CONVERTIBLE_MODES:
        raise ImageError(
            f"image '{name}': mode '{mode}' is not supported, expected an RGB image (3 channels); {_CONVERT_HINT}"
        )
