"""The LLaVA-NeXT host adapter against Hugging Face: pixels of every tile bit-exact vs
LlavaNextImageProcessorPil, HF's tile order, token masks vs HF's own unpadding, the packed positions
vs `pack_image_features`, batching, errors, and no torch/transformers on the edge."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from prunert.adapters.llava_next.host import (
    AnyresConfig,
    LlavaNextHostAdapter,
    anyres_grid_shape,
    hf_packed_positions,
    select_best_resolution,
    token_mask,
)
from prunert.errors import ConfigError, ImageError
from prunert.runtime.host import SpliceLayout

HOST = LlavaNextHostAdapter({}, 0)  # preprocessing and positions only: no manifest settings needed

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llava_next import modeling_llava_next as hf_modeling  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
V16 = {  # llava-v1.6's preprocessor settings
    "size": {"shortest_edge": 336},
    "crop_size": {"height": 336, "width": 336},
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}
TINY = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56},
        "image_grid_pinpoints": [[56, 112], [112, 56], [112, 112]]}
PATCH = 14
# (width, height) of synthetic images: wide, tall, square, tiny, large, odd aspect ratios
SIZES = [(300, 20), (90, 700), (400, 400), (17, 17), (2000, 1500), (333, 1001), (1001, 333), (640, 479)]


def _hf_config(settings: dict) -> dict:
    return {**LlavaNextImageProcessorPil(**settings).to_dict(), "patch_size": PATCH}


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _photo(name: str) -> Image.Image:
    with Image.open(IMAGES / f"{name}.jpg") as opened:
        return opened.convert("RGB")


def _all_images() -> list[tuple[str, Image.Image]]:
    photos = [(name, _photo(name)) for name in ("astronaut", "chelsea", "coffee")]  # square, wide, wide
    return photos + [(f"{w}x{h}", _noise(w, h)) for w, h in SIZES]


RESIZE_THEN_CROP = {**TINY, "size": {"shortest_edge": 64}}  # every tile resized to 64, centre-cropped to 56
HEIGHT_WIDTH = {**TINY, "size": {"height": 56, "width": 56}}


@pytest.mark.parametrize("settings", [V16, TINY, RESIZE_THEN_CROP, HEIGHT_WIDTH],
                         ids=["llava-v1.6", "tiny", "resize-then-crop", "size-height-width"])
def test_pixels_and_tile_order_match_hf_bit_exact(settings: dict) -> None:
    hf = LlavaNextImageProcessorPil(**settings)
    config = _hf_config(settings)
    cfg = AnyresConfig.from_hf_dict(config)
    for name, image in _all_images():
        reference = hf(images=[image], return_tensors="np")["pixel_values"][0]  # [tiles, 3, S, S], HF order
        ours = HOST.vision_inputs([image], config)
        tiles = int(ours["tile_mask"][0].sum())
        assert ours["pixel_values"].shape == (1, cfg.max_tiles, 3, cfg.tile_size, cfg.tile_size)
        assert ours["pixel_values"].dtype == np.float32
        assert tiles == len(reference) == hf_modeling.image_size_to_num_patches(
            (image.height, image.width), settings["image_grid_pinpoints"], cfg.tile_size), name
        np.testing.assert_array_equal(ours["pixel_values"][0, :tiles], reference, err_msg=name)  # bit-exact
        assert not ours["pixel_values"][0, tiles:].any(), name
        assert ours["tile_mask"][0].tolist() == [1] * tiles + [0] * (cfg.max_tiles - tiles)


def test_tiles_are_in_raster_order() -> None:
    """A 2x2-tile image whose four quadrants have distinct colours: tile k is quadrant k, row-major."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    pixels = np.zeros((112, 112, 3), np.uint8)
    for k, colour in enumerate(colours):
        pixels[56 * (k // 2) : 56 * (k // 2 + 1), 56 * (k % 2) : 56 * (k % 2 + 1)] = colour
    out = HOST.vision_inputs([Image.fromarray(pixels)], _hf_config(TINY))["pixel_values"][0]
    cfg = AnyresConfig.from_hf_dict(_hf_config(TINY))
    mean, std = np.asarray(cfg.base.image_mean, np.float32), np.asarray(cfg.base.image_std, np.float32)
    for k, colour in enumerate(colours):
        expected = (colour.astype(np.float32) / 255 - mean) / std
        np.testing.assert_allclose(out[1 + k].mean(axis=(1, 2)), expected, atol=1e-5)


def test_best_resolution_and_grid_match_hf() -> None:
    from transformers.image_processing_utils import select_best_resolution as hf_select

    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 3000, size=(300, 2))] + [(w, h) for h, w in SIZES]
    for settings in (V16, TINY):
        pinpoints, tile = settings["image_grid_pinpoints"], settings["crop_size"]["height"]
        for hw in sizes:
            assert select_best_resolution(hw, pinpoints) == tuple(hf_select(hw, pinpoints)), hw
            assert anyres_grid_shape(hw, pinpoints, tile) == tuple(hf_modeling.get_anyres_image_grid_shape(hw, pinpoints, tile))


