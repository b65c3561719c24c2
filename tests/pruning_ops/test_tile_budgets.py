"""HERO-style tile budgets: torch op and ONNX Runtime against the NumPy reference on random tiles;
budgets sum to K exactly, never exceed a tile's valid tokens, the thumbnail keeps its share."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from prunert.errors import ConfigError  # noqa: E402
from prunert.pruning_ops.tile_budgets import TileBudgetConfig, tile_budgets, tile_budgets_reference  # noqa: E402

CFG = TileBudgetConfig()


def _sample(rng: np.random.Generator, tiles: int, n: int = 576, dv: int = 16):
    """One image: thumbnail + up to `tiles` tiles (some padding), valid counts after unpadding."""
    real = int(rng.integers(0, tiles + 1))
    valid = np.zeros(tiles + 1, np.int64)
    valid[0] = n
    valid[1 : real + 1] = rng.integers(n // 3, n + 1, size=real)
    cls = rng.normal(size=(tiles + 1, dv)).astype(np.float32)
    cls[1:] += rng.uniform(0, 3) * cls[0]  # tiles resemble the global view to a random degree
    relevance = np.where(valid > 0, rng.uniform(1e-3, 1, size=tiles + 1), 0).astype(np.float32)
    return cls, relevance, valid


def _near_integer(cls, relevance, valid, budget: int) -> bool:
    """A floor(share * local) within rounding of an integer: fp32 and fp64 may legitimately round apart."""
    tiles = [i for i in range(1, len(valid)) if valid[i] > 0]
    if not tiles:
        return False
    unit = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
    logits = np.array([unit[i] @ unit[0] for i in tiles]) / CFG.temperature
    sal = np.exp(logits - logits.max())
    rel = relevance[tiles] / relevance[tiles].sum()
    share = (1 - CFG.text_weight) * sal / sal.sum() + CFG.text_weight * rel
    local = budget - min(round(CFG.thumbnail_share * budget), valid[0])
    frac = (share * local) % 1
    ties = np.diff(np.sort(share)).min() < 1e-6 if len(share) > 1 else False
    return bool(np.any(np.minimum(frac, 1 - frac) < 1e-4) or ties)


def _check(budgets: np.ndarray, valid: np.ndarray, budget: int) -> None:
    assert budgets.sum() == budget
    assert (budgets >= 0).all() and (budgets <= valid).all()
    assert budgets[valid == 0].sum() == 0


@pytest.mark.parametrize("budget", [16, 64, 160, 576])
def test_torch_matches_reference_on_random_tiles(budget: int) -> None:
    rng = np.random.default_rng(budget)
    compared = 0
    for _ in range(100):
        samples = [_sample(rng, tiles=4) for _ in range(3)]
        cls, rel, valid = (np.stack(parts) for parts in zip(*samples))
        ours = tile_budgets(torch.from_numpy(cls), torch.from_numpy(rel), torch.from_numpy(valid), budget, CFG).numpy()
        for row, (c, r, v) in enumerate(samples):
            _check(ours[row], v, budget)
            if not _near_integer(c, r, v, budget):
                np.testing.assert_array_equal(ours[row], tile_budgets_reference(c, r, v, budget, CFG))
                compared += 1
    assert compared > 200  # rounding-boundary samples (and one-tile images, share exactly 1) are skipped


def test_thumbnail_share_and_caps() -> None:
    cls = np.ones((3, 4), np.float32)
    valid = np.array([576, 10, 576])
    budgets = tile_budgets_reference(cls, np.array([0, 1.0, 1.0]), valid, 100, CFG)
    assert budgets[0] == 25 and budgets[1] == 10 and budgets[2] == 65  # tile 1 capped, tile 2 takes the rest
    only_thumb = tile_budgets_reference(cls, np.array([0, 0, 0.0]), np.array([576, 0, 0]), 64, CFG)
    assert only_thumb.tolist() == [64, 0, 0]  # a small image has no tiles: the thumbnail keeps all K


def test_text_relevance_moves_budget() -> None:
    cls = np.array([[1, 0], [1, 0], [1, 0]], np.float32)  # equal saliency
    valid = np.array([576, 576, 576])
    budgets = tile_budgets_reference(cls, np.array([0, 0.9, 0.1]), valid, 64, CFG)
    assert budgets[1] > budgets[2] and budgets.sum() == 64


def test_exported_graph_agrees(tmp_path) -> None:
    class Budgets(torch.nn.Module):
        def forward(self, cls, rel, valid):
            return tile_budgets(cls, rel, valid, 64, CFG)

    rng = np.random.default_rng(7)
    cls, rel, valid = (np.stack(parts) for parts in zip(*[_sample(rng, tiles=4) for _ in range(2)]))
    path = tmp_path / "budgets.onnx"
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.onnx.export(Budgets(), (torch.from_numpy(cls), torch.from_numpy(rel), torch.from_numpy(valid)), str(path),
                      dynamo=True, opset_version=20, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    from prunert.export.trt_check import TrtCheckConfig, check_trt

    issues = check_trt(path, TrtCheckConfig())
    assert not issues, [issue.line() for issue in issues]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compared = 0
    for _ in range(60):
        samples = [_sample(rng, tiles=4) for _ in range(3)]
        cls, rel, valid = (np.stack(parts) for parts in zip(*samples))
        (ours,) = session.run(None, {"cls": cls, "rel": rel, "valid": valid})
        for row, (c, r, v) in enumerate(samples):
            _check(ours[row], v, 64)
            if not _near_integer(c, r, v, 64):
                np.testing.assert_array_equal(ours[row], tile_budgets_reference(c, r, v, 64, CFG))
                compared += 1
    assert compared > 120  # one-tile images (share exactly 1) are skipped as near-integer


@pytest.mark.parametrize("field, value", [("thumbnail_share", 1.5), ("text_weight", -0.1), ("temperature", 0.0)])
def test_bad_config(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        TileBudgetConfig(**{field: value})
