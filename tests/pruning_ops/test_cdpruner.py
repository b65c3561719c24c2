"""CDPruner: the exported ONNX graph, and agreement of ONNX Runtime, torch eager and the NumPy reference
(prunert.pruning_ops.cdpruner.cdpruner, Chen et al.'s fast greedy MAP in float64) on kept index SETS,
degenerate inputs included.

Layout:
  1. export      four graphs (module-scoped, exported once): K=8 and K=N-1, each in the Gram and the rows form.
                 One Loop without scan outputs, no NonZero, TopK sorted only, small node count, batch and M
                 symbolic, graph size independent of K.
  2. ORT         20 input kinds (duplicates, zeros, low rank, collinear, exact ties, extreme scales, no / partial
                 / orthogonal text...) x (8 + 3) = 220 inputs vs the reference in each form; batch rows independent.
  3. torch eager cdpruner_select vs the reference on every kind, also with relevance="mean", tau=1e-3.
  4. forms       the reference equals ResPrune(normalize=True, alpha=2) and a naive log-det greedy DPP MAP;
                 its first pick is the most relevant token; scale invariance; closed-form degenerate cases.
  5. config      validation.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunert.config import CDPrunerConfig, ResPruneConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert.pruning_ops import cdpruner as cd  # noqa: E402
from prunert.pruning_ops import reference  # noqa: E402

import op_graph as og  # noqa: E402
from op_graph import TextCase as Case  # noqa: E402

N, D = 48, 32  # tokens per image, width
INPUTS = ("tokens", "text", "text_mask")
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None)

# name -> (budget, config): the Gram form (the default rule, config.GRAM_MAX_N, at N = 48) and the rows form
# (gram_max_n = 0: each step's kernel row L[:, j] = r * (U u_j) * r_j from the unit tokens, no N x N matrix)
GRAPHS: dict[str, tuple[int, CDPrunerConfig]] = {
    "k8": (8, CDPrunerConfig()),
    "k47": (N - 1, CDPrunerConfig()),
    "k8_rows": (8, CDPrunerConfig(gram_max_n=0)),
    "k47_rows": (N - 1, CDPrunerConfig(gram_max_n=0)),
}
CASES_PER_KIND = {"k8": 8, "k47": 3, "k8_rows": 8, "k47_rows": 3}  # random inputs per (graph, kind) through ORT
# torch eager also runs a non-default config (its relevance path is ResPrune's, tested in ORT there)
EAGER: dict[str, tuple[int, CDPrunerConfig]] = {**GRAPHS, "mean_tau": (8, CDPrunerConfig(relevance="mean", tau=1e-3, epsilon=0.05)),
                                               "mean_tau_rows": (8, CDPrunerConfig(relevance="mean", tau=1e-3, epsilon=0.05, gram_max_n=0))}


# ----------------------------------------------------------------------------------------- inputs


def kind_token_scales(rng, k):  # one scale per token, 1e-20 .. 1e20: the cosine kernel ignores them
    return rng.standard_normal((N, D)) * 10 ** rng.uniform(-20, 20, (N, 1)), *og.random_text(rng, D)


def kind_rank_one(rng, k):  # +-2^j * v: exactly collinear in fp32 (equal relevance within each sign group)
    # Generic a_i * v would be collinear only up to fp32 rounding of the products; with "max" relevance the two
    # sign groups' cosines can lie ~1e-3 apart, and min-max normalising that span amplifies 1e-7 rounding to
    # ~1e-4 relative differences in r: the first pick is then a near-tie no backend rule can settle.
    a = rng.choice([-1.0, 1.0], (N, 1)) * 2.0 ** rng.integers(-3, 4, (N, 1))
    return a @ rng.standard_normal((1, D)).astype(np.float32).astype(np.float64), *og.random_text(rng, D)


def kind_permuted_ties(rng, k):  # permutations of one small-integer row, no text: r = 1, equal gains
    base = rng.integers(-2, 3, D).astype(float)
    text, mask = og.random_text(rng, D)
    return np.stack([rng.permutation(base) for _ in range(N)]), text, np.zeros_like(mask)


def kind_sign_ties(rng, k):  # +-1 tokens, one-hot text: exact ties in relevance and gain
    text, mask = og.random_text(rng, D)
    return rng.choice([-1.0, 1.0], (N, D)), np.eye(D)[rng.integers(0, D, len(mask))], mask


def kind_tiny_tokens(rng, k):  # a few tokens 1e-30 .. 1e-6 times the others: still unit directions
    x = rng.standard_normal((N, D))
    x[rng.integers(0, N, 5)] *= 10 ** rng.uniform(-30, -6, (5, 1))
    return x, *og.random_text(rng, D)


KINDS = {**og.text_kinds(N, D), **og.kinds_in(globals())}  # the shared kinds, and those above
assert len(KINDS) == 20


def make_cases(kind: str, count: int, budget: int, stream: int) -> list[Case]:
    return og.make_text_cases(KINDS, kind, count, budget, stream)


stack = og.stack_text


def ref(case: Case, budget: int, cfg: CDPrunerConfig) -> np.ndarray:
    return cd.cdpruner(case.tokens, case.text, case.mask, budget, cfg)


def run_eager(cases: list[Case], budget: int, cfg: CDPrunerConfig) -> np.ndarray:
    tokens, text, mask = (torch.from_numpy(a) for a in stack(cases))
    return cd.cdpruner_select(tokens, text, mask, budget, cfg).numpy()


def assert_same_sets(got: np.ndarray, cases: list[Case], budget: int, cfg: CDPrunerConfig, label: str) -> None:
    og.assert_same_sets(got, [ref(case, budget, cfg) for case in cases], label)


# ----------------------------------------------------------------------------------------- export


def export_graph(path, budget: int, cfg: CDPrunerConfig, n: int = N, d: int = D) -> og.Exported:
    return og.export_selection(path, cd.cdpruner_op, budget, cfg, INPUTS, n=n, d=d)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, og.Exported]:
    return og.export_each(tmp_path_factory.mktemp("cdpruner_onnx"), cd.cdpruner_op, GRAPHS, INPUTS, n=N, d=D)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs: dict[str, og.Exported], name: str) -> None:
    g = graphs[name]
    ops = og.check_graph(g, {"tokens": ["batch", N, D], "text": ["batch", "m", D], "text_mask": ["batch", "m"]})
    assert ops["Loop"] == 1, "the K greedy steps must be one ONNX Loop"
    top, every = len(g.model.graph.node), og.node_count(g.model)
    assert top < 90, f"{top} top-level nodes"  # 82 at the time of writing (59 before the non-finite and text range guards)
    assert every < 130, f"{every} nodes including the Loop body"  # 121 (97 before)


@pytest.mark.parametrize("suffix", ["", "_rows"])
def test_graph_size_does_not_depend_on_budget(graphs: dict[str, og.Exported], suffix: str) -> None:
    assert og.op_counts(graphs["k8" + suffix].model) == og.op_counts(graphs["k47" + suffix].model)


# ----------------------------------------------------------------------------------------- ORT vs reference


@pytest.mark.parametrize("suffix", ["", "_rows"])
def test_random_case_count(suffix: str) -> None:
    total = sum(count for name, count in CASES_PER_KIND.items() if name.endswith("_rows") == bool(suffix)) * len(KINDS)
    assert total >= 200, total  # 20 kinds x (8 + 3) = 220 inputs through ORT, in each form


@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs: dict[str, og.Exported], name: str) -> None:
    g = graphs[name]
    for kind in sorted(KINDS):
        cases = make_cases(kind, CASES_PER_KIND[name], g.budget, stream=1)
        tokens, text, mask = stack(cases)
        indices, kept = g.run(tokens, text, mask)
        og.assert_valid(indices, kept, tokens, g.budget)
        assert_same_sets(indices, cases, g.budget, g.cfg, f"ORT {name}/{kind}")


@pytest.mark.parametrize("name", ["k8", "k8_rows"])
def test_ort_batch_rows_are_independent(graphs: dict[str, og.Exported], name: str) -> None:
    """One row per kind in a batch of 20 (text padded to the longest): each row alone gives the same set."""
    g = graphs[name]
    cases = [make_cases(kind, 1, g.budget, stream=2)[0] for kind in sorted(KINDS)]
    batched, _ = g.run(*stack(cases))
    for b, case in enumerate(cases):
        alone, kept = g.run(case.tokens[None], case.text[None], case.mask[None])  # batch 1, unpadded M
        og.assert_valid(alone, kept, case.tokens[None], g.budget)
        np.testing.assert_array_equal(alone[0], batched[b])


@pytest.mark.parametrize("m", [1, 9])
def test_ort_dynamic_text_length(graphs: dict[str, og.Exported], m: int) -> None:
    rng = np.random.default_rng(m)
    cases = [
        Case(rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((m, D)).astype(np.float32), np.ones(m, np.int64))
        for _ in range(3)
    ]
    tokens, text, mask = stack(cases)
    indices, kept = graphs["k8"].run(tokens, text, mask)
    og.assert_valid(indices, kept, tokens, 8)
    assert_same_sets(indices, cases, 8, CDPrunerConfig(), f"ORT M={m}")


@pytest.mark.parametrize("name", ["k8", "k8_rows"])
def test_ort_token_scale_invariance(graphs: dict[str, og.Exported], name: str) -> None:
    """A cosine kernel: positive per-token scales (1e-20 .. 1e20) change nothing, in ORT too."""
    base = make_cases("gaussian", 3, 8, stream=8)
    rng = np.random.default_rng(8)
    scaled = [Case((c.tokens * 10 ** rng.uniform(-20, 20, (N, 1))).astype(np.float32), c.text, c.mask) for c in base]
    a, _ = graphs[name].run(*stack(base))
    b, _ = graphs[name].run(*stack(scaled))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------- torch eager


@pytest.mark.parametrize("name", list(EAGER))
def test_torch_eager_matches_reference(name: str) -> None:
    """Two inputs of every kind in one batch of 40."""
    budget, cfg = EAGER[name]
    cases = [c for kind in sorted(KINDS) for c in make_cases(kind, 2, budget, stream=3)]
    tokens, _, _ = stack(cases)
    indices = run_eager(cases, budget, cfg)
    og.assert_valid(indices, None, tokens, budget)
    assert_same_sets(indices, cases, budget, cfg, f"torch {name}")


def test_op_returns_gathered_tokens() -> None:
    cases = make_cases("gaussian", 2, 8, stream=9)
    tokens, text, mask = (torch.from_numpy(a) for a in stack(cases))
    kept, indices = cd.cdpruner_op({"tokens": tokens, "text": text, "text_mask": mask}, 8, CDPrunerConfig())
    og.assert_valid(indices.numpy(), kept.numpy(), tokens.numpy(), 8)


# ----------------------------------------------------------------------------------------- equivalent forms


def _resprune_cfg(cfg: CDPrunerConfig) -> ResPruneConfig:
    return ResPruneConfig(normalize=True, alpha=2.0, relevance=cfg.relevance, epsilon=cfg.epsilon, tau=cfg.tau)


@pytest.mark.parametrize("cfg", [CDPrunerConfig(), CDPrunerConfig(relevance="mean", epsilon=0.1)], ids=["max", "mean"])
@pytest.mark.parametrize("kind", ["gaussian", "token_scales", "no_text", "text_is_token", "huge_token"])
def test_equals_resprune_normalized_alpha2(kind: str, cfg: CDPrunerConfig) -> None:
    """ResPrune with normalize=True, alpha=2 scores r_i^2 * (residual energy of the unit token), which is the
    DPP marginal gain d_i^2: same picks on well-conditioned inputs (Gram + weight vs weighted kernel)."""
    for budget in (1, 8, 24):
        for case in make_cases(kind, 3, budget, stream=5):
            want = reference.resprune(case.tokens, case.text, case.mask, budget, _resprune_cfg(cfg))
            assert ref(case, budget, cfg).tolist() == want.tolist()


def test_equals_resprune_on_degenerate_inputs_too() -> None:
    """The tau rule (gain < tau * L_ii <=> unit residual energy < tau) and the tie rule are the same, so the
    equality holds on rank-deficient inputs as well, where later picks go by index."""
    cfg = CDPrunerConfig()
    for kind in ("duplicates", "scaled_duplicates", "low_rank", "rank_one", "zero_rows", "all_equal", "permuted_ties"):
        for budget in (8, N - 1):
            for case in make_cases(kind, 2, budget, stream=6):
                want = reference.resprune(case.tokens, case.text, case.mask, budget, _resprune_cfg(cfg))
                assert ref(case, budget, cfg).tolist() == want.tolist(), kind


def greedy_dpp_map(kernel: np.ndarray, budget: int) -> np.ndarray:
    """Naive greedy MAP: add the item with the largest det(L_{S+i}) / det(L_S), ties within TIE_RTOL -> lower index."""
    chosen: list[int] = []
    logdet = 0.0
    for _ in range(budget):
        gain = np.full(len(kernel), -np.inf)
        for i in range(len(kernel)):
            if i not in chosen:
                sign, value = np.linalg.slogdet(kernel[np.ix_(chosen + [i], chosen + [i])])
                gain[i] = np.exp(value - logdet) if sign > 0 else 0.0
        chosen.append(reference.pick_first_best(gain))
        logdet = np.linalg.slogdet(kernel[np.ix_(chosen, chosen)])[1]
    return np.array(sorted(chosen))


@pytest.mark.parametrize("relevance", ["max", "mean"])
def test_fast_greedy_equals_naive_log_det_greedy(relevance: str) -> None:
    cfg = CDPrunerConfig(relevance=relevance)
    n = 20  # < D: the cosine Gram is full rank, every log det finite
    for seed in range(3):
        rng = np.random.default_rng([10, seed])
        x = (rng.standard_normal((n, D)) * rng.uniform(0.2, 5.0, (n, 1))).astype(np.float32)
        text, mask = rng.standard_normal((3, D)).astype(np.float32), np.ones(3, np.int64)
        kernel = cd.dpp_kernel(x, text, mask, cfg)
        for budget in (1, 6, 12):
            assert greedy_dpp_map(kernel, budget).tolist() == cd.cdpruner(x, text, mask, budget, cfg).tolist()


def test_kernel_is_relevance_weighted_cosine_gram() -> None:
    rng = np.random.default_rng(11)
    x, text, mask = rng.standard_normal((N, D)), rng.standard_normal((3, D)), np.ones(3, np.int64)
    x[5] = 0.0
    cfg = CDPrunerConfig(epsilon=0.01)
    kernel = cd.dpp_kernel(x, text, mask, cfg)
    unit = x / np.where(np.linalg.norm(x, axis=1, keepdims=True) > 0, np.linalg.norm(x, axis=1, keepdims=True), 1.0)
    t_unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    r = (unit @ t_unit.T).max(axis=1)
    r = 0.01 + 0.99 * (r - r.min()) / (r.max() - r.min())
    want = r[:, None] * (unit @ unit.T) * r[None, :]
    np.fill_diagonal(want, r**2)
    want[5, 5] = 0.0
    np.testing.assert_allclose(kernel, want, rtol=1e-12, atol=1e-15)
    assert np.isclose(r.min(), 0.01) and np.isclose(r.max(), 1.0)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 16), d=st.integers(2, 8))
def test_budget_one_picks_the_most_relevant_token(seed: int, n: int, d: int) -> None:
    """L_ii = r_i^2 for nonzero tokens: the first pick is argmax r (ties within TIE_RTOL -> lower index)."""
    rng = np.random.default_rng(seed)
    x, text = rng.standard_normal((n, d)), rng.standard_normal((2, d))
    cfg = CDPrunerConfig()
    r = reference.text_relevance(x, text, np.ones(2), ResPruneConfig(alpha=1.0))
    assert cd.cdpruner(x, text, np.ones(2), 1, cfg).tolist() == [reference.pick_first_best(r * r)]


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 16), d=st.integers(2, 8), budget=st.integers(1, 15))
def test_permutation_equivariance(seed: int, n: int, d: int, budget: int) -> None:
    """Permuting the tokens permutes the kept set (random inputs, K <= rank, so no index-order picks)."""
    budget = min(budget, n, d)
    rng = np.random.default_rng(seed)
    x, text, mask = rng.standard_normal((n, d)), rng.standard_normal((3, d)), np.ones(3, np.int64)
    perm = rng.permutation(n)
    cfg = CDPrunerConfig()
    kept = cd.cdpruner(x, text, mask, budget, cfg)
    assert sorted(perm[cd.cdpruner(x[perm], text, mask, budget, cfg)].tolist()) == kept.tolist()


def _closed_form() -> list[tuple[str, Case, list[int]]]:
    """Degenerate inputs whose kept set at K=8 is known in closed form."""
    rng = np.random.default_rng(12)
    text, mask = rng.standard_normal((3, D)).astype(np.float32), np.ones(3, np.int64)
    no_text = np.zeros(3, np.int64)
    direction = rng.standard_normal(D)
    signs = rng.choice([-1.0, 1.0], N) * rng.uniform(0.5, 2.0, N)
    orthogonal = np.zeros((N, D))
    orthogonal[np.arange(N), np.arange(N) % D] = 1.0  # tokens i and i + 32 are duplicates
    return [
        ("all zero", Case(np.zeros((N, D), np.float32), text, mask), list(range(8))),
        ("all equal", Case(np.tile(direction, (N, 1)).astype(np.float32), text, mask), list(range(8))),
        # collinear, no text: all gains 1 -> token 0, then every other token is spanned -> lowest indices
        ("rank 1", Case((signs[:, None] * direction).astype(np.float32), text, no_text), list(range(8))),
        # one-hot tokens, no text: equal gains, orthogonal -> the lowest indices
        ("orthogonal", Case(orthogonal.astype(np.float32), text, no_text), list(range(8))),
    ]


@pytest.mark.parametrize("label", [e[0] for e in _closed_form()])
def test_closed_form_degenerate_cases(graphs: dict[str, og.Exported], label: str) -> None:
    _, case, want = next(e for e in _closed_form() if e[0] == label)
    cfg = CDPrunerConfig()
    assert ref(case, 8, cfg).tolist() == want
    tokens, text, mask = stack([case, case])
    for suffix in ("", "_rows"):  # the Gram form and the rows form
        assert graphs["k8" + suffix].run(tokens, text, mask)[0].tolist() == [want, want], suffix
        assert run_eager([case, case], 8, graphs["k8" + suffix].cfg).tolist() == [want, want], suffix


def test_duplicates_are_never_both_kept_while_rank_remains() -> None:
    """Token 7 duplicated into 20..27 (and 3 zero rows): with K <= distinct directions, no copy is kept twice."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((N, D))
    x[20:28] = x[7]
    x[[1, 2, 3]] = 0.0
    text, mask = rng.standard_normal((2, D)), np.ones(2, np.int64)
    kept = set(cd.cdpruner(x, text, mask, 16, CDPrunerConfig()).tolist())
    assert len(kept & {7, *range(20, 28)}) <= 1
    assert not kept & {1, 2, 3}


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"relevance": "median"}, "relevance"),
        ({"tau": 1.0}, "tau"),
        ({"tau": -1e-4}, "tau"),
    ],
)
def test_bad_config_raises(kwargs: dict, needle: str) -> None:
    case = make_cases("gaussian", 1, 8, stream=14)[0]
    with pytest.raises(ConfigError, match=needle):
        ref(case, 8, CDPrunerConfig(**kwargs))
    with pytest.raises(ConfigError, match=needle):
        run_eager([case, case], 8, CDPrunerConfig(**kwargs))


