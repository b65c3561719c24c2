"""Qwen2.5-VL host side (numpy) against transformers 5.23's own code, without building a model:
Qwen2VLImageProcessorPil, transformers.vision_utils (window index, cu_seqlens, vision position ids),
Qwen2_5_VLVisionRotaryEmbedding and Qwen2_5_VLModel.get_rope_index (called on a stand-in `self`)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel, Qwen2_5_VLVisionRotaryEmbedding  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402
from transformers import vision_utils  # noqa: E402

from prunert.adapters.qwen2_5_vl import host  # noqa: E402
from prunert.errors import ConfigError, ImageError, PromptError  # noqa: E402

IMAGES = sorted((Path(__file__).resolve().parents[2] / "examples" / "images").glob("*.jpg"))
IMAGE_ID, TEXT_ID, PAD_ID = 6, 50, 0


def _noise(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    return image.convert(mode) if mode != "RGB" else image


def _hf(images, **config):
    out = hf_pil.Qwen2VLImageProcessorPil(**config)(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


# ------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("hw", [(300, 451), (451, 300), (28, 28), (17, 40), (100, 2000), (1000, 700), (55, 57), (224, 224)])
def test_smart_resize_matches_hf(hw) -> None:
    for factor, lo, hi in ((28, 3136, 1003520), (28, 3136, 28 * 28 * 64), (32, 1024, 4096 * 4)):
        assert host.smart_resize(*hw, factor, lo, hi) == hf_pil.smart_resize(*hw, factor=factor, min_pixels=lo, max_pixels=hi)


CONFIGS = [
    {},  # HF defaults: 3136 .. 1003520 pixels
    {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64},  # the tiny preset's range
    {"size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 16}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    {"max_pixels": 40000, "resample": 2, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 1},
]


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "tiny", "size-dict", "bilinear-p16-t1"])
def test_vision_inputs_bit_exact(config) -> None:
    images = [Image.open(path).convert("RGB") for path in IMAGES]
    images += [_noise(300, 451, 1), _noise(90, 600, 2), _noise(1000, 120, 3), _noise(224, 224, 4), _noise(17, 30, 5),
               _noise(64, 80, 6, mode="P"), _noise(700, 900, 7, mode="CMYK")]
    for image in images:
        ours = host.vision_inputs([image], config)
        ref_pixels, ref_grid = _hf([image], **config)
        assert ours["pixel_values"].dtype == np.float32 and ours["image_grid_thw"].dtype == np.int64
        assert ours["pixel_values"].shape == ref_pixels.shape, image.size
        assert np.array_equal(ours["image_grid_thw"], ref_grid)
        assert np.abs(ours["pixel_values"] - ref_pixels).max() <= 1e-6, image.size
    batch = host.vision_inputs(images[:3], config)  # images are concatenated along the patch axis
    ref_pixels, ref_grid = _hf(images[:3], **config)
    assert np.array_equal(batch["image_grid_thw"], ref_grid) and np.abs(batch["pixel_values"] - ref_pixels).max() <= 1e-6


def test_config_from_hf_processor_round_trip() -> None:
    processor = hf_pil.Qwen2VLImageProcessorPil(min_pixels=1000, max_pixels=9000)
    cfg = host.QwenPreprocessConfig.from_hf_dict(processor.to_dict())
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor) == (1000, 9000, 28)
    overridden = host.QwenPreprocessConfig.from_hf_dict({"size": {"shortest_edge": 5, "longest_edge": 7}, "min_pixels": 6})
    assert (overridden.min_pixels, overridden.max_pixels) == (6, 7)


def test_bad_images_and_configs() -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        host.vision_inputs([_noise(20, 4100)], {})
    with pytest.raises(ImageError, match="too small"):
        host.vision_inputs([_noise(8, 64, mode="L")], {})
    with pytest.raises(ImageError, match="no images"):
        host.vision_inputs([], {})
    with pytest.raises(ConfigError, match="min_pixels"):
        host.vision_inputs([_noise(64, 64)], {"min_pixels": 10000, "max_pixels": 5000})


# --------------------------------------------------------------------------------- vision metadata
GRIDS = [[[1, 12, 18]], [[1, 16, 16]], [[1, 8, 8]], [[1, 2, 2]], [[1, 12, 18], [1, 16, 16], [1, 4, 30]], [[2, 10, 6]]]
WINDOWS = [(56, 14), (112, 14), (112, 16)]  # (window_size, patch_size): 2, 4 and 3 merged tokens per side


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "+".join("x".join(map(str, r)) for r in g))
def test_window_index_and_seqlens_match_hf(grid) -> None:
    grid_t = torch.tensor(grid)
    for window, patch in WINDOWS:
        ref_index, ref_cu = vision_utils.get_vision_window_index(grid_t, 2, window_size=window, patch_size=patch)
        index, cu = host.window_index(grid, 2, window, patch)
        assert index.dtype == np.int64 and cu.dtype == np.int32
        assert np.array_equal(index, ref_index.numpy()) and np.array_equal(cu, ref_cu.numpy())
        assert np.array_equal(host.reverse_index(index), torch.argsort(ref_index).numpy())
    assert np.array_equal(host.cu_seqlens(grid), vision_utils.get_vision_cu_seqlens(grid_t).numpy())
    assert host.cu_seqlens(grid).dtype == np.int32
    assert np.array_equal(host.vision_position_ids(grid, 2), vision_utils.get_vision_position_ids(grid_t, 2).numpy())


def test_divisible_grid_is_deduplicated_like_hf() -> None:
    """8x8 merged tokens in 2x2 windows: HF pads a whole empty window row/column, whose zero-length
    windows repeat boundaries; unique_consecutive drops them, so does the host."""
    index, cu = host.window_index([[1, 16, 16]], 2, 56, 14)
    assert len(cu) == 17 and np.all(np.diff(cu) == 16) and sorted(index.tolist()) == list(range(64))


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (80, 10000.0), (64, 500.0)])
def test_rotary_tables_match_hf(head_dim: int, theta: float) -> None:
    rope = {"rope_type": "axial", "rope_theta": theta}
    config = Qwen2_5_VLVisionConfig(hidden_size=head_dim * 2, num_heads=2, rope_parameters=rope)
    rotary = Qwen2_5_VLVisionRotaryEmbedding(config)
    assert np.array_equal(host.rotary_inv_freq(head_dim, theta), rotary.inv_freq.numpy())
    grid = [[1, 12, 18], [1, 64, 40]]
    grid_t = torch.tensor(grid)
    positions = vision_utils.get_vision_position_ids(grid_t, 2)
    index, _ = vision_utils.get_vision_window_index(grid_t, spatial_merge_size=2, window_size=112, patch_size=14)
    ref = []
    for table in rotary(torch.zeros(1), positions):  # HF's permute_input_for_window_attn
        ref.append(table.reshape(len(table) // 4, 4, -1)[index].reshape(len(table), -1).numpy())
    cos, sin = host.rotary_cos_sin(host.vision_position_ids(grid, 2), head_dim, theta, host.window_index(grid, 2, 112, 14)[0])
    assert cos.shape == sin.shape == (len(positions), head_dim) and cos.dtype == np.float32
    assert np.abs(cos - ref[0]).max() <= 1e-6 and np.abs(sin - ref[1]).max() <= 1e-6
    unpermuted, _ = host.rotary_cos_sin(host.vision_position_ids(grid, 2), head_dim, theta)
    expected = rotary(torch.zeros(1), positions)[0].numpy()
    assert np.abs(unpermuted - expected).max() <= 1e-6


def test_patch_permutation_is_hf_permute() -> None:
    grid = [[1, 12, 18]]
    index, _ = host.window_index(grid, 2, 56, 14)
    x = torch.arange(216 * 3).reshape(216, 3)
    permuted = x.reshape(54, 4, 3)[torch.from_numpy(index)].reshape(216, 3).numpy()
    assert np.array_equal(x.numpy()[host.patch_permutation(index, 2)], permuted)


def test_block_diagonal_masks() -> None:
    grid = [[1, 12, 18], [1, 4, 4]]
    index, cu_window = host.window_index(grid, 2, 56, 14)
    family = {"spatial_merge_size": 2, "window_size": 56, "patch_size": 14, "vision_head_dim": 16, "vision_rope_theta": 1e4}
    meta = host.vision_metadata(grid, family)
    window, full = meta["window_attention_mask"], meta["full_attention_mask"]
    assert window.shape == full.shape == (232, 232) and window.dtype == bool
    lengths = np.diff(cu_window)
    assert window.sum() == (lengths**2).sum() and full.sum() == 216**2 + 16**2
    assert np.array_equal(window, window.T) and np.all(window <= full)  # windows never cross images
    for a, b in zip(cu_window[:-1], cu_window[1:]):
        assert window[a:b, a:b].all() and not window[a:b, b:].any()
    additive = host.additive_mask(window)
    assert additive.dtype == np.float32 and set(np.unique(additive)) == {0.0, np.finfo(np.float32).min}
    assert np.array_equal(host.segment_ids(np.array([0, 2, 5])), [0, 0, 1, 1, 1])


# ------------------------------------------------------------------------------------------ M-RoPE
def _hf_rope_index(input_ids, grid, attention_mask=None, mm_token_type_ids=None):
    vision = types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)
    stand_in = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=vision),
        get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k),
    )
    ids = torch.as_tensor(input_ids)
    types_ = torch.as_tensor(mm_token_type_ids) if mm_token_type_ids is not None else (ids == IMAGE_ID).long()
    mask = None if attention_mask is None else torch.as_tensor(attention_mask)
    grid_t = torch.as_tensor(grid)
    positions, deltas = Qwen2_5_VLModel.get_rope_index(stand_in, ids, types_, image_grid_thw=grid_t, attention_mask=mask)
    return positions.numpy(), deltas.numpy()


def _batch(rows):
    """Left-pad token rows: -> input_ids [B, L], attention_mask [B, L]."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD_ID, np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
    return ids, mask


