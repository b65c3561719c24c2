"""Per-tile selection (prunert.pruning_ops.tiled): the torch op against the NumPy reference on random
tiled images (kept sets per tile, budgets honoured, masked tokens never ahead of valid ones), prefix
consistency of the ResPrune pick order, the budget edge cases (a real tile with no valid token, fewer
valid tokens than K), config errors, and the exported graph in ONNX Runtime against torch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest

import op_graph as og

torch = og.torch
ort = og.ort

from prunert.config import BudgetConfig, RandomConfig, ResPruneConfig, TileBudgetConfig, UniformConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert.export.graphs import TiledSelection  # noqa: E402
from prunert.export.trt_check import TrtCheckConfig, check_trt  # noqa: E402
from prunert.pruning_ops import tiled  # noqa: E402
from prunert.pruning_ops.random import random_indices, random_priority  # noqa: E402
from prunert.pruning_ops.resprune import resprune_select, text_relevance  # noqa: E402
from prunert.pruning_ops.uniform import uniform_indices  # noqa: E402

T, N, D, DV = 5, 16, 8, 6  # llava-next-tiny's layout: thumbnail + 4 tiles of 4 x 4 tokens
TILES = TileBudgetConfig()
NAMES = ("tokens", "tile_cls", "tile_mask", "token_mask", "text", "text_mask")


def _image(rng: np.random.Generator, kind: str = "gaussian") -> dict[str, np.ndarray]:
    """One image: thumbnail + 0..4 real tiles with random unpadding (some real tiles fully masked)."""
    real = int(rng.integers(0, T))
    tile_mask = (np.arange(T) <= real).astype(np.int64)
    token_mask = np.zeros((T, N), np.int64)
    token_mask[0] = 1
    for t in range(1, real + 1):
        token_mask[t] = rng.random(N) < rng.choice([0.0, 0.5, 1.0, 1.0])
    tokens = rng.standard_normal((T, N, D))
    if kind == "duplicates":
        tokens = tokens.reshape(T * N, D)[rng.integers(0, 6, T * N)].reshape(T, N, D)
    elif kind == "low_rank":
        tokens = rng.standard_normal((T, N, 2)) @ rng.standard_normal((2, D))
    elif kind == "zero_rows":
        tokens.reshape(T * N, D)[rng.integers(0, T * N, 12)] = 0.0
    elif kind == "huge":
        tokens *= 1e30
    text = rng.standard_normal((int(rng.integers(1, 5)), D))
    return {
        "tokens": tokens.astype(np.float32),
        "tile_cls": rng.standard_normal((T, DV)).astype(np.float32),
        "tile_mask": tile_mask,
        "token_mask": token_mask,
        "text": text.astype(np.float32),
        "text_mask": np.ones(len(text), np.int64) if kind != "no_text" else np.zeros(len(text), np.int64),
    }


def _batch(images: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    m = max(len(image["text_mask"]) for image in images)
    out = {name: np.stack([image[name] for image in images]) for name in NAMES[:4]}
    out["text"] = np.zeros((len(images), m, D), np.float32)
    out["text_mask"] = np.zeros((len(images), m), np.int64)
    for b, image in enumerate(images):
        out["text"][b, : len(image["text_mask"])] = image["text"]
        out["text_mask"][b, : len(image["text_mask"])] = image["text_mask"]
    return out


def _torch_select(batch: dict[str, np.ndarray], budget: BudgetConfig) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        kept_tokens, kept = tiled.tiled_select({k: torch.from_numpy(v) for k, v in batch.items()}, budget, TILES)
    return kept_tokens.numpy(), kept.numpy()


def _check_selection(image: dict[str, np.ndarray], kept: np.ndarray, kept_tokens: np.ndarray, k: int) -> np.ndarray:
    """Invariants of one image's selection -> per-tile counts [T]."""
    assert len(kept) == k and (np.diff(kept) > 0).all() and 0 <= kept[0] and kept[-1] < T * N
    np.testing.assert_array_equal(kept_tokens, image["tokens"].reshape(T * N, D)[kept])
    valid = (image["token_mask"] != 0) & (image["tile_mask"] != 0)[:, None]
    chosen = np.zeros(T * N, bool)
    chosen[kept] = True
    chosen = chosen.reshape(T, N)
    counts = chosen.sum(axis=1)
    if valid.sum() >= k:  # caps hold whenever the image has K valid tokens
        assert (counts <= valid.sum(axis=1)).all()
        assert not (chosen & ~valid).any()
    else:  # every valid token kept, the rest filled with masked ones
        assert (chosen | ~valid).all()
    for t in range(T):  # masked tokens of a tile only once all its valid ones are kept
        if (chosen[t] & ~valid[t]).any():
            assert chosen[t][valid[t]].all()
    return counts


