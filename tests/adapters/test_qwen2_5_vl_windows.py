"""Qwen2.5-VL's window layers as padded windows (prunert.adapters.qwen2_5_vl.windows): the host's layout, the bounds
the manifest records for its dims, and the vision graph against Hugging Face's tower at many resolutions: windows cut
at the right and bottom edge of the grid, one window to dozens, the tiny preset's 2 x 2-token windows and Qwen2.5-VL's
own 4 x 4 (window_size 112, a copy of the tiny checkpoint with only that changed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from prunert.adapters.qwen2_5_vl import host  # noqa: E402
from prunert.adapters.qwen2_5_vl.export import QwenExportAdapter  # noqa: E402
from prunert.adapters.qwen2_5_vl.synthetic import synthetic_checkpoint  # noqa: E402
from prunert.adapters.qwen2_5_vl.windows import WINDOW_INPUT_NAMES, window_dim_ranges, window_layout, windows_of_grid  # noqa: E402
from prunert.config import BudgetConfig  # noqa: E402

# merged grids (rows x cols): one window, windows cut at the right / bottom / both edges, thin strips, many windows
GRIDS = [(2, 2), (1, 1), (3, 5), (4, 6), (5, 3), (1, 9), (7, 7), (2, 16), (9, 12), (6, 10)]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return synthetic_checkpoint("qwen2.5-vl-tiny")


@pytest.fixture(scope="module")
def adapter(model_dir: Path) -> QwenExportAdapter:
    return QwenExportAdapter(model_dir)


@pytest.fixture(scope="module")
def wide_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> QwenExportAdapter:
    """The tiny checkpoint with Qwen2.5-VL's window_size (112 pixels: 4 x 4 merged tokens, 64 patches a window)."""
    copy = tmp_path_factory.mktemp("qwen-wide") / "checkpoint"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["window_size"] = 112
    (copy / "config.json").write_text(json.dumps(config))
    return QwenExportAdapter(copy)


