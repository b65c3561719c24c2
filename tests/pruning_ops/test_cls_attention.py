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

import collections
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunert import pruning_ops  # noqa: E402
from prunert.config import BudgetConfig, ClsAttentionConfig  # noqa: E402
from prunert.pruning_ops import cls_attention as ca  # noqa: E402
from prunert.pruning_ops.reference import TIE_RTOL  # noqa: E402

N, D = 48, 16
CFG = ClsAttentionConfig()
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)
GRAPHS = {"k8": (8,), "k1_k47": (1, N - 1)}  # name -> budgets computed by that graph
CASES_PER_KIND = {"k8": 10, "k1_k47": 6}


# ----------------------------------------------------------------------------------------- inputs


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def kind_softmax(rng):  # realistic: head-averaged softmax rows
    return np.mean([_softmax(rng.standard_normal(N) * rng.uniform(0.5, 4)) for _ in range(4)], axis=0)


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


KINDS: dict[str, Callable] = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("kind_")}
assert len(KINDS) == 13


@dataclass
class Case:
    tokens: np.ndarray  # [N, D] float32
    scores: np.ndarray  # [N] float32


def make_cases(kind: str, count: int, stream: int) -> list[Case]:
    kind_id = sorted(KINDS).index(kind)
    cases = []
    for i in range(count):
        rng = np.random.default_rng([stream, kind_id, i])
        cases.append(Case(rng.standard_normal((N, D)).astype(np.float32), KINDS[kind](rng).astype(np.float32)))
    return cases


def reference(case: Case, budget: int) -> np.ndarray:
    return ca.cls_attention_reference({"tokens": case.tokens, "cls_attention": case.scores}, budget, CFG)[0]


def assert_valid(indices: np.ndarray, kept: np.ndarray | None, tokens: np.ndarray, budget: int) -> None:
    """Every row: K distinct ascending indices in [0, N); kept tokens == tokens[indices] bit for bit."""
    assert indices.dtype == np.int64 and indices.shape == (tokens.shape[0], budget)
    assert (indices >= 0).all() and (indices < tokens.shape[1]).all()
    assert (np.diff(indices, axis=1) > 0).all(), "indices not strictly ascending"
    if kept is not None:
        np.testing.assert_array_equal(kept, np.take_along_axis(tokens, indices[:, :, None], axis=1))


def assert_same_sets(got: np.ndarray, cases: list[Case], budget: int, label: str) -> None:
    for b, case in enumerate(cases):
        want = reference(case, budget)
        only_got, only_want = sorted(set(got[b]) - set(want)), sorted(set(want) - set(got[b]))
        assert got[b].tolist() == want.tolist(), f"{label} row {b}: only here {only_got}, only in reference {only_want}"


# ----------------------------------------------------------------------------------------- export


class SelectGraph(torch.nn.Module):
    def __init__(self, budgets: tuple[int, ...]):
        super().__init__()
        self.budgets = budgets

    def forward(self, tokens, cls_attention):
        out = []
        for budget in self.budgets:
            kept_tokens, kept = ca.cls_attention_op({"tokens": tokens, "cls_attention": cls_attention}, budget, CFG)
            out += [kept, kept_tokens]
        return tuple(out)


@dataclass
class Exported:
    budgets: tuple[int, ...]
    model: onnx.ModelProto
    session: ort.InferenceSession

    def run(self, cases: list[Case]) -> list[np.ndarray]:
        tokens, scores = np.stack([c.tokens for c in cases]), np.stack([c.scores for c in cases])
        return self.session.run(None, {"tokens": tokens, "cls_attention": scores})


def export_graph(path, budgets: tuple[int, ...]) -> Exported:
    batch = torch.export.Dim("batch")
    outputs = [f"{kind}_{k}" for k in budgets for kind in ("kept_indices", "kept_tokens")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            SelectGraph(budgets).eval(),
            (torch.randn(2, N, D), torch.rand(2, N)),  # batch 2: batch 1 would specialise
            dynamo=True,
            opset_version=20,
            input_names=["tokens", "cls_attention"],
            output_names=outputs,
            dynamic_shapes={"tokens": {0: batch}, "cls_attention": {0: batch}},
            verbose=False,
        )
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return Exported(budgets, onnx.load(str(path)), ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Exported]:
    out = tmp_path_factory.mktemp("cls_attention_onnx")
    return {name: export_graph(out / f"{name}.onnx", budgets) for name, budgets in GRAPHS.items()}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def _constants(model) -> dict[str, np.ndarray]:
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    g = graphs[name]
    onnx.checker.check_model(g.model)
    assert {o.domain: o.version for o in g.model.opset_import}[""] == 20
    every = list(_all_nodes(g.model.graph))
    ops = collections.Counter(n.op_type for n in every)
    assert ops["NonZero"] == 0 and ops["Loop"] == 0 and ops["Scan"] == 0
    assert ops["TopK"] == 3 * len(g.budgets)
    assert all(n.domain in ("", "ai.onnx") for n in every), "standard ops only"
    constants = _constants(g.model)
    for topk in (n for n in every if n.op_type == "TopK"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in topk.attribute}
        assert attrs.get("sorted", 1) == 1
        assert int(constants[topk.input[1]].reshape(())) in g.budgets  # k a constant, <= K <= 3840
    inputs, outputs = {v.name: _dims(v) for v in g.model.graph.input}, {v.name: _dims(v) for v in g.model.graph.output}
    batch = inputs["tokens"][0]
    assert isinstance(batch, str) and inputs["tokens"] == [batch, N, D] and inputs["cls_attention"] == [batch, N]
    for k in g.budgets:
        assert outputs[f"kept_indices_{k}"] == [batch, k] and outputs[f"kept_tokens_{k}"] == [batch, k, D]