CONFIGS = {
    "default": ResPruneConfig(),
    "alpha0": ResPruneConfig(alpha=0.0),
    "mean_normalize": ResPruneConfig(relevance="mean", normalize=True, alpha=2.0),
    "default_rows": ResPruneConfig(gram_max_n=0),  # the rows form inside the tiles (N = 16 <= GRAM_MAX_N: the Gram otherwise)
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["gaussian", "duplicates", "low_rank", "zero_rows", "huge", "no_text"])
def test_torch_matches_reference(name: str, kind: str) -> None:
    rng = np.random.default_rng([sorted(CONFIGS).index(name), len(kind)])
    budgets_equal = total = 0
    for k in (3, 12, 16, 24, 40):
        budget = BudgetConfig(budget=k, params=CONFIGS[name])
        images = [_image(rng, kind) for _ in range(4)]
        kept_tokens, kept = _torch_select(_batch(images), budget)
        for b, image in enumerate(images):
            counts = _check_selection(image, kept[b], kept_tokens[b], k)
            total += 1
            budgets_equal += counts.tolist() == tiled.tiled_budgets_reference(image, k, budget.params, TILES).tolist()
            # per tile, the op's budget k_t -> exactly the reference's k_t-step ResPrune picks
            ref, _ = tiled.tiled_reference(image, k, budget.params, TILES, budgets=counts)
            og.assert_same_sets(kept[b : b + 1], [ref], f"{name}/{kind} K={k}")
    assert budgets_equal >= total - 2, (budgets_equal, total)  # fp32 vs fp64 may floor a share apart, rarely


PLAIN = {"uniform": UniformConfig(), "random": RandomConfig(), "random_seed3": RandomConfig(seed=3)}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_uniform_and_random_per_tile_match_reference(name: str) -> None:
    """Inside each tile the flat op's own rule on the tile's valid tokens; budgets as for ResPrune (HERO with
    ResPrune's default text relevance); a tile with fewer valid tokens than k_t fills with masked ones by index."""
    rng = np.random.default_rng(len(name))
    method = name.split("_")[0]
    budgets_equal = total = 0
    for k in (3, 12, 16, 24, 40):
        budget = BudgetConfig(budget=k, method=method, params=PLAIN[name])
        images = [_image(rng, kind) for kind in ("gaussian", "duplicates", "no_text", "gaussian")]
        kept_tokens, kept = _torch_select(_batch(images), budget)
        for b, image in enumerate(images):
            counts = _check_selection(image, kept[b], kept_tokens[b], k)
            ref, ref_tokens = tiled.tiled_reference(image, k, budget.params, TILES, budgets=counts)
            assert kept[b].tolist() == ref.tolist(), f"{name} K={k}"  # integer rules: identical, not only as sets
            np.testing.assert_array_equal(kept_tokens[b], ref_tokens)
            total += 1
            budgets_equal += counts.tolist() == tiled.tiled_budgets_reference(image, k, budget.params, TILES).tolist()
    assert budgets_equal >= total - 2, (budgets_equal, total)  # the text term of HERO's budgets: ResPrune's defaults


def test_uniform_and_random_on_a_full_tile_are_the_flat_ops() -> None:
    valid = torch.ones(1, N, dtype=torch.bool)
    for k in (1, 5, 16):
        keep = tiled.uniform_keep(valid, torch.tensor([[k]]))
        assert torch.nonzero(keep[0]).flatten().tolist() == uniform_indices(N, k)
        order = tiled.priority_order(torch.from_numpy(random_priority(3, N))[None], valid)
        assert torch.nonzero(order[0] < k).flatten().tolist() == random_indices(3, N, k)


