"""Uniform baseline: the index formula, the exported ONNX graph, and agreement of ONNX Runtime, torch eager and
the NumPy reference.

Layout:
  1. formula     floor((i + 0.5) N / K): distinct, ascending, in range for every 1 <= K <= N <= 120; known values.
  2. export      two graphs, exported once per module: K=8; K=1 and K=N-1 side by side in one graph.
                 No TopK / Loop / NonZero, node count, batch symbolic.
  3. ORT         8 kinds x (15 + 10) = 200 inputs (280 selections, degenerate and non-finite tokens included)
                 vs uniform_reference; batch sizes 1 and 5.
  4. torch       uniform_op eager; registry dispatch; BudgetConfig.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prunert import pruning_ops  # noqa: E402
from prunert.config import BudgetConfig, UniformConfig  # noqa: E402
from prunert.pruning_ops import uniform as un  # noqa: E402

import op_graph as og  # noqa: E402

N, D = 48, 8
CFG = UniformConfig()
GRAPHS = {"k8": ((8,), CFG), "k1_k47": ((1, N - 1), CFG)}  # name -> (budgets computed by that graph, config)
CASES_PER_KIND = {"k8": 15, "k1_k47": 10}
KINDS = og.token_kinds(N, D)
assert len(KINDS) == 8


def reference(tokens: np.ndarray, budget: int) -> np.ndarray:
    return un.uniform_reference({"tokens": tokens}, budget, CFG)[0]


def make_tokens(kind: str, count: int, stream: int) -> np.ndarray:
    return og.make_tokens(KINDS, kind, count, stream)


def check(indices: np.ndarray, kept: np.ndarray, tokens: np.ndarray, budget: int, label: str) -> None:
    """Every row: exactly the reference's indices (int64, ascending) and tokens[indices] bit for bit."""
    og.assert_valid(indices, kept, tokens, budget)
    og.assert_same_sets(indices, [reference(x, budget) for x in tokens], label)


# ----------------------------------------------------------------------------------------- formula


def test_indices_distinct_ascending_in_range_for_every_budget() -> None:
    for n in range(1, 121):
        for budget in range(1, n + 1):
            idx = un.uniform_indices(n, budget)
            assert len(idx) == budget and idx[0] >= 0 and idx[-1] < n
            assert all(b > a for a, b in zip(idx, idx[1:])), (n, budget)
            assert idx == reference(np.zeros((n, 1)), budget).tolist(), (n, budget)


def test_known_values() -> None:
    assert un.uniform_indices(576, 64) == [9 * i + 4 for i in range(64)]  # LLaVA-1.5: every 9th, centred
    assert un.uniform_indices(576, 576) == list(range(576))
    assert un.uniform_indices(576, 1) == [288]
    assert un.uniform_indices(10, 4) == [1, 3, 6, 8]  # floor(1.25), floor(3.75), floor(6.25), floor(8.75)
    assert un.uniform_indices(48, 47) == [i for i in range(48) if i != 23]  # K = N-1 drops a middle token


@pytest.mark.parametrize("budget", [0, -1, N + 1])
def test_bad_budget_raises(budget: int) -> None:
    with pytest.raises(ValueError):
        un.uniform_indices(N, budget)
    with pytest.raises(ValueError):
        reference(np.zeros((N, D)), budget)
    with pytest.raises(ValueError):
        un.uniform_op({"tokens": torch.zeros(2, N, D)}, budget, CFG)


# ----------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, og.Exported]:
    return og.export_each(tmp_path_factory.mktemp("uniform_onnx"), un.uniform_op, GRAPHS, n=N, d=D)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    og.check_graph(graphs[name], {"tokens": ["batch", N, D]}, absent=("NonZero", "TopK", "Loop", "Scan", "If"))


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
        check(indices, kept, tokens, budget, f"ORT {name} K={budget}/{kind}")


@pytest.mark.parametrize("batch", [1, 5])
def test_ort_dynamic_batch(graphs, batch: int) -> None:
    tokens = make_tokens("gaussian", batch, stream=2)
    indices, kept = graphs["k8"].run(tokens)
    check(indices, kept, tokens, 8, f"ORT batch {batch}")


@pytest.mark.parametrize("budget", [1, 8, N - 1, N])
def test_torch_eager_matches_reference(budget: int) -> None:
    tokens = np.concatenate([make_tokens(kind, 2, stream=3) for kind in sorted(KINDS)])
    kept, indices = un.uniform_op({"tokens": torch.from_numpy(tokens)}, budget, CFG)
    check(indices.numpy(), kept.numpy(), tokens, budget, f"torch K={budget}")


def test_registry_dispatch_and_budget_config() -> None:
    budget = BudgetConfig(budget=8, method="uniform")
    assert budget.params == UniformConfig() and pruning_ops.method_params(budget) == {}
    assert pruning_ops.config_from_params("uniform", {}, 8) == budget
    assert pruning_ops.method_spec("uniform").needs == ()
    budget.validate_against(N)
    og.check_dispatch(budget, {"tokens": make_tokens("gaussian", 2, stream=4)}, np.array([un.uniform_indices(N, 8)] * 2))


def test_reference_loads_without_torch() -> None:
    og.check_reference_without_torch("uniform", "uniform_reference", "UniformConfig", "{'tokens': x, 'cls_attention': x[:, 0]}")



def test_symbolic_n_graph_matches_reference(tmp_path) -> None:
    """One graph over a range of N (Qwen2.5-VL): the indices come from N at run time, equal to the reference's
    for every N in the range; TensorRT-clean (static K, sorted TopK)."""
    from prunert.config import UniformConfig
    from prunert.pruning_ops.uniform import uniform_op, uniform_reference

    og.check_symbolic_n(tmp_path, uniform_op, uniform_reference, UniformConfig())