def test_node_count(graphs) -> None:
    """One selection: 18 nodes (3 TopK, masks, GatherElements), reported in the module docstring."""
    assert len(list(_all_nodes(graphs["k8"].model.graph))) <= 24


# ----------------------------------------------------------------------------------------- ORT vs reference


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs, name: str, kind: str) -> None:
    g = graphs[name]
    cases = make_cases(kind, CASES_PER_KIND[name], stream=1)
    outputs = g.run(cases)
    tokens = np.stack([c.tokens for c in cases])
    for budget, indices, kept in zip(g.budgets, outputs[0::2], outputs[1::2]):
        assert_valid(indices, kept, tokens, budget)
        assert_same_sets(indices, cases, budget, f"ORT {name} K={budget}/{kind}")


def test_ort_batch_rows_are_independent(graphs) -> None:
    cases = [c for kind in ("softmax", "few_levels", "all_zero", "signed") for c in make_cases(kind, 1, stream=2)]
    batched = graphs["k8"].run(cases)[0]
    for b, case in enumerate(cases):
        np.testing.assert_array_equal(graphs["k8"].run([case])[0][0], batched[b])  # batch 1


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
        "ort": graphs["k8"].run([case, case])[0][0],
        "torch": ca.cls_attention_select(torch.from_numpy(case.scores[None]), 8)[0].numpy(),
    }
    for backend, kept in results.items():
        assert {0, 1} & set(kept.tolist()) == {winner}, backend


def test_flat_attention_with_backend_noise_keeps_the_first_k(graphs) -> None:
    """A blank image: attention equal up to 1e-6 relative noise that differs between backends; every
    backend keeps tokens 0..K-1 whatever the noise (an exact-tie rule would keep noise-dependent sets)."""
    rng = np.random.default_rng(12)
    cases = [Case(np.zeros((N, D), np.float32), (np.full(N, 1 / N) * (1 + 1e-6 * rng.standard_normal(N))).astype(np.float32)) for _ in range(4)]
    assert graphs["k8"].run(cases)[0].tolist() == [list(range(8))] * 4
    for case in cases:
        assert reference(case, 8).tolist() == list(range(8))


# ----------------------------------------------------------------------------------------- torch, registry


@pytest.mark.parametrize("budget", [1, 8, N - 1, N])
def test_torch_eager_matches_reference(budget: int) -> None:
    cases = [c for kind in sorted(KINDS) for c in make_cases(kind, 2, stream=3)]
    tokens, scores = np.stack([c.tokens for c in cases]), np.stack([c.scores for c in cases])
    kept_tokens, indices = ca.cls_attention_op({"tokens": torch.from_numpy(tokens), "cls_attention": torch.from_numpy(scores)}, budget, CFG)
    assert_valid(indices.numpy(), kept_tokens.numpy(), tokens, budget)
    assert_same_sets(indices.numpy(), cases, budget, f"torch K={budget}")


def test_registry_dispatch_and_budget_config() -> None:
    budget = BudgetConfig(budget=8, method="cls_attention")
    assert budget.params == ClsAttentionConfig() and pruning_ops.method_params(budget) == {}
    assert pruning_ops.config_from_params("cls_attention", {}, 8) == budget
    assert pruning_ops.method_spec("cls_attention").needs == ("cls_attention",)
    budget.validate_against(N)
    cases = make_cases("softmax", 2, stream=4)
    rng = np.random.default_rng(4)
    text, mask = rng.standard_normal((2, 3, D)).astype(np.float32), np.ones((2, 3), np.int64)
    batched = {
        "tokens": torch.from_numpy(np.stack([c.tokens for c in cases])),
        "cls_attention": torch.from_numpy(np.stack([c.scores for c in cases])),
        "text": torch.from_numpy(text),
        "text_mask": torch.from_numpy(mask),
    }
    kept_tokens, indices = pruning_ops.select(batched, budget)
    want_tokens, want = ca.cls_attention_op(batched, 8, CFG)
    assert torch.equal(indices, want) and torch.equal(kept_tokens, want_tokens)
    for b, case in enumerate(cases):
        sample = {"tokens": case.tokens, "cls_attention": case.scores, "text": text[b], "text_mask": mask[b]}
        ref_indices, ref_tokens = pruning_ops.select_reference(sample, budget)
        assert ref_indices.tolist() == indices[b].tolist() == reference(case, 8).tolist()
        np.testing.assert_array_equal(ref_tokens, case.tokens[ref_indices])


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
    """The runtime may call the NumPy reference on a machine without torch: the module imports it lazily."""
    code = (
        "import sys; sys.modules['torch'] = None; import numpy as np; "
        "from prunert.config import ClsAttentionConfig; from prunert.pruning_ops.cls_attention import cls_attention_reference; "
        "x = np.random.default_rng(0).standard_normal((12, 3)); "
        "print(cls_attention_reference({'tokens': x, 'cls_attention': x[:, 0]}, 4, ClsAttentionConfig())[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 4