def test_pick_order_is_prefix_consistent_and_matches_resprune() -> None:
    """The first k picks of an S-step run are the k-step run, and on fully valid tiles the first K
    picks are the registered ResPrune op's set (same weights)."""
    rng = np.random.default_rng(7)
    cfg = ResPruneConfig()
    x = torch.from_numpy(rng.standard_normal((6, N, D)).astype(np.float32))
    text = torch.from_numpy(rng.standard_normal((6, 3, D)).astype(np.float32))
    mask = torch.ones(6, 3, dtype=torch.int64)
    weight = text_relevance(x, text, mask, cfg)
    valid = torch.ones(6, N, dtype=torch.bool)
    full = tiled.resprune_order(x, weight, valid, N, cfg)
    assert sorted(full[0].tolist()) == list(range(N))  # N steps: every token gets a distinct step
    for k in (1, 5, 11):
        short = tiled.resprune_order(x, weight, valid, k, cfg)
        torch.testing.assert_close(torch.where(full < k, full, k), short)
        expected = resprune_select(x, text, mask, k, cfg)
        assert [sorted(torch.nonzero(row < k).flatten().tolist()) for row in full] == expected.tolist()


def test_real_tile_without_valid_tokens_gets_budget_zero() -> None:
    """Extreme aspect: every real tile unpadded away. With K <= N the thumbnail keeps all K."""
    rng = np.random.default_rng(3)
    image = _image(rng)
    image["tile_mask"][:] = [1, 1, 1, 0, 0]
    image["token_mask"][1:] = 0
    for k in (4, 16):
        budget = BudgetConfig(budget=k)
        assert tiled.tiled_budgets_reference(image, k, budget.params, TILES).tolist() == [k, 0, 0, 0, 0]
        _, kept = _torch_select(_batch([image]), budget)
        assert (kept[0] < N).all()


def test_fewer_valid_tokens_than_budget_fills_with_masked_tokens_in_tile_order() -> None:
    rng = np.random.default_rng(4)
    image = _image(rng)
    image["tile_mask"][:] = [1, 1, 1, 0, 0]
    image["token_mask"][1:] = 0
    image["token_mask"][1, :3] = 1  # 16 + 3 valid tokens, K = 24
    budgets = tiled.tiled_budgets_reference(image, 24, ResPruneConfig(), TILES)
    assert budgets.tolist() == [16, 8, 0, 0, 0]  # tile 1: its 3 valid tokens + 5 masked ones
    _, kept = _torch_select(_batch([image]), BudgetConfig(budget=24))
    assert kept[0][16:].tolist() == list(range(N, N + 8))  # valid 16..18 first, then masked 19.. by index


def test_none_keeps_every_slot_in_tile_order_as_the_reference() -> None:
    rng = np.random.default_rng(9)
    images = [_image(rng) for _ in range(3)]
    budget = BudgetConfig(budget=T * N, method="none")
    kept_tokens, kept = _torch_select(_batch(images), budget)
    assert kept.shape == (3, T * N) and (kept == np.arange(T * N)).all()  # masked slots too: the host drops them
    for b, image in enumerate(images):
        ref_kept, ref_tokens = tiled.tiled_reference(image, T * N, None, TILES)
        assert set(ref_kept.tolist()) == set(kept[b].tolist())
        np.testing.assert_array_equal(kept_tokens[b], ref_tokens)
    with pytest.raises(ConfigError, match=r"got 12 with --method none, expected 80 \(5 tiles x 16 tokens"):
        TiledSelection(BudgetConfig(budget=12, method="none"), TILES, T, N)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="method 'divprune' does not support per-tile budgets"):
        TiledSelection(BudgetConfig(budget=8, method="divprune"), TILES, T, N)
    with pytest.raises(ConfigError, match=r"expected 1 <= budget < 80"):
        TiledSelection(BudgetConfig(budget=80), TILES, T, N)
    with pytest.raises(ConfigError, match="TensorRT's TopK limit"):
        tiled.check_tiled_budget(BudgetConfig(budget=4000), 5, 2880)
    with pytest.raises(ConfigError, match="thumbnail_share"):
        TileBudgetConfig(thumbnail_share=1.5)


