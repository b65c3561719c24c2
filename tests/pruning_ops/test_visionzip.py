"""VisionZip: the exported ONNX graph, and agreement of ONNX Runtime, torch eager and the NumPy reference
(prunert.pruning_ops.visionzip.visionzip) on kept index SETS and on the kept (merged) tokens.

Layout:
  1. export      four graphs (module-scoped, exported once): default split at K=8 (7+1); K=12 half contextual
                 with keys averaged over 4 heads (6+6); K_c = 0 (pure dominant); K = N-1. No Loop, no NonZero,
                 TopK sorted only, small node count, batch symbolic, graph size independent of K.
  2. ORT         14 input kinds (attention ties, equal / zero / duplicated / extreme-scale keys, near-tied
                 cosines, zero tokens...) x 4 graphs, >= 200 inputs; indices equal, tokens within 1e-4
                 relative; batch rows independent.
  3. torch eager visionzip_op vs the reference on every kind and graph config, plus K_c = K.
  4. definition  budget split, dominant = top-K_d with ties to the lower index, uniformly spaced targets,
                 target + mean of assigned (target not in the mean, empty -> target), K = N-1, hypothesis.
  5. config      validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunert.config import VisionZipConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert import pruning_ops  # noqa: E402
from prunert.pruning_ops import visionzip as vz  # noqa: E402

import op_graph as og  # noqa: E402

N, D, DV = 48, 24, 16  # tokens per image, token width, key width
INPUTS = ("tokens", "cls_attention", "patch_keys")
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# name -> (budget, config)
GRAPHS: dict[str, tuple[int, VisionZipConfig]] = {
    "k8": (8, VisionZipConfig()),  # 7 dominant + 1 contextual
    "k12_half_h4": (12, VisionZipConfig(contextual_fraction=0.5, key_heads=4)),  # 6 + 6, keys averaged over 4 heads
    "dominant_only": (8, VisionZipConfig(contextual_fraction=0.0)),  # K_c = 0
    "k47": (N - 1, VisionZipConfig()),  # 40 + 7: one token left to merge
}
CASES_PER_KIND = {"k8": 6, "k12_half_h4": 6, "dominant_only": 2, "k47": 2}  # random inputs per (graph, kind)


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class Case:
    tokens: np.ndarray  # [N, D] float32
    attention: np.ndarray  # [N] float32
    keys: np.ndarray  # [N, DV] float32


def _base(rng):
    return rng.standard_normal((N, D)), og.softmax(2 * rng.standard_normal(N)), rng.standard_normal((N, DV))


def kind_gaussian(rng):
    return _base(rng)


def kind_attention_int_ties(rng):  # attention from {0, 1, 2, 3}: many exact ties at the K_d boundary
    x, _, k = _base(rng)
    return x, rng.integers(0, 4, N).astype(float), k


def kind_attention_all_equal(rng):  # dominant = the lowest K_d indices
    x, _, k = _base(rng)
    return x, np.full(N, 1.0 / N), k


def kind_attention_zeros(rng):  # mostly exact zeros (and -0.0): ties between +0 and -0 too
    x, a, k = _base(rng)
    a[rng.random(N) < 0.7] = 0.0
    a[rng.random(N) < 0.2] = -0.0
    return x, a, k


def kind_keys_all_equal(rng):  # every cosine is 1: every source goes to target slot 0
    x, a, _ = _base(rng)
    return x, a, np.tile(rng.standard_normal(DV), (N, 1))


def kind_keys_zero_rows(rng):  # zero keys: cosine 0 to every target
    x, a, k = _base(rng)
    k[rng.integers(0, N, 15)] = 0.0
    return x, a, k


def kind_keys_duplicated(rng):  # keys copied (times powers of two): exact cosine ties between targets
    x, a, k = _base(rng)
    src, dst = rng.integers(0, N, 25), rng.integers(0, N, 25)
    k[dst] = k[src] * rng.choice([1.0, 2.0, 0.5, 4.0], 25)[:, None]
    return x, a, k


def kind_keys_sign(rng):  # +-1 keys: cosines are multiples of 1/DV, many exact ties
    x, a, _ = _base(rng)
    return x, a, rng.choice([-1.0, 1.0], (N, DV))


def kind_keys_near_ties(rng):  # a few key prototypes plus 1e-7 noise: cosines tied within the tolerance
    x, a, _ = _base(rng)
    protos = rng.standard_normal((3, DV))
    k = protos[rng.integers(0, 3, N)] + 1e-7 * rng.standard_normal((N, DV))
    return x, a, k


def kind_keys_extreme_scales(rng):  # per-row key scales 1e-30 .. 1e30: fp32 norms would over/underflow
    x, a, k = _base(rng)
    return x, a, k * 10 ** rng.uniform(-30, 30, (N, 1))


def kind_keys_low_rank(rng):  # rank-2 keys
    x, a, _ = _base(rng)
    return x, a, rng.standard_normal((N, 2)) @ rng.standard_normal((2, DV))


def kind_tokens_zero(rng):
    _, a, k = _base(rng)
    return np.zeros((N, D)), a, k


def kind_tokens_scaled(rng):  # one scale per image, 1e-3 .. 1e4 (token tolerance is relative)
    x, a, k = _base(rng)
    return x * 10 ** rng.uniform(-3, 4), a, k


def kind_all_degenerate(rng):  # everything equal: attention, keys, tokens
    return np.tile(rng.standard_normal(D), (N, 1)), np.full(N, 0.5), np.ones((N, DV))


KINDS = og.kinds_in(globals())
assert len(KINDS) == 14


def make_cases(kind: str, count: int, stream: int) -> list[Case]:
    cases = []
    for rng in og.case_rngs(KINDS, kind, count, stream):
        x, a, k = KINDS[kind](rng)
        cases.append(Case(x.astype(np.float32), np.asarray(a, np.float32), k.astype(np.float32)))
    return cases


def stack(cases: list[Case]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.stack([c.tokens for c in cases]), np.stack([c.attention for c in cases]), np.stack([c.keys for c in cases])


def ref(case: Case, budget: int, cfg: VisionZipConfig) -> tuple[np.ndarray, np.ndarray]:
    return vz.visionzip(case.tokens, case.attention, case.keys, budget, cfg)


def run_eager(cases: list[Case], budget: int, cfg: VisionZipConfig) -> tuple[np.ndarray, np.ndarray]:
    tokens, attention, keys = (torch.from_numpy(a) for a in stack(cases))
    kept, indices = vz.visionzip_op({"tokens": tokens, "cls_attention": attention, "patch_keys": keys}, budget, cfg)
    return indices.numpy(), kept.numpy()


def assert_valid(indices: np.ndarray, kept: np.ndarray, budget: int, batch: int) -> None:
    """Every row: K distinct indices, strictly ascending, in [0, N); tokens [B, K, D] float32."""
    og.assert_valid_indices(indices, batch, budget, N)
    assert kept.shape == (batch, budget, D) and kept.dtype == np.float32


def assert_matches_reference(indices, kept, cases, budget, cfg, label: str) -> None:
    wants = [ref(case, budget, cfg) for case in cases]
    og.assert_same_sets(indices, [want_idx for want_idx, _ in wants], label)
    for b, (case, (want_idx, want_tok)) in enumerate(zip(cases, wants)):
        scale = max(1.0, float(np.abs(want_tok).max()))
        err = float(np.abs(kept[b].astype(np.float64) - want_tok).max())
        assert err <= 1e-4 * scale, f"{label} row {b}: tokens differ by {err:.3g} (scale {scale:.3g})"
        n_dominant, _ = vz.split_budget(budget, cfg)
        dominant = set(np.lexsort((np.arange(N), -case.attention.astype(np.float64)))[:n_dominant].tolist())
        for slot, i in enumerate(indices[b]):
            if i in dominant:  # dominant tokens are passed through bit for bit
                np.testing.assert_array_equal(kept[b, slot], case.tokens[i])


# ----------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, og.Exported]:
    return og.export_each(tmp_path_factory.mktemp("visionzip_onnx"), vz.visionzip_op, GRAPHS, INPUTS, n=N, d=D, dv=DV)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs: dict[str, og.Exported], name: str) -> None:
    g = graphs[name]
    inputs = {"tokens": ["batch", N, D], "cls_attention": ["batch", N], "patch_keys": ["batch", N, DV]}
    ops = og.check_graph(g, inputs, absent=("NonZero", "Loop", "Scan"))  # VisionZip needs no loop
    assert og.node_count(g.model) < 80, og.node_count(g.model)  # 60 with contextual tokens, fewer without
    assert ops["TopK"] == 1
    for node in og.all_nodes(g.model.graph):  # CumSum's axis must be an initializer (TensorRT)
        if node.op_type == "CumSum":
            assert node.input[1] in {i.name for i in g.model.graph.initializer}


def test_graph_size_does_not_depend_on_budget(graphs: dict[str, og.Exported]) -> None:
    assert og.op_counts(graphs["k8"].model) == og.op_counts(graphs["k47"].model)


# ----------------------------------------------------------------------------------------- ORT vs reference


def test_random_case_count() -> None:
    total = sum(CASES_PER_KIND.values()) * len(KINDS)
    assert total >= 200, total  # 14 kinds x 16 = 224 inputs through ORT


@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs: dict[str, og.Exported], name: str) -> None:
    g = graphs[name]
    for kind in sorted(KINDS):
        cases = make_cases(kind, CASES_PER_KIND[name], stream=1)
        indices, kept = g.run(*stack(cases))
        assert_valid(indices, kept, g.budget, len(cases))
        assert_matches_reference(indices, kept, cases, g.budget, g.cfg, f"ORT {name}/{kind}")


@pytest.mark.parametrize("name", ["k8", "k12_half_h4"])
def test_ort_batch_rows_are_independent(graphs: dict[str, og.Exported], name: str) -> None:
    g = graphs[name]
    cases = [make_cases(kind, 1, stream=2)[0] for kind in sorted(KINDS)]
    batched, kept_batched = g.run(*stack(cases))
    for b, case in enumerate(cases):
        alone, kept = g.run(*stack([case]))  # batch 1 on a graph exported with batch 2
        np.testing.assert_array_equal(alone[0], batched[b])
        np.testing.assert_array_equal(kept[0], kept_batched[b])


# ----------------------------------------------------------------------------------------- torch eager


@pytest.mark.parametrize(
    "budget, cfg",
    [
        *GRAPHS.values(),
        (8, VisionZipConfig(contextual_fraction=1.0)),
        (1, VisionZipConfig()),
        (N, VisionZipConfig(contextual_fraction=0.5)),
    ],
    ids=[*GRAPHS, "all_contextual", "k1", "k_equals_n"],
)
def test_torch_eager_matches_reference(budget: int, cfg: VisionZipConfig) -> None:
    cases = [c for kind in sorted(KINDS) for c in make_cases(kind, 2, stream=3)]
    indices, kept = run_eager(cases, budget, cfg)
    assert_valid(indices, kept, budget, len(cases))
    assert_matches_reference(indices, kept, cases, budget, cfg, "torch")


# ----------------------------------------------------------------------------------------- definition


@pytest.mark.parametrize(
    "budget, split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (1, (1, 0)), (3, (3, 0)), (4, (3, 1)), (16, (13, 3))]
)
def test_budget_split(budget: int, split: tuple[int, int]) -> None:
    assert vz.split_budget(budget, VisionZipConfig()) == split


def test_split_extremes() -> None:
    assert vz.split_budget(8, VisionZipConfig(contextual_fraction=0.0)) == (8, 0)
    assert vz.split_budget(8, VisionZipConfig(contextual_fraction=1.0)) == (0, 8)


def test_dominant_only_is_top_k_with_ties_to_lower_index(graphs: dict[str, og.Exported]) -> None:
    cases = make_cases("attention_int_ties", 3, stream=20) + make_cases("attention_all_equal", 1, stream=20)
    indices, _ = graphs["dominant_only"].run(*stack(cases))
    for b, case in enumerate(cases):
        order = sorted(range(N), key=lambda i: (-float(case.attention[i]), i))
        assert indices[b].tolist() == sorted(order[:8])
    assert indices[-1].tolist() == list(range(8))  # all equal -> lowest indices


def test_all_equal_attention_layout(graphs: dict[str, og.Exported]) -> None:
    """All-equal attention: dominant 0..K_d-1; remaining K_d..N-1, targets every step-th of them."""
    g = graphs["k12_half_h4"]  # 6 + 6: remaining 42, step 7 -> targets 6, 13, 20, 27, 34, 41
    case = make_cases("attention_all_equal", 1, stream=21)[0]
    indices, _ = g.run(*stack([case]))
    assert indices[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 13, 20, 27, 34, 41]


def _hand_case() -> Case:
    """N = 48; attention picks token 0 as the only dominant token at K = 3 with fraction 2/3 (1 + 2).
    Remaining 1..47 (47 tokens), step 23 -> targets 1 and 24. Keys: tokens 2..23 point like 1, 25..47
    like 24, except 30 and 31, which point like 1."""
    tokens = np.arange(N * D, dtype=np.float64).reshape(N, D) % 7 - 3.0
    attention = np.zeros(N)
    attention[0] = 1.0
    keys = np.zeros((N, DV))
    keys[1:24, 0] = 1.0
    keys[24:, 1] = 1.0
    keys[[30, 31], :] = 0.0
    keys[[30, 31], 0] = 2.0  # scale does not matter: cosine
    return Case(tokens.astype(np.float32), attention.astype(np.float32), keys.astype(np.float32))


def test_merge_formula_by_hand() -> None:
    """merged(t) = tokens[t] + mean(tokens[s] for s assigned to t): the target is NOT in the mean."""
    case = _hand_case()
    cfg = VisionZipConfig(contextual_fraction=2 / 3)
    assert vz.split_budget(3, cfg) == (1, 2)
    x = case.tokens.astype(np.float64)
    want_a = x[1] + x[[*range(2, 24), 30, 31]].mean(axis=0)
    want_b = x[24] + x[[i for i in range(25, N) if i not in (30, 31)]].mean(axis=0)
    idx, tok = ref(case, 3, cfg)
    assert idx.tolist() == [0, 1, 24]
    np.testing.assert_allclose(tok, np.stack([x[0], want_a, want_b]), rtol=1e-12)
    indices, kept = run_eager([case, case], 3, cfg)
    assert indices.tolist() == [[0, 1, 24]] * 2
    np.testing.assert_allclose(kept[0], tok, rtol=1e-6, atol=1e-6)


def test_target_without_sources_is_the_target_itself() -> None:
    """Every source is most similar to target slot 0: the other contextual tokens are their targets, unchanged."""
    rng = np.random.default_rng(22)
    cfg = VisionZipConfig(contextual_fraction=0.5)  # K = 12: 6 dominant + 6 targets
    tokens = rng.standard_normal((N, D)).astype(np.float32)
    attention = np.zeros(N, np.float32)
    attention[:6] = 1.0  # dominant 0..5; remaining 6..47, step 7: targets 6, 13, 20, 27, 34, 41
    keys = np.tile(rng.standard_normal(DV), (N, 1)).astype(np.float32)
    keys[[13, 20, 27, 34, 41]] = -keys[[13, 20, 27, 34, 41]]  # cosine -1 to every source
    case = Case(tokens, attention, keys)
    idx, tok = ref(case, 12, cfg)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 13, 20, 27, 34, 41]
    sources = [i for i in range(6, N) if i not in idx]
    np.testing.assert_allclose(tok[6], tokens[6].astype(np.float64) + tokens[sources].astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(tok[7:], tokens[[13, 20, 27, 34, 41]])
    indices, kept = run_eager([case, case], 12, cfg)
    assert indices[0].tolist() == idx.tolist()
    np.testing.assert_array_equal(kept[0, 7:], tokens[[13, 20, 27, 34, 41]])


def test_k_equals_n_minus_one_drops_the_last_remaining_token(graphs: dict[str, og.Exported]) -> None:
    """K = N-1 (40 + 7): 8 remaining, step 1, targets = the first 7 of them; the 8th is merged and dropped."""
    g = graphs["k47"]
    cases = make_cases("gaussian", 4, stream=23)
    indices, _ = g.run(*stack(cases))
    for b, case in enumerate(cases):
        order = sorted(range(N), key=lambda i: (-float(case.attention[i]), i))
        dropped = sorted(order[40:])[-1]
        assert set(range(N)) - set(indices[b].tolist()) == {dropped}


def test_zero_keys_go_to_the_first_target() -> None:
    rng = np.random.default_rng(24)
    cfg = VisionZipConfig(contextual_fraction=0.5)
    tokens, attention = rng.standard_normal((N, D)).astype(np.float32), np.arange(N, 0, -1).astype(np.float32)
    case = Case(tokens, attention, np.zeros((N, DV), np.float32))
    idx, tok = ref(case, 12, cfg)  # dominant 0..5, targets 6, 13, ..., everything merges into 6
    sources = [i for i in range(6, N) if i not in idx]
    x = tokens.astype(np.float64)
    np.testing.assert_allclose(tok[6], x[6] + x[sources].mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(tok[7:], tokens[idx[7:]])


def test_text_inputs_are_ignored() -> None:
    case = make_cases("gaussian", 1, stream=25)[0]
    tokens, attention, keys = (torch.from_numpy(a) for a in stack([case, case]))
    base = {"tokens": tokens, "cls_attention": attention, "patch_keys": keys}
    with_text = {**base, "text": torch.randn(2, 3, D), "text_mask": torch.ones(2, 3, dtype=torch.int64)}
    a = vz.visionzip_op(base, 8, VisionZipConfig())
    b = vz.visionzip_op(with_text, 8, VisionZipConfig())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reference_entry_and_key_heads() -> None:
    """visionzip_reference takes the registry's input dict; key_heads=1 vs 4 can differ, key_heads = DV is a
    per-component average (cosine of the 1-D head mean: +-1)."""
    case = make_cases("gaussian", 1, stream=26)[0]
    inputs = {"tokens": case.tokens, "cls_attention": case.attention, "patch_keys": case.keys}
    inputs |= {"text": np.zeros((1, D)), "text_mask": np.zeros(1)}  # present in the pipeline, ignored
    idx, tok = vz.visionzip_reference(inputs, 8, VisionZipConfig())
    assert idx.tolist() == ref(case, 8, VisionZipConfig())[0].tolist() and tok.shape == (8, D)
    idx_h, _ = vz.visionzip_reference(inputs, 12, VisionZipConfig(contextual_fraction=0.5, key_heads=DV))
    assert len(idx_h) == 12


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    budget=st.integers(1, N),
    fraction=st.sampled_from([0.0, 10 / 64, 0.25, 0.5, 0.9, 1.0]),
    key_heads=st.sampled_from([1, 2, 16]),
    kind=st.sampled_from(sorted(KINDS)),
)
def test_eager_matches_reference_property(seed: int, budget: int, fraction: float, key_heads: int, kind: str) -> None:
    """Any K in [1, N], any split, any kind: eager torch equals the reference; the reference's invariants hold."""
    cfg = VisionZipConfig(contextual_fraction=fraction, key_heads=key_heads)
    x, a, k = KINDS[kind](np.random.default_rng(seed))
    case = Case(x.astype(np.float32), np.asarray(a, np.float32), k.astype(np.float32))
    idx, tok = ref(case, budget, cfg)
    assert len(idx) == budget and (np.diff(idx) > 0).all() and tok.shape == (budget, D)
    indices, kept = run_eager([case, case], budget, cfg)
    assert_valid(indices, kept, budget, 2)
    assert_matches_reference(indices, kept, [case, case], budget, cfg, "property")


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"contextual_fraction": -0.1}, "contextual_fraction"),
        ({"contextual_fraction": 1.5}, "contextual_fraction"),
        ({"key_heads": 0}, "key_heads"),
        ({"key_heads": 3}, "key_heads"),  # does not divide DV = 16
    ],
)
def test_bad_config_raises(kwargs: dict, needle: str) -> None:
    case = make_cases("gaussian", 1, stream=27)[0]
    with pytest.raises(ConfigError, match=needle):
        ref(case, 8, VisionZipConfig(**kwargs))
    with pytest.raises(ConfigError, match=needle):
        run_eager([case, case], 8, VisionZipConfig(**kwargs))


