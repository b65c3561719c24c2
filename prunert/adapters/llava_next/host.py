"""LLaVA-NeXT host side (numpy + Pillow): any-resolution tiling into a static tile layout, the tile and
token masks of the vision graph, and 1-D positions of the spliced sequence.

`vision_inputs` reproduces Hugging Face's `LlavaNextImageProcessorPil` step for step (best resolution
from `image_grid_pinpoints`, aspect-keeping Pillow resize, centred zero padding, raster split into
tiles, squashed base thumbnail, per-tile resize / centre crop / rescale / normalize), then lays the
tiles out statically: index 0 the thumbnail, then HF's tiles in raster order, then zero tiles up to
T = 1 + the most tiles any pinpoint gives. `token_mask` marks the patch tokens that survive HF's
`unpad_image` of the high-resolution feature map (`modeling_llava_next.py`), computed with the
same float expressions. See the package docstring for the design.

Imports only numpy, Pillow, the standard library and prunert's own numpy-only modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from prunert.adapters.llava.host import ImagePreprocessConfig, LlavaHostAdapter, center_crop, resize_output_size
from prunert.errors import ConfigError, ImageError
from prunert.runtime.image import check_image

# Where the vision patch size is read from when `vision_inputs` is not given one. Not an HF
# image-processor key (HF keeps it in processor_config.json); LlavaNextImageProcessor ignores it.
PATCH_SIZE_KEY = "patch_size"
# LlavaNextImageProcessor's default `image_grid_pinpoints` (llava-v1.6), used when the key is missing.
HF_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class AnyresConfig:
    """LLaVA-NeXT preprocessing: the CLIP settings applied to every tile plus the any-res layout.

    base:       per-tile CLIP settings (size, crop_size, resample, rescale, mean/std, min_side).
    pinpoints:  candidate (height, width) resolutions, HF `image_grid_pinpoints`.
    tile_size:  S, the side of every tile (HF's "patch_size" of the processor: crop_size height).
    patch_size: side of a vision-tower patch; a tile gives (S / patch_size)^2 tokens.
    """

    base: ImagePreprocessConfig
    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patch_size: int

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], patch_size: int | None = None) -> AnyresConfig:
        base = ImagePreprocessConfig.from_hf_dict(d)
        if base.crop_height != base.crop_width:
            raise ConfigError(f"preprocessor crop_size: got {base.crop_height}x{base.crop_width}, expected square tiles")
        tile = base.crop_height
        pinpoints = _parse_pinpoints(d.get("image_grid_pinpoints", HF_DEFAULT_PINPOINTS), tile)
        patch = patch_size if patch_size is not None else d.get(PATCH_SIZE_KEY)
        if patch is None:
            raise ConfigError(
                f"preprocessor config: no {PATCH_SIZE_KEY!r} (the vision tower's patch size, e.g. 14); "
                f"add it to preprocessor_config.json or pass patch_size="
            )
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or tile % patch:
            raise ConfigError(f"preprocessor {PATCH_SIZE_KEY}: got {patch!r}, expected an int >= 1 dividing the tile size {tile}")
        return cls(base=base, pinpoints=pinpoints, tile_size=tile, patch_size=patch)

    @property
    def grid(self) -> int:
        """Patch tokens along one side of a tile."""
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """N: patch tokens per tile (no CLS)."""
        return self.grid**2

    @property
    def max_tiles(self) -> int:
        """T: the thumbnail plus the most tiles any pinpoint gives."""
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    @property
    def thumbnail_hw(self) -> tuple[int, int]:
        """The base image is squashed to this size (HF: size (height, width), else shortest_edge square)."""
        return self.base.resize_hw or (self.base.shortest_edge, self.base.shortest_edge)


def _parse_pinpoints(value: Any, tile: int) -> tuple[tuple[int, int], ...]:
    try:
        pinpoints = tuple((int(h), int(w)) for h, w in value)
    except (TypeError, ValueError):
        pinpoints = ()
    if not pinpoints or any(isinstance(v, bool) for p in value for v in p):
        raise ConfigError(f"preprocessor image_grid_pinpoints: got {value!r}, expected a list of [height, width]")
    for h, w in pinpoints:
        if h < tile or w < tile or h % tile or w % tile:
            raise ConfigError(
                f"preprocessor image_grid_pinpoints: [{h}, {w}] is not a multiple of the tile size {tile}"
            )
    return pinpoints


# ------------------------------------------------------------------------------ HF's geometry, exactly


def select_best_resolution(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """HF `select_best_resolution`: the pinpoint (h, w) with the most effective pixels, then least waste."""
    original_height, original_width = image_hw
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit  # type: ignore[return-value]


def patch_output_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """HF `get_patch_output_size`: (h, w) of the image resized into `target_hw` keeping its aspect."""
    original_height, original_width = image_hw
    target_height, target_width = target_hw
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def anyres_grid_shape(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> tuple[int, int]:
    """HF `get_anyres_image_grid_shape`: (tile rows, tile columns) for an image of size (h, w)."""
    height, width = select_best_resolution(image_hw, pinpoints)
    return height // tile_size, width // tile_size


def unpad_bounds(image_hw: tuple[int, int], current_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """HF `unpad_image` on a [C, current_h, current_w] feature map: the kept (top, bottom, left, right)."""
    original_height, original_width = image_hw
    current_height, current_width = current_hw
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


def token_mask(image_hw: tuple[int, int], cfg: AnyresConfig) -> np.ndarray:
    """int64 [T, N]: 1 for patch tokens HF keeps. Row 0 (thumbnail) all 1, padding tiles all 0."""
    rows, cols = anyres_grid_shape(image_hw, cfg.pinpoints, cfg.tile_size)
    g = cfg.grid
    top, bottom, left, right = unpad_bounds(image_hw, (rows * g, cols * g))
    keep_rows = (np.arange(rows * g) >= top) & (np.arange(rows * g) < bottom)  # [rows*g]
    keep_cols = (np.arange(cols * g) >= left) & (np.arange(cols * g) < right)  # [cols*g]
    full = keep_rows[:, None] & keep_cols[None, :]  # [rows*g, cols*g], HF's high-res feature map
    tiles = full.reshape(rows, g, cols, g).transpose(0, 2, 1, 3).reshape(rows * cols, g * g)  # raster order
    mask = np.zeros((cfg.max_tiles, g * g), np.int64)
    mask[0] = 1
    mask[1 : 1 + rows * cols] = tiles
    return mask


def hf_packed_positions(image_hw: tuple[int, int], cfg: AnyresConfig) -> tuple[np.ndarray, int]:
    """Where each (tile, token) lands in HF's packed features of this image (`pack_image_features`:
    N thumbnail tokens, then the unpadded high-res map row by row, each row followed by one
    `image_newline`). -> (positions int64 [T, N], -1 where dropped or padding; packed length)."""
    rows, cols = anyres_grid_shape(image_hw, cfg.pinpoints, cfg.tile_size)
    g, n = cfg.grid, cfg.tokens_per_tile
    top, bottom, left, right = unpad_bounds(image_hw, (rows * g, cols * g))
    row = np.arange(rows * g)[:, None] - top  # [rows*g, 1]
    col = np.arange(cols * g)[None, :] - left  # [1, cols*g]
    width = right - left  # kept columns; each kept row is followed by one image_newline
    inside = (row >= 0) & (row < bottom - top) & (col >= 0) & (col < width)
    full = np.where(inside, n + row * (width + 1) + col, -1)  # [rows*g, cols*g]
    positions = np.full((cfg.max_tiles, n), -1, np.int64)
    positions[0] = np.arange(n)
    positions[1 : 1 + rows * cols] = full.reshape(rows, g, cols, g).transpose(0, 2, 1, 3).reshape(rows * cols, n)
    return positions, n + (bottom - top) * (width + 1)


# ------------------------------------------------------------------------------------------- pixels


def _resize(pixels: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow resize of uint8 [H, W, 3] to (h, w), as HF's PIL backend (same size: an unchanged copy)."""
    if pixels.shape[:2] == tuple(hw):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((hw[1], hw[0]), resample=resample))