def _hf_and_ours(adapter: QwenExportAdapter, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    grid = np.array([[1, 2 * rows, 2 * cols]])  # patches: merge 2
    pixels = np.random.default_rng(seed).standard_normal((4 * rows * cols, adapter.patch_dim)).astype(np.float32)
    inputs = host.graph_vision_inputs(pixels, grid, adapter.family_config())
    with torch.no_grad():
        ref = adapter.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output  # [N, D], HF's per-window path
        ours = adapter.vision_features(*(torch.from_numpy(inputs[name]) for name in adapter.vision_input_names))["tokens"][0]
    return ours, ref, inputs


# ------------------------------------------------------------------------------------------------ host layout
def test_window_layout_holds_every_patch_once_in_its_window() -> None:
    cu = np.array([0, 16, 24, 40, 44], np.int32)  # windows of 16, 8, 16, 4 patches
    layout = window_layout(cu)
    gather, mask, slots = (layout[name] for name in WINDOW_INPUT_NAMES)
    assert gather.shape == mask.shape == (4, 16) and slots.shape == (44,)
    assert [int(n) for n in mask.sum(1)] == [16, 8, 16, 4]
    assert np.array_equal(gather[mask == 1], np.arange(44))  # real slots: every patch once, in window order
    assert np.array_equal(gather.reshape(-1)[slots], np.arange(44))  # slots gather each patch's own row back
    for w in range(4):  # a padding slot repeats a row of its own window
        assert set(gather[w][mask[w] == 0]) <= {cu[w]}
    assert all(value.dtype == np.int64 for value in layout.values())


@pytest.mark.parametrize("rows, cols", GRIDS)
def test_layout_windows_are_hf_cu_window_seqlens(adapter: QwenExportAdapter, rows: int, cols: int) -> None:
    family = adapter.family_config()
    _, cu = host.window_index([[1, 2 * rows, 2 * cols]], 2, family["window_size"], family["patch_size"])
    inputs = host.graph_vision_inputs(np.zeros((4 * rows * cols, adapter.patch_dim), np.float32), [[1, 2 * rows, 2 * cols]], family)
    assert inputs["window_gather"].shape[0] == len(cu) - 1 == windows_of_grid(rows, cols, 2)
    assert np.array_equal(inputs["window_mask"].sum(1), np.diff(cu))
    assert inputs["window_gather"].shape[1] == 4 * min(rows, 2) * min(cols, 2)  # the top-left window is the longest


@pytest.mark.parametrize("side, low, high", [(2, 16, 113), (2, 4, 113), (4, 4, 1280), (4, 16, 576), (4, 1, 30)])
def test_window_dim_ranges_bound_every_grid(side: int, low: int, high: int) -> None:
    ranges = window_dim_ranges(low, min(high, 64), high, side, 4)
    seen_windows, seen_len = set(), set()
    for rows in range(1, high + 1):
        for cols in range(max(1, -(-low // rows)), high // rows + 1):  # low <= rows * cols <= high
            seen_windows.add(windows_of_grid(rows, cols, side))
            seen_len.add(4 * min(rows, side) * min(cols, side))
    (w_low, w_opt, w_high), (l_low, l_opt, l_high) = ranges["windows"], ranges["window_len"]
    assert w_low <= min(seen_windows) and max(seen_windows) == w_high and w_low <= w_opt <= w_high
    assert l_low == min(seen_len) and max(seen_len) == l_high and l_low <= l_opt <= l_high  # tight


def test_adapter_declares_the_window_dims(model_dir: Path) -> None:
    adapter = QwenExportAdapter(model_dir)
    adapter.fit_budget(BudgetConfig(budget=16))
    ranges = adapter.vision_dim_ranges()
    assert ranges["windows"] == (1, 16, 57) and ranges["window_len"] == (8, 16, 16)  # 1 x 113 merged: 57 windows of 1 x 2
    specs = dict((name, shape) for name, _, shape in adapter.vision_input_specs())
    assert specs["window_gather"] == specs["window_mask"] == ("windows", "window_len") and specs["window_slots"] == ("patches",)
    assert "window_segments" not in specs  # no [P]-id input that the graph would expand to a [P, P] mask
    dynamic = dict(zip(adapter.vision_input_names, adapter.vision_dynamic_shapes()))
    assert dynamic["window_gather"] == dynamic["window_mask"] and dynamic["window_gather"][1].max == 16


# ------------------------------------------------------------------------------------ the graph against HF
@pytest.mark.parametrize("rows, cols", GRIDS)
def test_vision_features_equal_hf_tiny_windows(adapter: QwenExportAdapter, rows: int, cols: int) -> None:
    ours, ref, inputs = _hf_and_ours(adapter, rows, cols, seed=rows * 100 + cols)
    assert ours.shape == ref.shape == (rows * cols, 64)
    assert float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max())), (rows, cols)


@pytest.mark.parametrize("rows, cols", [(4, 4), (3, 5), (5, 9), (8, 8), (9, 13), (1, 17), (6, 2)])
def test_vision_features_equal_hf_qwen_windows(wide_adapter: QwenExportAdapter, rows: int, cols: int) -> None:
    ours, ref, inputs = _hf_and_ours(wide_adapter, rows, cols, seed=rows * 100 + cols)
    windows, width = inputs["window_gather"].shape
    assert (windows, width) == (windows_of_grid(rows, cols, 4), 4 * min(rows, 4) * min(cols, 4))  # 64 patches when one is full
    assert float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max())), (rows, cols)


def test_host_still_gives_the_masked_graphs_window_segments(adapter: QwenExportAdapter, model_dir: Path) -> None:
    """Artifacts exported before the padded windows declare window_segments [P]; the runtime feeds what the manifest
    declares, so the host keeps giving it (the segment ids of HF's cu_window_seqlens)."""
    from PIL import Image

    bound = host.QwenHostAdapter(adapter.family_config(), adapter.num_visual_tokens)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    out = bound.vision_inputs([image], json.loads((model_dir / "preprocessor_config.json").read_text()))
    assert set(adapter.vision_input_names) | {"window_segments", "image_grid_thw"} == set(out)
    _, cu = host.window_index(out["image_grid_thw"], 2, 56, 14)
    assert np.array_equal(out["window_segments"], host.segment_ids(cu))