@pytest.mark.parametrize("method", ["resprune", "resprune_rows", "uniform", "random"])
def test_exported_graph_matches_torch_in_onnxruntime(tmp_path, method: str) -> None:
    """Batch symbolic (example batch 2), one Loop (ResPrune), TensorRT-clean; ORT keeps torch's sets on random images.
    resprune_rows: the rows form of the greedy inside the tiles (gram_max_n = 0)."""
    params = ResPruneConfig(gram_max_n=0) if method == "resprune_rows" else None
    budget = BudgetConfig(budget=12, method=method.removesuffix("_rows"), params=params)
    module = TiledSelection(budget, TILES, T, N).eval()

    class Graph(torch.nn.Module):
        def forward(self, *tensors):
            return module(dict(zip(NAMES, tensors)))

    rng = np.random.default_rng(5)
    example = _batch([_image(rng), _image(rng)])
    batch_dim, text_dim = torch.export.Dim("batch"), torch.export.Dim("m")
    dynamic = tuple({0: batch_dim, 1: text_dim} if name.startswith("text") else {0: batch_dim} for name in NAMES)
    path = tmp_path / "tiled.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Graph(), tuple(torch.from_numpy(example[n]) for n in NAMES), dynamo=True, opset_version=og.OPSET,
            input_names=list(NAMES), output_names=["kept_tokens", "kept_indices"], dynamic_shapes={"tensors": dynamic},
        )
    program.save(str(path))
    assert not check_trt(path, TrtCheckConfig())
    assert og.op_counts(og.onnx.load(str(path))).get("Loop", 0) == (budget.method == "resprune")
    session = og.session(path)
    for size in (1, 3, 5):
        images = [_image(rng, kind) for kind in ("gaussian", "duplicates", "zero_rows", "low_rank", "gaussian")[:size]]
        batch = _batch(images)
        got_tokens, got = session.run(None, {n: batch[n] for n in NAMES})
        want_tokens, want = _torch_select(batch, budget)
        og.assert_same_sets(got, list(want), f"ORT vs torch, batch {size}")
        np.testing.assert_allclose(got_tokens, want_tokens, atol=1e-6)


def test_reference_imports_without_torch() -> None:
    code = (
        "import sys; from prunert.pruning_ops import tiled; assert 'torch' not in sys.modules; sys.modules['torch'] = None; "
        "import numpy as np; from prunert.config import ResPruneConfig, TileBudgetConfig; rng = np.random.default_rng(0); "
        "x = {'tokens': rng.standard_normal((3, 4, 2)), 'tile_cls': rng.standard_normal((3, 2)), 'tile_mask': np.ones(3), "
        "'token_mask': np.ones((3, 4)), 'text': rng.standard_normal((1, 2)), 'text_mask': np.ones(1)}; "
        "print(tiled.tiled_reference(x, 5, ResPruneConfig(), TileBudgetConfig())[0].tolist())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(og.REPO), os.environ.get("PYTHONPATH", "")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=og.REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(eval(out.stdout)) == 5


def test_masked_relevance_ignores_masked_tokens() -> None:
    """Masked tokens (any values) change neither the valid tokens' r nor the selection."""
    rng = np.random.default_rng(6)
    image = _image(rng)
    image["tile_mask"][:] = [1, 1, 1, 0, 0]
    image["token_mask"][1, ::2] = 0
    noisy = {**image, "tokens": image["tokens"].copy()}
    invalid = (image["token_mask"] == 0) | (image["tile_mask"] == 0)[:, None]
    noisy["tokens"][invalid] = 1e4 * rng.standard_normal((int(invalid.sum()), D))
    budget = BudgetConfig(budget=12, params=replace(ResPruneConfig(), alpha=2.0))
    assert _torch_select(_batch([image]), budget)[1].tolist() == _torch_select(_batch([noisy]), budget)[1].tolist()
