"""DivPrune: the exported ONNX graph, and agreement of ONNX Runtime, torch eager and the NumPy reference on
kept index SETS, degenerate inputs and ties included.

Layout:
  1. export      two graphs, exported once per module: K=8; K=1 and K=N-1 side by side in one graph.
                 One Loop per selection, no scan outputs, no NonZero, TopK sorted=1, node count, batch symbolic.
  2. ORT         16 kinds x (8 + 6) = 224 random inputs (320 selections) vs divprune_reference; invariants on
                 every row; batch rows independent; closed-form degenerate cases; the tie rule; (slow) N=576,
                 d=1024, K=64 on Gaussian, correlated and letterbox-like tokens.
  3. torch       divprune_op eager vs the reference on a subset; registry dispatch; BudgetConfig.
  4. forms       the original DivPrune loop (second-smallest distance per column, then column minima over
                 the kept rows) and a brute-force max-min written here vs the reference; properties.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunert import pruning_ops  # noqa: E402
from prunert.config import BudgetConfig, DivPruneConfig  # noqa: E402
from prunert.pruning_ops import divprune as dp  # noqa: E402

import op_graph as og  # noqa: E402

N, D = 48, 32
CFG = DivPruneConfig()
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None)
GRAPHS = {"k8": ((8,), CFG), "k1_k47": ((1, N - 1), CFG)}  # name -> (budgets computed by that graph, config)
CASES_PER_KIND = {"k8": 8, "k1_k47": 6}


# ----------------------------------------------------------------------------------------- inputs


def kind_gaussian(rng):  # one scale per image, 1e-4 .. 1e4
    return rng.standard_normal((N, D)) * 10 ** rng.uniform(-4, 4)


def kind_correlated(rng):  # a shared mean direction: cosines 0.5 .. 0.99, like projector outputs
    return rng.standard_normal(D) * rng.uniform(1, 6) + rng.standard_normal((N, D))


def kind_token_scales(rng):  # one scale per token, 1e-20 .. 1e20: the row-peak guard keeps fp32 norms finite
    return rng.standard_normal((N, D)) * 10 ** rng.uniform(-20, 20, (N, 1))


def kind_duplicates(rng):
    return og.copy_rows(rng, rng.standard_normal((N, D)), 24)


def kind_scaled_duplicates(rng):  # positive multiples (distance 0) and negative ones (distance 2)
    return og.copy_rows(rng, rng.standard_normal((N, D)), 24, (-1.0, 2.0, -0.5, 1e3, 1e-3))


def kind_noisy_duplicates(rng):  # copies with 1e-7 relative noise: distance ~1e-14 (fp32: ~1e-7), inside DIST_ATOL
    x = rng.standard_normal((N, D))
    src = rng.integers(0, 6, N)
    return x[src] * (1 + 1e-7 * rng.standard_normal((N, D)))


def kind_zero_rows(rng):  # zero tokens: cosine 0, distance 1 to everything (each other included)
    x = rng.standard_normal((N, D))
    x[rng.integers(0, N, 12)] = 0.0
    return x


def kind_all_zero(rng):
    return np.zeros((N, D))


def kind_all_equal(rng):
    return np.tile(rng.standard_normal(D), (N, 1))


def kind_one_hot(rng):  # +-e_k: distances exactly 0, 1 or 2 on every backend, exact ties everywhere
    return np.eye(D)[rng.integers(0, D // 4, N)] * rng.choice([-1.0, 1.0, 3.0], (N, 1))


def kind_small_ints(rng):
    return rng.integers(-2, 3, (N, D)).astype(float)


def kind_low_rank(rng):  # rank 2..4: many near-collinear tokens
    rank = int(rng.integers(2, 5))
    return rng.standard_normal((N, rank)) @ rng.standard_normal((rank, D))


def kind_rank_one(rng):  # +-v only: distances 0 or 2
    return rng.standard_normal((N, 1)) @ rng.standard_normal((1, D))


def kind_clusters(rng):  # 5 centres + 1e-3 noise: within-cluster distances ~1e-6 (ties), far between clusters
    centres = rng.standard_normal((5, D))
    return centres[rng.integers(0, 5, N)] + 1e-3 * rng.standard_normal((N, D))


def kind_zeros_and_duplicates(rng):  # half zero, the rest three distinct rows repeated
    x = np.zeros((N, D))
    x[N // 2 :] = rng.standard_normal((3, D))[rng.integers(0, 3, N - N // 2)]
    return rng.permutation(x)


def kind_permuted_row(rng):  # permutations of one small-integer row: equal norms, many equal cosines
    base = rng.integers(-2, 3, D).astype(float)
    return np.stack([rng.permutation(base) for _ in range(N)])


KINDS = og.kinds_in(globals())
assert len(KINDS) == 16


def make_cases(kind: str, count: int, stream: int) -> list[np.ndarray]:
    return [KINDS[kind](rng).astype(np.float32) for rng in og.case_rngs(KINDS, kind, count, stream)]


def assert_same_sets(got: np.ndarray, cases: list[np.ndarray], budget: int, label: str) -> None:
    og.assert_same_sets(got, [dp.divprune(x, budget) for x in cases], label)


# ----------------------------------------------------------------------------------------- export


def export_graph(path, budgets: tuple[int, ...], n: int = N, d: int = D) -> og.Exported:
    return og.export_selection(path, dp.divprune_op, budgets, CFG, n=n, d=d)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, og.Exported]:
    return og.export_each(tmp_path_factory.mktemp("divprune_onnx"), dp.divprune_op, GRAPHS, n=N, d=D)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    g = graphs[name]
    ops = og.check_graph(g, {"tokens": ["batch", N, D]}, topk_k_in_budgets=True)
    assert ops["Loop"] == len(g.budgets), "the K greedy steps of each selection: one ONNX Loop"


def test_node_count(graphs) -> None:
    """One selection: 23 top-level nodes, 42 with the Loop body (reported in the module docstring)."""
    g = graphs["k8"]
    top, every = len(g.model.graph.node), og.node_count(g.model)
    assert top <= 30 and every <= 50, (top, every)


# ----------------------------------------------------------------------------------------- ORT vs reference


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs, name: str, kind: str) -> None:
    g = graphs[name]
    cases = make_cases(kind, CASES_PER_KIND[name], stream=1)
    tokens = np.stack(cases)
    for budget, indices, kept in g.selections(tokens):
        og.assert_valid(indices, kept, tokens, budget)
        assert_same_sets(indices, cases, budget, f"ORT {name} K={budget}/{kind}")


def test_ort_batch_rows_are_independent(graphs) -> None:
    cases = [c for kind in ("gaussian", "duplicates", "all_zero", "one_hot") for c in make_cases(kind, 1, stream=2)]
    batched = graphs["k8"].run(np.stack(cases))[0]
    for b, x in enumerate(cases):
        np.testing.assert_array_equal(graphs["k8"].run(x[None])[0][0], batched[b])  # batch 1


def _closed_form() -> list[tuple[str, np.ndarray, list[int]]]:
    rng = np.random.default_rng(7)
    v = rng.standard_normal(D)
    zero_and_dups = np.zeros((N, D))
    zero_and_dups[5:] = v  # tokens 0..4 zero: 1 from everything; the rest duplicates of v
    three = np.zeros((N, D))
    three[:] = v
    three[20], three[33] = -v, rng.standard_normal(D)
    return [
        ("all zero", np.zeros((N, D)), list(range(8))),  # every distance 1: index order
        ("all equal", np.tile(v, (N, 1)), list(range(8))),  # every distance 0: index order
        # nn distances: zeros 1, copies of v 0 -> pick 0; then every token is at 1 from the kept zeros:
        # index order 1..5; after 5 the copies of v are at 0 -> index order
        ("zeros and duplicates", zero_and_dups, [0, 1, 2, 3, 4, 5, 6, 7]),
        # v everywhere but -v at 20 and a random w at 33 (c = cos(v, w)): nn distances 0 (copies),
        # 1 + c (-v), 1 - |c| (w) -> 20 (a tie goes to 20 too); then the copies at 2 from -v -> 0; then w,
        # at 1 - |c| from {-v, v} -> 33; then the copies, all at 0 -> index order
        ("antipodal", three, [20, 0, 33, 1, 2, 3, 4, 5]),
    ]


@pytest.mark.parametrize("label", [c[0] for c in _closed_form()])
def test_closed_form_degenerate_cases(graphs, label: str) -> None:
    _, x, want = next(c for c in _closed_form() if c[0] == label)
    want = sorted(want)
    x = x.astype(np.float32)
    assert dp.divprune(x, 8).tolist() == want
    assert graphs["k8"].run(np.stack([x, x]))[0].tolist() == [want, want]
    assert dp.divprune_op({"tokens": torch.from_numpy(x[None])}, 8, CFG)[1].tolist() == [want]


@pytest.mark.parametrize("gap, winner", [(0.2, 0), (0.8, 0), (1.5, 1), (10.0, 1)])
def test_tie_rule_is_absolute_and_goes_to_lower_index(graphs, gap: float, winner: int) -> None:
    """Tokens 2..47 are copies of e_1 (nearest-neighbour distance 0); x_0 = c0 e_1 + s0 e_2 and
    x_1 = c1 e_1 - s1 e_3 have nearest-neighbour distances 1 - c0 and 1 - c1 (d(x_0, x_1) = 1 - c0 c1 is
    larger), which differ by gap * DIST_ATOL. Within DIST_ATOL (gap < 1) the first pick is the lower index
    on every backend; beyond it, the more isolated token 1."""
    c0 = 0.5
    c1 = c0 - gap * dp.DIST_ATOL
    x = np.zeros((N, D))
    x[2:] = np.eye(D)[1] * np.linspace(1, 2, N - 2)[:, None]
    x[0] = c0 * np.eye(D)[1] + np.sqrt(1 - c0**2) * np.eye(D)[2]
    x[1] = c1 * np.eye(D)[1] - np.sqrt(1 - c1**2) * np.eye(D)[3]
    x = x.astype(np.float32)
    dist = dp.cosine_distances(x)
    nn = [min(dist[i, j] for j in range(N) if j != i) for i in (0, 1)]
    assert abs((nn[1] - nn[0]) - gap * dp.DIST_ATOL) < 1e-7  # the setup
    results = {
        "reference": dp.divprune(x, 1),
        "ort": graphs["k1_k47"].run(np.stack([x, x]))[0][0],
        "torch": dp.divprune_op({"tokens": torch.from_numpy(x[None])}, 1, CFG)[1][0].numpy(),
    }
    for backend, kept in results.items():
        assert kept.tolist() == [winner], backend


REAL_N, REAL_D, REAL_K = 576, 1024, 64  # LLaVA-1.5's token count, a quarter of its width, a typical budget


@pytest.mark.slow
def test_ort_matches_reference_at_realistic_size(tmp_path) -> None:
    """N=576, d=1024, K=64 on Gaussian, correlated (a shared mean: distances within ~0.02, so candidate gaps
    of ~1e-5) and letterbox-like inputs (200 copies of one token): ORT and torch eager keep the reference's set."""
    g = export_graph(tmp_path / "real.onnx", (REAL_K,), n=REAL_N, d=REAL_D)
    cases = []
    for seed in range(3):
        rng = np.random.default_rng([20, seed])
        x = rng.standard_normal((REAL_N, REAL_D))
        if seed == 1:
            x += 4 * rng.standard_normal(REAL_D)
        if seed == 2:
            x[rng.integers(0, REAL_N, 200)] = x[5]
        cases.append(x.astype(np.float32))
    tokens = np.stack(cases)
    indices, kept = g.run(tokens)
    og.assert_valid(indices, kept, tokens, REAL_K)
    assert_same_sets(indices, cases, REAL_K, "ORT realistic")
    eager = dp.divprune_op({"tokens": torch.from_numpy(tokens)}, REAL_K, CFG)[1].numpy()
    assert_same_sets(eager, cases, REAL_K, "torch realistic")