@pytest.mark.parametrize("budget", [0, -1, N + 1])
def test_bad_budget_raises(budget: int) -> None:
    case = make_cases("gaussian", 1, stream=28)[0]
    with pytest.raises(ConfigError, match="budget"):
        ref(case, budget, VisionZipConfig())


def test_reference_imports_without_torch() -> None:
    inputs = "{'tokens': x, 'cls_attention': x[:, 0], 'patch_keys': x}"
    og.check_reference_without_torch("visionzip", "visionzip_reference", "VisionZipConfig", inputs)


@pytest.mark.parametrize("extra", ["tokens", "attention", "keys"])
def test_inputs_of_another_token_count_are_refused(extra: str) -> None:
    """tokens, cls_attention and patch_keys must describe the same N tokens (a [CLS] row in one of them only is
    an off-by-one between the scores and the gather): the reference and torch refuse, naming the counts."""
    case = make_cases("gaussian", 1, stream=29)[0]
    value = getattr(case, extra)
    longer = Case(**{**case.__dict__, extra: np.concatenate([value[:1], value])})  # N + 1 rows in one input
    with pytest.raises(ConfigError, match=r"inputs cover different numbers of tokens"):
        ref(longer, 8, VisionZipConfig())
    with pytest.raises(ConfigError, match=rf"{N + 1}"):
        run_eager([longer], 8, VisionZipConfig())
    assert pruning_ops.method_spec("visionzip").needs_cls
