"""The Qwen2.5-VL adapter's hooks for generic export and parity: fit_budget (min_pixels raised so every image
gives at least K merged tokens), the artifact's preprocessor config, the vision dim ranges, HF's own
positions of a pruned prompt (parity's reference), and the bound host adapter (graph inputs, positions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from prunert.runtime.host import SpliceLayout  # noqa: E402
from prunert.adapters.qwen2_5_vl import IMAGE_PLACEHOLDER, QWEN_PROMPT_TEMPLATE, host  # noqa: E402
from prunert.adapters.qwen2_5_vl.export import QwenExportAdapter  # noqa: E402
from prunert.adapters.qwen2_5_vl.synthetic import synthetic_checkpoint  # noqa: E402
from prunert.config import BudgetConfig, PixelRange  # noqa: E402
from prunert.errors import ConfigError, ImageError  # noqa: E402

UNIT = 28 * 28  # pixels of one merged token (factor^2)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return synthetic_checkpoint("qwen2.5-vl-tiny")


@pytest.fixture
def adapter(model_dir: Path) -> QwenExportAdapter:
    return QwenExportAdapter(model_dir)


def _noise(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_fit_budget_raises_min_pixels_to_k_tokens(adapter: QwenExportAdapter, model_dir: Path) -> None:
    assert (adapter.min_visual_tokens, adapter.max_visual_tokens) == (4, 113)
    adapter.fit_budget(BudgetConfig(budget=16))
    assert adapter.preprocess.min_pixels == 16 * UNIT and adapter.preprocess.max_pixels == 64 * UNIT
    assert (adapter.min_visual_tokens, adapter.num_visual_tokens) == (16, 113)
    assert adapter.family_config()["min_visual_tokens"] == 16
    assert adapter.vision_dim_ranges() == {"merged": (16, 64, 113), "patches": (64, 256, 452), "windows": (1, 16, 57), "window_len": (8, 16, 16)}
    config = adapter.artifact_preprocessor_config(model_dir)
    assert config["min_pixels"] == config["size"]["shortest_edge"] == 16 * UNIT
    assert host.QwenPreprocessConfig.from_hf_dict(config) == adapter.preprocess
    # HF's processor runs with the raised range too: a 20 x 20 image is upscaled to 4 x 4 merged tokens
    assert adapter.hf_image_inputs([_noise(20, 20)], model_dir)["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_every_image_gives_at_least_k_tokens_and_larger_k_is_refused(adapter: QwenExportAdapter) -> None:
    adapter.fit_budget(BudgetConfig(budget=32))  # the largest: the max_pixels branch floors 2 x 32 tokens
    cfg = adapter.preprocess
    sizes = [(20, 20), (20, 4000), (4000, 20), (57, 8000), (300, 451), (1, 150), (8000, 8000), (59, 3000), (27, 891)]
    counts = [np.prod(host.smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)) // UNIT for h, w in sizes]
    assert min(counts) == adapter.min_visual_tokens == 32  # 27 x 891: 1 x 32 merged tokens
    assert adapter.example_grid() == (1, 10, 14) and adapter.example_vision_inputs()[-1].shape == (35,)  # 5 x 7 >= K
    with pytest.raises(ConfigError, match=r"budget: got 33, expected 1 <= budget <= 32"):
        adapter.fit_budget(BudgetConfig(budget=33))
    with pytest.raises(ConfigError, match=r"budget: got 16 with --method none, expected 113 .*4\.\.113"):
        adapter.fit_budget(BudgetConfig(budget=16, method="none"))


def test_unpruned_keeps_the_pixel_range_and_declares_a_symbolic_k(adapter: QwenExportAdapter) -> None:
    from prunert.export.graphs import kept_dim

    adapter.fit_budget(BudgetConfig(budget=113, method="none"))  # the largest N: every image keeps all of its own
    assert adapter.preprocess == adapter.checkpoint_preprocess and (adapter.min_visual_tokens, adapter.max_visual_tokens) == (4, 113)
    assert kept_dim(adapter, BudgetConfig(budget=113, method="none")) == "merged"
    assert kept_dim(adapter, BudgetConfig(budget=16)) == 16


def test_pixel_range_sets_smart_resize_range_before_the_budget(adapter: QwenExportAdapter, model_dir: Path) -> None:
    """export --max-pixels 1280 tokens' worth (Qwen's default): N up to 1280 + the extreme-aspect tail, min_pixels then
    raised to K; the range is in family_config (parity reads it back) and preprocessor_config.json."""
    adapter.fit_pixel_range(PixelRange(max_pixels=1280 * UNIT))
    adapter.fit_budget(BudgetConfig(budget=64))
    assert adapter.preprocess.max_pixels == 1280 * UNIT and adapter.preprocess.min_pixels == 64 * UNIT
    assert adapter.min_visual_tokens == 64 and adapter.max_visual_tokens >= 1280
    assert adapter.vision_dim_ranges()["merged"][1:] == (1280, adapter.max_visual_tokens)
    recorded = adapter.family_config()["pixel_range"]
    assert recorded == {"min_pixels": 4 * UNIT, "max_pixels": 1280 * UNIT}  # before the budget's raise
    assert adapter.exported_pixel_range(adapter.family_config()) == PixelRange(4 * UNIT, 1280 * UNIT)
    config = adapter.artifact_preprocessor_config(model_dir)
    assert (config["min_pixels"], config["max_pixels"]) == (64 * UNIT, 1280 * UNIT)
    assert (config["size"]["shortest_edge"], config["size"]["longest_edge"]) == (64 * UNIT, 1280 * UNIT)
    assert adapter.hf_image_inputs([_noise(896, 1120)], model_dir)["image_grid_thw"].tolist() == [[1, 64, 80]]  # 1,280 tokens
    # parity: a fresh adapter given the manifest's record ends where export did
    again = QwenExportAdapter(model_dir)
    again.fit_pixel_range(adapter.exported_pixel_range(adapter.family_config()))
    again.fit_budget(BudgetConfig(budget=64))
    assert again.preprocess == adapter.preprocess and again.vision_dim_ranges() == adapter.vision_dim_ranges()
    assert QwenExportAdapter(model_dir).exported_pixel_range({}) == PixelRange()  # manifests from before: the checkpoint's


@pytest.mark.parametrize("pixels, message", [
    (dict(max_pixels=700), r"--max-pixels: got 700, expected >= 784"),
    (dict(min_pixels=65 * UNIT), r"--min-pixels: got 50960, expected <= the checkpoint's max_pixels 50176"),
    (dict(max_pixels=3 * UNIT), r"the checkpoint's min_pixels: got 3136, expected <= --max-pixels 2352"),
])
def test_pixel_range_refused_in_one_line(adapter: QwenExportAdapter, pixels: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        adapter.fit_pixel_range(PixelRange(**pixels))


@pytest.mark.parametrize("pixels, message", [
    (dict(min_pixels=0), r"--min-pixels: got 0, expected a pixel count >= 1"),
    (dict(max_pixels=-5), r"--max-pixels: got -5"),
    (dict(min_pixels=5000, max_pixels=4000), r"got 5000 > 4000, expected min <= max"),
])
def test_pixel_range_values_checked(pixels: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PixelRange(**pixels)


def test_hf_position_ids_are_hf_rope_index_restricted_to_kept(adapter: QwenExportAdapter, model_dir: Path) -> None:
    image = Image.open(Path(__file__).resolve().parents[2] / "examples" / "images" / "chelsea.jpg").convert("RGB")
    ids = adapter.hf_token_ids(QWEN_PROMPT_TEMPLATE.format(prompt=IMAGE_PLACEHOLDER + "Cat?"), model_dir)
    image_id = adapter.model.config.image_token_id
    grid = adapter.hf_image_inputs([image], model_dir)["image_grid_thw"].numpy()  # [[1, 12, 18]]: 54 merged tokens
    kept = np.array([[0, 5, 8, 9, 30, 53]])
    positions, deltas = adapter.hf_position_ids(ids, [image], model_dir, torch.from_numpy(kept))
    at = ids.index(image_id)
    pruned = np.array([ids[:at] + [image_id] * kept.shape[1] + ids[at + 1 :]])
    ours, our_deltas = host.rope_index(pruned, grid, image_token_id=image_id, kept_indices=list(kept))
    assert np.array_equal(positions.numpy(), ours) and np.array_equal(deltas.numpy(), our_deltas)
    assert np.array_equal(host.rope_deltas(ours, np.ones_like(pruned)), our_deltas)


def test_bound_host_adapter(model_dir: Path, adapter: QwenExportAdapter) -> None:
    fc = adapter.family_config()
    bound = host.QwenHostAdapter(fc, adapter.num_visual_tokens)  # as the runtime binds it: the manifest's family_config
    assert bound.one_image_per_vision_call and host.HOST_ADAPTER is host.QwenHostAdapter and bound.family_config == fc
    with pytest.raises(ImageError, match="one image per vision-graph call, got 2"):
        bound.vision_inputs([_noise(40, 40)] * 2, {})
    out = bound.vision_inputs([_noise(56, 84)], {"min_pixels": 4 * UNIT, "max_pixels": 64 * UNIT})
    assert sorted(out) == sorted([*adapter.vision_input_names, "window_segments", "image_grid_thw"]) and out["image_grid_thw"].tolist() == [[1, 4, 6]]
    ids = np.array([[0, 0, 50, 6, 6, 6, 50, 50], [50, 50, 50, 6, 6, 6, 50, 50]])  # row 0 left-padded
    mask = (np.arange(8) >= np.array([[2], [0]])).astype(np.int64)
    layout = SpliceLayout(ids, np.array([[0, 2, 5], [1, 3, 4]]), ({"image_grid_thw": np.array([[1, 4, 6]])},) * 2)  # one per image
    positions = bound.position_ids(mask, layout)
    expected, deltas = host.rope_index(ids, np.array([[1, 4, 6], [1, 4, 6]]), image_token_id=6, attention_mask=mask,
                                       kept_indices=list(layout.kept_indices))
    assert np.array_equal(positions, expected)
    assert np.array_equal(bound.next_position_ids(positions, mask), host.decode_position_ids(deltas, mask.sum(1)))
    assert bound.next_position_ids(positions, mask)[:, :, 0].tolist() == [[6, 8]] * 3  # image of 3 rows: text resumes at +3
    with pytest.raises(ConfigError, match="spliced layout"):
        bound.position_ids(mask, SpliceLayout(ids))