def _finish_tile(pixels: np.ndarray, cfg: AnyresConfig) -> np.ndarray:
    """HF's per-patch steps: resize to `size`, centre crop, rescale, normalize. uint8 HWC -> float32 CHW."""
    base = cfg.base
    if base.do_resize:
        target = base.resize_hw or resize_output_size(pixels.shape[0], pixels.shape[1], base.shortest_edge)
        pixels = _resize(pixels, target, base.resample)
    if base.do_center_crop:
        pixels = center_crop(pixels, base.crop_height, base.crop_width)
    if pixels.shape[:2] != (cfg.tile_size, cfg.tile_size):
        raise ConfigError(
            f"preprocessor config: tiles come out {pixels.shape[0]}x{pixels.shape[1]}, expected "
            f"{cfg.tile_size}x{cfg.tile_size}; enable do_center_crop or make size equal crop_size"
        )
    values = pixels.astype(np.float64) * base.rescale_factor if base.do_rescale else pixels
    values = values.astype(np.float32)  # HF rescales in float64, then casts; normalizes in float32
    if base.do_normalize:
        values = (values - np.asarray(base.image_mean, np.float32)) / np.asarray(base.image_std, np.float32)
    return np.ascontiguousarray(values.transpose(2, 0, 1))  # [3, S, S]