# ----------------------------------------------------------------------------------------- torch, registry


@pytest.mark.parametrize("budget", [1, 8, N - 1, N])
def test_torch_eager_matches_reference(budget: int) -> None:
    cases = [c for kind in sorted(KINDS) for c in make_cases(kind, 1, stream=3)]
    tokens = np.stack(cases)
    kept_tokens, indices = dp.divprune_op({"tokens": torch.from_numpy(tokens)}, budget, CFG)
    og.assert_valid(indices.numpy(), kept_tokens.numpy(), tokens, budget)
    assert_same_sets(indices.numpy(), cases, budget, f"torch K={budget}")


def test_registry_dispatch_and_budget_config() -> None:
    budget = BudgetConfig(budget=8, method="divprune")
    assert budget.params == DivPruneConfig() and pruning_ops.method_params(budget) == {}
    assert pruning_ops.config_from_params("divprune", {}, 8) == budget
    assert pruning_ops.method_spec("divprune").needs == ()
    budget.validate_against(N)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, N, D)).astype(np.float32)
    want_tokens, want = dp.divprune_op({"tokens": torch.from_numpy(x)}, 8, CFG)
    assert want.tolist() == [dp.divprune(x[b], 8).tolist() for b in range(2)]
    kept_tokens, _ = og.check_dispatch(budget, {"tokens": x}, want.numpy(), rng=rng)
    assert torch.equal(kept_tokens, want_tokens)


