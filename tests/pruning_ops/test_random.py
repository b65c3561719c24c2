"""Random baseline: the seeded subset, the exported ONNX graph, and agreement of ONNX Runtime, torch eager and
the NumPy reference.

Layout:
  1. subset      np.random.default_rng(seed).random(N), K largest keys; distinct, ascending; nested in K;
                 seed-dependent; every index equally likely over seeds; an independent argsort form.
  2. export      two graphs, exported once per module: K=8 (seed 0); K=1 and K=N-1 (seed 1234) side by side.
                 The subset is a graph constant: no TopK / Loop / NonZero, node count, batch symbolic.
  3. ORT         8 kinds x (15 + 10) = 200 inputs (280 selections) vs random_reference; batch sizes 1 and 5.
  4. torch       random_op eager; registry dispatch; BudgetConfig; the module name shadows nothing.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from prunert import pruning_ops  # noqa: E402
from prunert.config import BudgetConfig, RandomConfig  # noqa: E402
from prunert.pruning_ops import random as rnd  # noqa: E402

import op_graph as og  # noqa: E402

N, D = 48, 8
GRAPHS = {"k8": ((8,), RandomConfig()), "k1_k47": ((1, N - 1), RandomConfig(seed=1234))}
CASES_PER_KIND = {"k8": 15, "k1_k47": 10}
KINDS = og.token_kinds(N, D)
assert len(KINDS) == 8


def reference(tokens: np.ndarray, budget: int, cfg: RandomConfig) -> np.ndarray:
    return rnd.random_reference({"tokens": tokens}, budget, cfg)[0]


def make_tokens(kind: str, count: int, stream: int) -> np.ndarray:
    return og.make_tokens(KINDS, kind, count, stream)


def check(indices: np.ndarray, kept: np.ndarray, tokens: np.ndarray, budget: int, cfg: RandomConfig, label: str) -> None:
    """Every row: exactly the reference's indices (int64, ascending) and tokens[indices] bit for bit."""
    og.assert_valid(indices, kept, tokens, budget)
    og.assert_same_sets(indices, [reference(x, budget, cfg) for x in tokens], label)


# ----------------------------------------------------------------------------------------- subset


def test_subset_is_the_k_largest_keys_of_the_seeded_generator() -> None:
    for seed in (0, 1, 42, 2**40 + 3):
        keys = np.random.default_rng(seed).random(N)
        for budget in (1, 8, N - 1, N):
            want = sorted(np.argsort(keys)[::-1][:budget].tolist())  # independent form
            assert rnd.random_indices(seed, N, budget) == want
            assert reference(np.zeros((N, D)), budget, RandomConfig(seed=seed)).tolist() == want


def test_subset_is_distinct_ascending_and_nested_in_budget() -> None:
    for seed in range(20):
        previous: set[int] = set()
        for budget in range(1, N + 1):
            idx = rnd.random_indices(seed, N, budget)
            assert len(idx) == budget and all(b > a for a, b in zip(idx, idx[1:])) and 0 <= idx[0] and idx[-1] < N
            assert previous < set(idx)  # one more token than budget - 1, all of those kept
            previous = set(idx)


def test_seed_matters_and_is_reproducible() -> None:
    subsets = {tuple(rnd.random_indices(seed, 576, 64)) for seed in range(50)}
    assert len(subsets) == 50
    assert rnd.random_indices(7, 576, 64) == rnd.random_indices(7, 576, 64)


def test_every_index_equally_likely_over_seeds() -> None:
    """2,000 seeds, K=12 of N=48: each index is kept with probability 1/4 (expected 500 times, sd ~19)."""
    counts = np.zeros(N)
    for seed in range(2000):
        counts[rnd.random_indices(seed, N, 12)] += 1
    assert counts.sum() == 2000 * 12
    assert np.abs(counts - 500).max() < 6 * np.sqrt(2000 * 0.25 * 0.75), counts


@pytest.mark.parametrize("budget", [0, -1, N + 1])
def test_bad_budget_raises(budget: int) -> None:
    with pytest.raises(ValueError):
        rnd.random_indices(0, N, budget)
    with pytest.raises(ValueError):
        reference(np.zeros((N, D)), budget, RandomConfig())
    with pytest.raises(ValueError):
        rnd.random_op({"tokens": torch.zeros(2, N, D)}, budget, RandomConfig())