def _row(before: int, image_tokens: int, after: int) -> list[int]:
    return [TEXT_ID] * before + [IMAGE_ID] * image_tokens + [TEXT_ID] * after


GRID = [[1, 12, 18], [1, 16, 10]]  # 6x9 = 54 and 8x5 = 40 merged tokens


def test_rope_index_matches_hf_with_left_padding() -> None:
    ids, mask = _batch([_row(15, 54, 9), _row(3, 40, 30)])
    ours, deltas = host.rope_index(ids, GRID, image_token_id=IMAGE_ID, attention_mask=mask)
    ref, ref_deltas = _hf_rope_index(ids, GRID, mask)
    assert ours.shape == (3, 2, ids.shape[1]) and ours.dtype == np.int64
    assert np.array_equal(ours, ref) and np.array_equal(deltas, ref_deltas)
    single, _ = host.rope_index(np.array([_row(4, 54, 7)]), GRID[:1], image_token_id=IMAGE_ID)
    assert np.array_equal(single, _hf_rope_index(np.array([_row(4, 54, 7)]), GRID[:1])[0])


def _kept(seed: int, count: int, total: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def test_pruned_positions_are_the_unpruned_ones_restricted() -> None:
    full_ids, full_mask = _batch([_row(15, 54, 9), _row(3, 40, 30)])
    ref, ref_deltas = host.rope_index(full_ids, GRID, image_token_id=IMAGE_ID, attention_mask=full_mask)
    # kept = everything: identical to the unpruned reference (and so to HF)
    everything = [np.arange(54), np.arange(40)]
    same, same_deltas = host.pruned_rope_index(full_ids, everything, GRID, image_token_id=IMAGE_ID, attention_mask=full_mask)
    assert np.array_equal(same, ref) and np.array_equal(same_deltas, ref_deltas)
    assert np.array_equal(same, _hf_rope_index(full_ids, GRID, full_mask)[0])
    kept = [_kept(0, 16, 54), _kept(1, 16, 40)]
    ids, mask = _batch([_row(15, 16, 9), _row(3, 16, 30)])
    pruned, deltas = host.pruned_rope_index(ids, kept, GRID, image_token_id=IMAGE_ID, attention_mask=mask)
    for b, (before, n, after) in enumerate([(15, 54, 9), (3, 40, 30)]):
        full_row = ref[:, b, full_mask[b].astype(bool)]  # [3, before + n + after]
        keep = np.concatenate([np.arange(before), before + kept[b], np.arange(before + n, before + n + after)])
        assert np.array_equal(pruned[:, b, mask[b].astype(bool)], full_row[:, keep])
        assert np.all(pruned[:, b, ~mask[b].astype(bool)] == 0)
        # generation continues where the unpruned sequence continues
        assert full_row.shape[1] + ref_deltas[b, 0] == mask[b].sum() + deltas[b, 0] == full_row.max() + 1
    next_positions = host.decode_position_ids(deltas, mask.sum(1))
    assert np.array_equal(next_positions[:, :, 0], pruned[:, :, -1] + 1)


def test_renumbering_would_give_other_positions() -> None:
    """Treating the 16 kept tokens as a dense 4x4 grid (renumbering) changes image and text positions."""
    kept = _kept(0, 16, 54)
    ids = np.array([_row(15, 16, 9)])
    pruned, _ = host.pruned_rope_index(ids, [kept], GRID[:1], image_token_id=IMAGE_ID)
    renumbered, _ = _hf_rope_index(ids, [[1, 8, 8]])
    assert not np.array_equal(pruned, renumbered)
    assert not np.array_equal(pruned[:, 0, 15:31], renumbered[:, 0, 15:31])  # the image tokens
    assert not np.array_equal(pruned[:, 0, 31:], renumbered[:, 0, 31:])  # the text after


def test_explicit_layout_and_errors() -> None:
    positions, next_position = host.sequence_positions([3, ((1, 4, 6), [0, 5]), 2], 2)
    assert positions.tolist() == [[0, 1, 2, 3, 3, 6, 7], [0, 1, 2, 3, 4, 6, 7], [0, 1, 2, 3, 5, 6, 7]]
    assert next_position == 8
    ids = np.array([_row(2, 3, 2)])
    with pytest.raises(ConfigError, match="ascending"):
        host.pruned_rope_index(ids, [[4, 1, 2]], GRID[:1], image_token_id=IMAGE_ID)
    with pytest.raises(PromptError, match="3 image tokens"):
        host.pruned_rope_index(ids, [[1, 2, 4, 8]], GRID[:1], image_token_id=IMAGE_ID)
    with pytest.raises(PromptError, match="more image-token runs"):
        host.rope_index(ids, np.zeros((0, 3)), image_token_id=IMAGE_ID)


def test_host_runs_without_torch(python_without) -> None:
    result = python_without(
        """
        import numpy as np
        from PIL import Image
        from prunert.runtime.host import SpliceLayout
        from prunert.adapters.qwen2_5_vl.host import QwenHostAdapter
        fc = {"spatial_merge_size": 2, "window_size": 56, "patch_size": 14, "vision_head_dim": 16,
              "vision_rope_theta": 1e4, "image_token_id": 6, "fullatt_block_indexes": [1, 3]}
        bound = QwenHostAdapter(fc, 0)
        image = Image.fromarray(np.zeros((120, 200, 3), np.uint8))
        out = bound.vision_inputs([image], {"min_pixels": 3136, "max_pixels": 50176})
        count = int(out["image_grid_thw"].prod() // 4)
        assert out["pixel_values"].shape == (4 * count, 1176) and out["reverse_index"].shape == (count,)
        ids = np.array([[50] * 3 + [6] * 5 + [50] * 2])  # 5 kept tokens
        layout = SpliceLayout(ids, np.array([[0, 1, 2, 7, count - 1]]), (out,))
        positions = bound.position_ids(np.ones_like(ids), layout)
        assert positions.shape == (3, 1, ids.shape[1]), positions.shape
        assert bound.next_position_ids(positions, np.ones_like(ids)).shape == (3, 1, 1)
        assert_no_heavy_modules()
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