def _hf_unpadded_count(hw: tuple[int, int], settings: dict) -> int:
    """High-res features HF keeps (no newlines): get_anyres_image_grid_shape + unpad_image on zeros."""
    tile = settings["crop_size"]["height"]
    grid = tile // PATCH
    rows, cols = hf_modeling.get_anyres_image_grid_shape(hw, settings["image_grid_pinpoints"], tile)
    unpadded = hf_modeling.unpad_image(torch.zeros(1, rows * grid, cols * grid), hw)
    return unpadded.shape[1] * unpadded.shape[2]


@pytest.mark.parametrize("settings", [V16, TINY], ids=["llava-v1.6", "tiny"])
def test_token_mask_counts_match_hf_unpad(settings: dict) -> None:
    cfg = AnyresConfig.from_hf_dict(_hf_config(settings))
    rng = np.random.default_rng(2)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 2500, size=(200, 2))] + [(h, w) for w, h in SIZES]
    sizes += [(300, 451), (400, 600), (512, 512), (20, 20), (16, 4000), (4000, 16)]
    for hw in sizes:
        mask = token_mask(hw, cfg)  # [T, N]
        rows, cols = anyres_grid_shape(hw, cfg.pinpoints, cfg.tile_size)
        assert mask.shape == (cfg.max_tiles, cfg.tokens_per_tile) and mask.dtype == np.int64
        assert mask[0].all() and not mask[1 + rows * cols :].any(), hw
        assert int(mask[1:].sum()) == _hf_unpadded_count(hw, settings), hw


def test_extreme_aspect_keeps_no_high_res_tokens_like_hf() -> None:
    """16 x 4000 px: HF's unpadding keeps 0 rows of the high-res map, so real tiles have no valid token."""
    cfg = AnyresConfig.from_hf_dict(_hf_config(V16))
    mask = token_mask((16, 4000), cfg)
    assert _hf_unpadded_count((16, 4000), V16) == 0 and mask[0].all() and not mask[1:].any()
    out = HOST.vision_inputs([_noise(4000, 16)], _hf_config(V16))
    assert out["tile_mask"][0].tolist() == [1, 1, 1, 1, 0] and out["token_mask"][0].sum() == 576


def _hf_packed(hw: tuple[int, int], cfg: AnyresConfig, pinpoints: list) -> torch.Tensor:
    """HF's pack_image_features on features that carry their own (tile, token) as values; newline = -1."""
    rows, cols = anyres_grid_shape(hw, cfg.pinpoints, cfg.tile_size)
    tiles, n = 1 + rows * cols, cfg.tokens_per_tile
    features = torch.stack(torch.meshgrid(torch.arange(tiles), torch.arange(n), indexing="ij"), -1).float()  # [tiles, N, 2]
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=cfg.tile_size, patch_size=PATCH), image_grid_pinpoints=pinpoints
    )
    packed, lengths = hf_modeling.LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), [features], torch.tensor([hw]), "default", image_newline=torch.tensor([-1.0, -1.0])
    )
    assert int(lengths[0]) == len(packed[0])
    return packed[0]  # [L, 2]


@pytest.mark.parametrize("settings", [V16, TINY], ids=["llava-v1.6", "tiny"])
def test_packed_positions_match_pack_image_features(settings: dict) -> None:
    cfg = AnyresConfig.from_hf_dict(_hf_config(settings))
    for hw in [(h, w) for w, h in SIZES] + [(300, 451), (400, 600), (512, 512), (16, 4000)]:
        packed = _hf_packed(hw, cfg, settings["image_grid_pinpoints"])
        positions, length = hf_packed_positions(hw, cfg)
        assert length == len(packed), hw
        np.testing.assert_array_equal(positions >= 0, token_mask(hw, cfg).astype(bool))
        tile, token = np.nonzero(positions >= 0)
        np.testing.assert_array_equal(packed[positions[tile, token]].numpy(), np.stack([tile, token], -1))
        newlines = np.setdiff1d(np.arange(length), positions[positions >= 0])
        assert (packed[newlines] == -1).all(), hw  # every other packed entry is an image_newline