@pytest.mark.parametrize("budget", [0, N + 1])
def test_bad_budget_raises(budget: int) -> None:
    with pytest.raises(ValueError):
        dp.divprune(np.ones((N, D)), budget)
    with pytest.raises(ValueError):
        dp.divprune_op({"tokens": torch.ones(2, N, D)}, budget, CFG)


# ----------------------------------------------------------------------------------------- forms, properties


def original_divprune(x: np.ndarray, budget: int) -> list[int]:
    """The published DivPrune loop, transliterated (torch -> NumPy): step 1 scores each column by its
    second-smallest distance (the smallest being the token itself), later steps by the column minima over
    the kept rows; plain argmax (no tie rule, kept tokens not masked: their own distance 0 does it)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    m = 1.0 - unit @ unit.T
    picks: list[int] = []
    for i in range(budget):
        scores = np.sort(m, axis=0)[1, :] if i == 0 else m[picks].min(axis=0)
        picks.append(int(np.argmax(scores)))
    return sorted(picks)


def brute_force(x: np.ndarray, budget: int) -> list[int]:
    """max-min by explicit sets and per-pair cosines, with the contract's tie rule."""
    x = np.asarray(x, np.float64)

    def d(i, j):
        ni, nj = np.linalg.norm(x[i]), np.linalg.norm(x[j])
        return 1.0 - (x[i] @ x[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0)

    def first_best(score: dict[int, float]) -> int:
        best = max(score.values())
        return min(i for i, s in score.items() if s >= best - dp.DIST_ATOL)

    kept = [first_best({i: min((d(i, j) for j in range(len(x)) if j != i), default=np.inf) for i in range(len(x))})]
    while len(kept) < budget:
        kept.append(first_best({i: min(d(i, s) for s in kept) for i in range(len(x)) if i not in kept}))
    return sorted(kept)


@pytest.mark.parametrize("kind", ["gaussian", "correlated", "clusters"])
def test_original_algorithm_matches_reference_without_tolerance(kind: str, monkeypatch) -> None:
    """With DIST_ATOL = 0 the reference is the published loop exactly (no exact ties in these inputs); with
    the tolerance, picks differ only where candidates are within DIST_ATOL: never for these Gaussian inputs;
    for correlated tokens (distances all within ~0.02) and clusters (within-cluster distances ~1e-6) they do."""
    cases = make_cases(kind, 3, stream=5)
    with_tolerance = [[dp.divprune(x, budget).tolist() for budget in (1, 8, 30)] for x in cases]
    monkeypatch.setattr(dp, "DIST_ATOL", 0.0)
    for x, tolerant in zip(cases, with_tolerance):
        for budget, kept in zip((1, 8, 30), tolerant):
            assert original_divprune(x.astype(np.float64), budget) == dp.divprune(x, budget).tolist()
            if kind == "gaussian":
                assert kept == dp.divprune(x, budget).tolist()


@pytest.mark.parametrize("kind", ["zero_rows", "duplicates", "one_hot", "zeros_and_duplicates", "scaled_duplicates"])
def test_brute_force_matches_reference(kind: str) -> None:
    x = make_cases(kind, 1, stream=6)[0][:20]
    for budget in (1, 5, 19):
        assert brute_force(x, budget) == dp.divprune(x, budget).tolist()


def _random_tokens(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 16), d=st.integers(2, 8), budget=st.integers(1, 15))
def test_permutation_equivariance_and_scale_invariance(seed: int, n: int, d: int, budget: int) -> None:
    """Permuting tokens permutes the kept set; positive per-token scales change nothing (cosine)."""
    budget = min(budget, n)
    x = _random_tokens(seed, n, d)
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(n)
    kept = dp.divprune(x, budget).tolist()
    assert sorted(perm[dp.divprune(x[perm], budget)].tolist()) == kept
    assert dp.divprune(x * 10 ** rng.uniform(-30, 30, (n, 1)), budget).tolist() == kept


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 16), d=st.integers(1, 8))
def test_budget_one_is_the_most_isolated_token(seed: int, n: int, d: int) -> None:
    x = _random_tokens(seed, n, d)
    dist = dp.cosine_distances(x)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(axis=1)
    assert dp.divprune(x, 1).tolist() == [int(np.flatnonzero(nearest >= nearest.max() - dp.DIST_ATOL)[0])]
    assert len(dp.divprune(x, n - 1)) == n - 1


def test_zero_token_is_at_distance_one() -> None:
    x = np.zeros((4, 3))
    x[1], x[2], x[3] = [1, 0, 0], [-2, 0, 0], [0, 0, 5]
    dist = dp.cosine_distances(x)
    np.testing.assert_allclose(dist[0], [1, 1, 1, 1])  # zero vs anything, itself included: cos 0
    np.testing.assert_allclose(dist[1], [1, 0, 2, 1])


def test_reference_loads_without_torch() -> None:
    og.check_reference_without_torch("divprune", "divprune_reference", "DivPruneConfig", "{'tokens': x, 'cls_attention': x[:, 0]}")