def image_tiles(image: Image.Image, cfg: AnyresConfig) -> np.ndarray:
    """One RGB image -> float32 [1 + rows * cols, 3, S, S]: the thumbnail, then tiles in raster order."""
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    image_hw = pixels.shape[:2]
    target_h, target_w = select_best_resolution(image_hw, cfg.pinpoints)
    new_h, new_w = patch_output_size(image_hw, (target_h, target_w))
    resized = _resize(pixels, (new_h, new_w), cfg.base.resample)
    top, extra_h = divmod(target_h - new_h, 2)  # HF `_get_padding_size`: the odd pixel goes bottom/right
    left, extra_w = divmod(target_w - new_w, 2)
    padded = np.pad(resized, ((top, top + extra_h), (left, left + extra_w), (0, 0)))  # [target_h, target_w, 3]
    s = cfg.tile_size
    tiles = [padded[i : i + s, j : j + s] for i in range(0, target_h, s) for j in range(0, target_w, s)]
    thumbnail = _resize(pixels, cfg.thumbnail_hw, cfg.base.resample)
    return np.stack([_finish_tile(t, cfg) for t in [thumbnail, *tiles]])


class LlavaNextHostAdapter(LlavaHostAdapter):
    """`vision_inputs` for the static-tile vision graph; `position_ids` is LLaVA-1.5's (cumulative)."""

    max_images_per_prompt = None  # several images per prompt, each with its own tiles and K (bounded by max_sequence)

    def vision_inputs(
        self, images: Sequence[Any], preprocessor_config: Mapping[str, Any], patch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """PIL images -> pixel_values float32 [B, T, 3, S, S], tile_mask int64 [B, T], token_mask
        int64 [B, T, N]. `patch_size` defaults to the preprocessor config's "patch_size"."""
        cfg = AnyresConfig.from_hf_dict(preprocessor_config, patch_size)
        if len(images) == 0:
            raise ImageError("vision_inputs: got no images, expected at least one")
        checked = [check_image(image, f"images[{i}]", cfg.base.min_side) for i, image in enumerate(images)]
        t, s = cfg.max_tiles, cfg.tile_size
        pixel_values = np.zeros((len(checked), t, 3, s, s), np.float32)
        tile_mask = np.zeros((len(checked), t), np.int64)
        tokens = np.zeros((len(checked), t, cfg.tokens_per_tile), np.int64)
        for b, image in enumerate(checked):
            tiles = image_tiles(image, cfg)
            pixel_values[b, : len(tiles)] = tiles
            tile_mask[b, : len(tiles)] = 1
            tokens[b] = token_mask((image.height, image.width), cfg)
        return {"pixel_values": pixel_values, "tile_mask": tile_mask, "token_mask": tokens}

    def visual_token_counts(self, vision_inputs: Mapping[str, np.ndarray], num_images: int) -> np.ndarray:
        """Each image's own N: its valid tokens (thumbnail + real tiles after unpadding), int64 [B]."""
        return ((vision_inputs["token_mask"] != 0) & (vision_inputs["tile_mask"] != 0)[:, :, None]).sum(axis=(1, 2))

    def kept_valid(self, vision_inputs: Mapping[str, np.ndarray], kept_indices: np.ndarray) -> np.ndarray:
        """Which kept slots hold a real token: kept_indices [B, K] (tile * N + index) -> bool [B, K]. Only the
        unpruned graph (every slot) or a budget above an image's valid tokens (K > N) ever keeps masked ones:
        padding tiles and tokens that HF's unpadding drops. The splice leaves those out, as HF has no such tokens."""
        valid = (vision_inputs["token_mask"] != 0) & (vision_inputs["tile_mask"] != 0)[:, :, None]  # [B, T, N]
        return np.take_along_axis(valid.reshape(len(valid), -1), np.asarray(kept_indices, np.int64), axis=1)  # [B, K]


    def model_view(self, image: Any, preprocessor_config: Mapping[str, Any]) -> Any:
        raise ConfigError("visualize: LLaVA-NeXT sees an image as several tiles, not one view")


HOST_ADAPTER = LlavaNextHostAdapter  # the registry's entry (prunert.adapters.host_adapter_class)