def test_batch_of_different_aspects_pads_tiles() -> None:
    config = _hf_config(V16)
    images = [_noise(300, 20), _noise(90, 700), _photo("astronaut"), _noise(17, 17)]
    batch = HOST.vision_inputs(images, config)
    assert batch["pixel_values"].shape == (4, 5, 3, 336, 336)
    assert batch["tile_mask"].shape == (4, 5) and batch["token_mask"].shape == (4, 5, 576)
    assert batch["tile_mask"].sum(1).tolist() == [3, 4, 5, 3]
    for b, image in enumerate(images):  # each row equals that image processed alone
        alone = HOST.vision_inputs([image], config)
        for key in batch:
            np.testing.assert_array_equal(batch[key][b], alone[key][0], err_msg=key)
    # token masks live only on real tiles
    assert not (batch["token_mask"].any(-1) & (batch["tile_mask"] == 0)).any()
    # HF pads the batch only up to its own largest tile count (5 here): same values, zero-filled
    reference = LlavaNextImageProcessorPil(**V16)(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(batch["pixel_values"], reference)


def test_position_ids_are_cumulative_over_left_padding() -> None:
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    assert HOST.position_ids(mask, SpliceLayout(np.zeros_like(mask))).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    "image, needle",
    [
        (Image.new("RGB", (10, 64)), "too small"),
        (np.zeros((64, 64, 3), np.uint8), "expected a PIL.Image.Image"),
    ],
    ids=["tiny", "ndarray"],
)
def test_bad_images_are_image_errors(image, needle: str) -> None:
    with pytest.raises(ImageError, match=needle) as info:
        HOST.vision_inputs([Image.new("RGB", (64, 64)), image], _hf_config(TINY))
    assert "images[1]" in str(info.value)


def test_no_images_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="no images"):
        HOST.vision_inputs([], _hf_config(TINY))


def test_palette_image_is_converted_like_hf() -> None:
    image = _noise(120, 50).convert("P")
    config = _hf_config(TINY)
    reference = LlavaNextImageProcessorPil(**TINY)(images=[image], return_tensors="np")["pixel_values"][0]
    ours = HOST.vision_inputs([image], config)["pixel_values"][0, : len(reference)]
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"patch_size": None}, "no 'patch_size'"),
        ({"patch_size": 15}, "dividing the tile size 56"),
        ({"image_grid_pinpoints": [[56, 100]]}, "not a multiple of the tile size 56"),
        ({"image_grid_pinpoints": "oops"}, "image_grid_pinpoints"),
        ({"image_grid_pinpoints": []}, "image_grid_pinpoints"),
        ({"crop_size": {"height": 56, "width": 28}}, "square tiles"),
    ],
)
def test_bad_configs_are_config_errors(change: dict, needle: str) -> None:
    config = {**_hf_config(TINY), **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError, match=needle):
        HOST.vision_inputs([Image.new("RGB", (64, 64))], config)


def test_missing_pinpoints_take_hf_default() -> None:
    config = {k: v for k, v in _hf_config(V16).items() if k != "image_grid_pinpoints"}
    assert AnyresConfig.from_hf_dict(config).pinpoints == tuple(map(tuple, V16["image_grid_pinpoints"]))
    assert LlavaNextImageProcessorPil().image_grid_pinpoints == V16["image_grid_pinpoints"]


def test_explicit_patch_size_overrides_config() -> None:
    config = {k: v for k, v in _hf_config(TINY).items() if k != "patch_size"}
    out = HOST.vision_inputs([Image.new("RGB", (64, 64))], config, patch_size=28)
    assert out["token_mask"].shape == (1, 5, 4)


def test_host_needs_no_torch_or_transformers(python_without, tmp_path: Path) -> None:
    code = """
    import json, sys
    import numpy as np
    from PIL import Image
    from prunert.adapters.llava_next.host import LlavaNextHostAdapter
    config = json.loads(open(sys.argv[1]).read())
    out = LlavaNextHostAdapter({}, 0).vision_inputs([Image.new("RGB", (90, 40), (10, 200, 30))], config)
    assert out["pixel_values"].shape == (1, 5, 3, 56, 56), out["pixel_values"].shape
    assert_no_heavy_modules()
    print("ok")
    """
    path = tmp_path / "preprocessor_config.json"
    path.write_text(__import__("json").dumps(_hf_config(TINY)))
    result = python_without(code, path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