# ----------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, og.Exported]:
    return og.export_each(tmp_path_factory.mktemp("random_onnx"), rnd.random_op, GRAPHS, n=N, d=D)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    g = graphs[name]
    og.check_graph(g, {"tokens": ["batch", N, D]}, absent=("NonZero", "TopK", "Loop", "Scan", "If", "RandomUniform", "RandomNormal"))
    # the seed's subset is baked in as a constant
    constants = [onnx.numpy_helper.to_array(t).reshape(-1).tolist() for t in g.model.graph.initializer]
    for k in g.budgets:
        assert rnd.random_indices(g.cfg.seed, N, k) in constants


def test_node_count(graphs) -> None:
    """One selection: 6 nodes (constant indices, Expand to the batch, GatherElements)."""
    assert len(graphs["k8"].model.graph.node) <= 8


# ----------------------------------------------------------------------------------------- ORT, torch


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs, name: str, kind: str) -> None:
    g = graphs[name]
    tokens = make_tokens(kind, CASES_PER_KIND[name], stream=1)
    for budget, indices, kept in g.selections(tokens):
        check(indices, kept, tokens, budget, g.cfg, f"ORT {name} K={budget}/{kind}")


@pytest.mark.parametrize("batch", [1, 5])
def test_ort_dynamic_batch(graphs, batch: int) -> None:
    tokens = make_tokens("gaussian", batch, stream=2)
    indices, kept = graphs["k8"].run(tokens)
    check(indices, kept, tokens, 8, graphs["k8"].cfg, f"ORT batch {batch}")


@pytest.mark.parametrize("seed", [0, 99])
@pytest.mark.parametrize("budget", [1, 8, N - 1, N])
def test_torch_eager_matches_reference(budget: int, seed: int) -> None:
    cfg = RandomConfig(seed=seed)
    tokens = np.concatenate([make_tokens(kind, 2, stream=3) for kind in sorted(KINDS)])
    kept, indices = rnd.random_op({"tokens": torch.from_numpy(tokens)}, budget, cfg)
    check(indices.numpy(), kept.numpy(), tokens, budget, cfg, f"torch K={budget}")


def test_registry_dispatch_and_budget_config() -> None:
    budget = BudgetConfig(budget=8, method="random")
    assert budget.params == RandomConfig() and pruning_ops.method_params(budget) == {"seed": 0}
    assert pruning_ops.config_from_params("random", {"seed": 5}, 8) == BudgetConfig(8, "random", RandomConfig(seed=5))
    assert pruning_ops.method_spec("random").needs == ()
    budget.validate_against(N)
    tokens = make_tokens("gaussian", 2, stream=4)
    for cfg in (RandomConfig(), RandomConfig(seed=5)):
        want = np.array([rnd.random_indices(cfg.seed, N, 8)] * 2)
        og.check_dispatch(BudgetConfig(budget=8, method="random", params=cfg), {"tokens": tokens}, want)


def test_module_name_shadows_no_stdlib_module() -> None:
    """prunert/pruning_ops/random.py is only ever prunert.pruning_ops.random: `import random` (absolute
    imports) stays the standard library's, also after the module was imported."""
    import random

    assert random is not rnd and sys.modules["random"] is random
    assert importlib.import_module("prunert.pruning_ops.random") is rnd
    assert hasattr(random, "Random") and not hasattr(rnd, "Random")


def test_reference_loads_without_torch() -> None:
    og.check_reference_without_torch("random", "random_reference", "RandomConfig", "{'tokens': x, 'cls_attention': x[:, 0]}")



def test_symbolic_n_graph_matches_reference(tmp_path) -> None:
    """One graph over a range of N (Qwen2.5-VL): the indices come from N at run time, equal to the reference's
    for every N in the range; TensorRT-clean (static K, sorted TopK)."""
    from prunert.config import RandomConfig
    from prunert.pruning_ops.random import random_op, random_reference

    og.check_symbolic_n(tmp_path, random_op, random_reference, RandomConfig(seed=3))