@pytest.mark.parametrize("budget", [0, -1, N + 1])
def test_bad_budget_raises(budget: int) -> None:
    case = make_cases("gaussian", 1, 8, stream=15)[0]
    with pytest.raises(ConfigError, match="budget"):
        ref(case, budget, CDPrunerConfig())


def test_reference_entry() -> None:
    case = make_cases("gaussian", 1, 8, stream=16)[0]
    idx, tokens = cd.cdpruner_reference({"tokens": case.tokens, "text": case.text, "text_mask": case.mask}, 8, CDPrunerConfig())
    assert idx.tolist() == ref(case, 8, CDPrunerConfig()).tolist()
    np.testing.assert_array_equal(tokens, case.tokens[idx])


# ----------------------------------------------------------------------------------------- realistic size

REAL_N, REAL_D, REAL_K = 576, 1024, 64


@pytest.mark.slow
def test_ort_matches_reference_at_realistic_size(tmp_path) -> None:
    """N=576, d=1024, K=64: near-orthogonal unit tokens put hundreds of gains within ~1e-3 of each other."""
    g = export_graph(tmp_path / "real.onnx", REAL_K, CDPrunerConfig(), n=REAL_N, d=REAL_D)
    cases = []
    for seed in range(4):
        rng = np.random.default_rng([17, seed])
        x = rng.standard_normal((REAL_N, REAL_D)) * 0.05
        if seed % 2:
            x[rng.integers(0, REAL_N, 150)] = x[3]  # letterbox padding: many identical tokens
        text_rows = rng.standard_normal((6, REAL_D)) * 0.02
        cases.append(Case(x.astype(np.float32), text_rows.astype(np.float32), np.full(6, int(seed < 2), np.int64)))
    tokens, text, mask = stack(cases)
    indices, kept = g.run(tokens, text, mask)
    og.assert_valid(indices, kept, tokens, REAL_K)
    for b, case in enumerate(cases):
        want = cd.cdpruner(case.tokens, case.text, case.mask, REAL_K, CDPrunerConfig())
        assert indices[b].tolist() == want.tolist(), f"case {b}"


def test_reference_imports_without_torch() -> None:
    inputs = "{'tokens': x, 'text': x[:2], 'text_mask': np.ones(2)}"
    og.check_reference_without_torch("cdpruner", "cdpruner_reference", "CDPrunerConfig", inputs)
