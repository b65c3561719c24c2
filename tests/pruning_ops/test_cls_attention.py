"""[CLS] attention (FasterVLM): the exported ONNX graph, and agreement of ONNX Runtime, torch eager and the
NumPy reference on kept index SETS, degenerate scores and ties included.

Layout:
  1. export      two graphs, exported once per module: K=8; K=1 and K=N-1 side by side in one graph.
                 No Loop, no NonZero, every TopK sorted=1 with a constant k = K, node count, batch symbolic.
  2. ORT         13 kinds x (10 + 6) = 208 random inputs (286 selections) vs cls_attention_reference;
                 invariants on every row; batch rows independent; the band tie rule; flat attention + noise.
  3. torch       cls_attention_op eager vs the reference; registry dispatch ("needs" cls_attention); BudgetConfig.
  4. properties  without near-ties it is plain top-K; exact ties go to the lowest index; permutations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunert import pruning_ops  # noqa: E402
from prunert.config import BudgetConfig, ClsAttentionConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert.pruning_ops import cls_attention as ca  # noqa: E402
from prunert.pruning_ops.reference import TIE_RTOL  # noqa: E402

import op_graph as og  # noqa: E402

N, D = 48, 16
CFG = ClsAttentionConfig()
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)
GRAPHS = {"k8": ((8,), CFG), "k1_k47": ((1, N - 1), CFG)}  # name -> (budgets computed by that graph, config)
CASES_PER_KIND = {"k8": 10, "k1_k47": 6}


# ----------------------------------------------------------------------------------------- inputs


def kind_softmax(rng):  # realistic: head-averaged softmax rows
    return np.mean([og.softmax(rng.standard_normal(N) * rng.uniform(0.5, 4)) for _ in range(4)], axis=0)


def kind_flat(rng):  # a blank image: every patch attended equally
    return np.full(N, 1.0 / N)


def kind_flat_noisy(rng):  # flat up to backend noise (1e-6 relative): one band, lowest indices
    return np.full(N, 1.0 / N) * (1 + 1e-6 * rng.standard_normal(N))


def kind_all_zero(rng):
    return np.zeros(N)


def kind_few_levels(rng):  # exact ties at the K-th score
    return rng.choice([0.01, 0.02, 0.03, 0.05], N)


def kind_few_levels_noisy(rng):  # ties up to 1e-6 relative noise: resolved by index within each level
    return rng.choice([0.01, 0.02, 0.03, 0.05], N) * (1 + 1e-6 * rng.standard_normal(N))


def kind_near_but_distinct(rng):  # levels 1e-3 relative apart (outside the band): resolved by value
    return 0.02 * (1 + 1e-3 * rng.integers(0, 6, N))


def kind_peaked(rng):  # one dominant patch (an attention sink), the rest equal
    s = np.full(N, 1e-4)
    s[rng.integers(N)] = 0.9
    return s


def kind_some_zeros(rng):
    s = rng.random(N)
    s[rng.integers(0, N, N // 2)] = 0.0
    return s


def kind_duplicated_values(rng):
    s = rng.random(N)
    return s[rng.integers(0, N, N)]


def kind_signed(rng):  # not attention, but any float scores must work (negative t: tol uses |t|)
    return rng.standard_normal(N) * 10 ** rng.uniform(-3, 3)


def kind_extreme_scale(rng):  # 1e-30 .. 1e30: relative band, no underflow of tol
    return rng.random(N) * 10 ** (rng.choice([-1, 1]) * rng.uniform(20, 30))


def kind_distinct_ranks(rng):  # exact distinct integers: a strict order
    return rng.permutation(N).astype(float)


KINDS = og.kinds_in(globals())
assert len(KINDS) == 13


@dataclass
class Case:
    tokens: np.ndarray  # [N, D] float32
    scores: np.ndarray  # [N] float32


def make_cases(kind: str, count: int, stream: int) -> list[Case]:
    return [
        Case(rng.standard_normal((N, D)).astype(np.float32), KINDS[kind](rng).astype(np.float32))
        for rng in og.case_rngs(KINDS, kind, count, stream)
    ]


def stack(cases: list[Case]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([c.tokens for c in cases]), np.stack([c.scores for c in cases])


def reference(case: Case, budget: int) -> np.ndarray:
    return ca.cls_attention_reference({"tokens": case.tokens, "cls_attention": case.scores}, budget, CFG)[0]


def assert_same_sets(got: np.ndarray, cases: list[Case], budget: int, label: str) -> None:
    og.assert_same_sets(got, [reference(case, budget) for case in cases], label)


# ----------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, og.Exported]:
    out = tmp_path_factory.mktemp("cls_attention_onnx")
    return og.export_each(out, ca.cls_attention_op, GRAPHS, ("tokens", "cls_attention"), n=N, d=D)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    g = graphs[name]
    inputs = {"tokens": ["batch", N, D], "cls_attention": ["batch", N]}
    ops = og.check_graph(g, inputs, absent=("NonZero", "Loop", "Scan"), topk_k_in_budgets=True)
    assert ops["TopK"] == 3 * len(g.budgets)


def test_node_count(graphs) -> None:
    """One selection: 18 nodes (3 TopK, masks, GatherElements), reported in the module docstring."""
    assert og.node_count(graphs["k8"].model) <= 24


# ----------------------------------------------------------------------------------------- ORT vs reference


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs, name: str, kind: str) -> None:
    g = graphs[name]
    cases = make_cases(kind, CASES_PER_KIND[name], stream=1)
    tokens, scores = stack(cases)
    for budget, indices, kept in g.selections(tokens, scores):
        og.assert_valid(indices, kept, tokens, budget)
        assert_same_sets(indices, cases, budget, f"ORT {name} K={budget}/{kind}")


def test_ort_batch_rows_are_independent(graphs) -> None:
    cases = [c for kind in ("softmax", "few_levels", "all_zero", "signed") for c in make_cases(kind, 1, stream=2)]
    batched = graphs["k8"].run(*stack(cases))[0]
    for b, case in enumerate(cases):
        np.testing.assert_array_equal(graphs["k8"].run(*stack([case]))[0][0], batched[b])  # batch 1


@pytest.mark.parametrize("gap, winner", [(0.2, 0), (0.8, 0), (1.5, 1), (10.0, 1)])
def test_band_tie_rule_goes_to_lower_index(graphs, gap: float, winner: int) -> None:
    """Seven clear winners, then s_1 = s_0 (1 + gap * TIE_RTOL) competing for the 8th slot: within the band
    (gap < 1) the lower index 0 on every backend, beyond it the larger score."""
    rng = np.random.default_rng(11)
    scores = rng.uniform(0.001, 0.01, N)
    scores[rng.choice(np.arange(2, N), 7, replace=False)] = 0.9
    scores[0], scores[1] = 0.5, 0.5 * (1 + gap * TIE_RTOL)
    case = Case(rng.standard_normal((N, D)).astype(np.float32), scores.astype(np.float32))
    results = {
        "reference": reference(case, 8),
        "ort": graphs["k8"].run(*stack([case, case]))[0][0],
        "torch": ca.cls_attention_select(torch.from_numpy(case.scores[None]), 8)[0].numpy(),
    }
    for backend, kept in results.items():
        assert {0, 1} & set(kept.tolist()) == {winner}, backend


def test_flat_attention_with_backend_noise_keeps_the_first_k(graphs) -> None:
    """A blank image: attention equal up to 1e-6 relative noise that differs between backends; every
    backend keeps tokens 0..K-1 whatever the noise (an exact-tie rule would keep noise-dependent sets)."""
    rng = np.random.default_rng(12)
    cases = [Case(np.zeros((N, D), np.float32), (np.full(N, 1 / N) * (1 + 1e-6 * rng.standard_normal(N))).astype(np.float32)) for _ in range(4)]
    assert graphs["k8"].run(*stack(cases))[0].tolist() == [list(range(8))] * 4
    for case in cases:
        assert reference(case, 8).tolist() == list(range(8))


# ----------------------------------------------------------------------------------------- torch, registry


@pytest.mark.parametrize("budget", [1, 8, N - 1, N])
def test_torch_eager_matches_reference(budget: int) -> None:
    cases = [c for kind in sorted(KINDS) for c in make_cases(kind, 2, stream=3)]
    tokens, scores = stack(cases)
    kept_tokens, indices = ca.cls_attention_op({"tokens": torch.from_numpy(tokens), "cls_attention": torch.from_numpy(scores)}, budget, CFG)
    og.assert_valid(indices.numpy(), kept_tokens.numpy(), tokens, budget)
    assert_same_sets(indices.numpy(), cases, budget, f"torch K={budget}")


def test_registry_dispatch_and_budget_config() -> None:
    budget = BudgetConfig(budget=8, method="cls_attention")
    assert budget.params == ClsAttentionConfig() and pruning_ops.method_params(budget) == {}
    assert pruning_ops.config_from_params("cls_attention", {}, 8) == budget
    assert pruning_ops.method_spec("cls_attention").needs == ("cls_attention",)
    budget.validate_against(N)
    cases = make_cases("softmax", 2, stream=4)
    tokens, scores = stack(cases)
    want_tokens, want = ca.cls_attention_op({"tokens": torch.from_numpy(tokens), "cls_attention": torch.from_numpy(scores)}, 8, CFG)
    assert want.tolist() == [reference(case, 8).tolist() for case in cases]
    kept_tokens, _ = og.check_dispatch(budget, {"tokens": tokens, "cls_attention": scores}, want.numpy())
    assert torch.equal(kept_tokens, want_tokens)


@pytest.mark.parametrize("budget", [0, N + 1])
def test_bad_budget_raises(budget: int) -> None:
    case = make_cases("softmax", 1, stream=5)[0]
    with pytest.raises(ValueError):
        reference(case, budget)
    with pytest.raises(ValueError):
        ca.cls_attention_select(torch.from_numpy(case.scores[None]), budget)


# ----------------------------------------------------------------------------------------- properties


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), budget=st.integers(1, 40))
def test_without_near_ties_it_is_plain_top_k(seed: int, n: int, budget: int) -> None:
    """Distinct scores at least 1e-3 relative apart: the K largest, whatever the order of the tokens."""
    budget = min(budget, n)
    rng = np.random.default_rng(seed)
    scores = rng.permutation(1.002 ** np.arange(n)) * rng.uniform(1e-3, 1e3)
    tokens = rng.standard_normal((n, 3))
    kept = ca.cls_attention_reference({"tokens": tokens, "cls_attention": scores}, budget, CFG)[0]
    assert kept.tolist() == sorted(np.argsort(-scores)[:budget].tolist())


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), budget=st.integers(1, 40), levels=st.integers(1, 4))
def test_exact_ties_go_to_the_lowest_index(seed: int, n: int, budget: int, levels: int) -> None:
    """Scores from a few levels: every token above the K-th score, then the lowest-index ones at it."""
    budget = min(budget, n)
    rng = np.random.default_rng(seed)
    scores = rng.choice(np.linspace(0.1, 1.0, levels), n)
    kth = np.sort(scores)[::-1][budget - 1]
    want = sorted(np.flatnonzero(scores > kth).tolist() + np.flatnonzero(scores == kth)[: budget - int((scores > kth).sum())].tolist())
    kept = ca.cls_attention_reference({"tokens": np.zeros((n, 2)), "cls_attention": scores}, budget, CFG)[0]
    assert kept.tolist() == want
    got = ca.cls_attention_select(torch.from_numpy(scores[None].astype(np.float32)), budget)[0]
    assert got.tolist() == want


def test_reference_loads_without_torch() -> None:
    og.check_reference_without_torch(
        "cls_attention", "cls_attention_reference", "ClsAttentionConfig", "{'tokens': x, 'cls_attention': x[:, 0]}"
    )


def test_scores_of_another_token_count_are_refused() -> None:
    """Scores of patches 1..N gathering tokens 0..N (the [CLS] row kept, LLaVA's "full" strategy) select the
    wrong tokens (an off-by-one): torch and the reference refuse inputs that cover different tokens."""
    case = make_cases("softmax", 1, stream=6)[0]
    tokens = np.concatenate([np.zeros((1, D)), case.tokens])  # [1 + N, D]: a [CLS] row first
    with pytest.raises(ConfigError, match=r"tokens 49, cls_attention 48"):
        ca.cls_attention_reference({"tokens": tokens, "cls_attention": case.scores}, 8, CFG)
    with pytest.raises(ConfigError, match=r"tokens 49, cls_attention 48"):
        ca.cls_attention_op({"tokens": torch.from_numpy(tokens[None]), "cls_attention": torch.from_numpy(case.scores[None])}, 8, CFG)


def test_needs_a_cls_token() -> None:
    assert pruning_ops.method_spec("cls_attention").needs_cls and not pruning_ops.method_spec("resprune").needs_cls
    pruning_ops.check_applies("cls_attention", has_cls_token=True)
    with pytest.raises(ConfigError, match=r"--method cls_attention: needs the vision tower's \[CLS\] token"):
        pruning_ops.check_applies("cls_attention", has_cls_token=False)
