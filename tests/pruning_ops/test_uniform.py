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

from prunert import pruning_ops  # noqa: E402
from prunert.config import BudgetConfig, UniformConfig  # noqa: E402
from prunert.pruning_ops import uniform as un  # noqa: E402

N, D = 48, 8
CFG = UniformConfig()
GRAPHS = {"k8": (8,), "k1_k47": (1, N - 1)}
CASES_PER_KIND = {"k8": 15, "k1_k47": 10}


def reference(tokens: np.ndarray, budget: int) -> np.ndarray:
    return un.uniform_reference({"tokens": tokens}, budget, CFG)[0]


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


class SelectGraph(torch.nn.Module):
    def __init__(self, budgets: tuple[int, ...]):
        super().__init__()
        self.budgets = budgets

    def forward(self, tokens):
        out = []
        for budget in self.budgets:
            kept_tokens, kept = un.uniform_op({"tokens": tokens}, budget, CFG)
            out += [kept, kept_tokens]
        return tuple(out)


@dataclass
class Exported:
    budgets: tuple[int, ...]
    model: onnx.ModelProto
    session: ort.InferenceSession

    def run(self, tokens: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"tokens": tokens})


def export_graph(path, budgets: tuple[int, ...]) -> Exported:
    outputs = [f"{kind}_{k}" for k in budgets for kind in ("kept_indices", "kept_tokens")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            SelectGraph(budgets).eval(),
            (torch.randn(2, N, D),),  # batch 2: batch 1 would specialise
            dynamo=True,
            opset_version=20,
            input_names=["tokens"],
            output_names=outputs,
            dynamic_shapes={"tokens": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return Exported(budgets, onnx.load(str(path)), ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Exported]:
    out = tmp_path_factory.mktemp("uniform_onnx")
    return {name: export_graph(out / f"{name}.onnx", budgets) for name, budgets in GRAPHS.items()}


def _dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    g = graphs[name]
    onnx.checker.check_model(g.model)
    assert {o.domain: o.version for o in g.model.opset_import}[""] == 20
    ops = collections.Counter(n.op_type for n in g.model.graph.node)
    assert not {"NonZero", "TopK", "Loop", "Scan", "If"} & set(ops), ops
    assert all(n.domain in ("", "ai.onnx") for n in g.model.graph.node)
    inputs, outputs = {v.name: _dims(v) for v in g.model.graph.input}, {v.name: _dims(v) for v in g.model.graph.output}
    batch = inputs["tokens"][0]
    assert isinstance(batch, str) and inputs["tokens"] == [batch, N, D]
    for k in g.budgets:
        assert outputs[f"kept_indices_{k}"] == [batch, k] and outputs[f"kept_tokens_{k}"] == [batch, k, D]


def test_node_count(graphs) -> None:
    """One selection: 6 nodes (constant indices, Expand to the batch, GatherElements)."""
    assert len(graphs["k8"].model.graph.node) <= 8


# ----------------------------------------------------------------------------------------- ORT, torch


def kind_gaussian(rng):
    return rng.standard_normal((N, D)) * 10 ** rng.uniform(-4, 4)


def kind_all_zero(rng):
    return np.zeros((N, D))


def kind_all_equal(rng):
    return np.tile(rng.standard_normal(D), (N, 1))


def kind_duplicates(rng):
    x = rng.standard_normal((N, D))
    return x[rng.integers(0, 4, N)]


def kind_non_finite(rng):  # NaN / inf tokens are passed through untouched (and change no index)
    x = rng.standard_normal((N, D))
    x[rng.integers(0, N, 6)] = rng.choice([np.nan, np.inf, -np.inf])
    return x


def kind_huge(rng):
    return rng.standard_normal((N, D)) * 1e30


def kind_small_ints(rng):
    return rng.integers(-2, 3, (N, D)).astype(float)


def kind_zero_rows(rng):
    x = rng.standard_normal((N, D))
    x[rng.integers(0, N, 20)] = 0.0
    return x


KINDS: dict[str, Callable] = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("kind_")}
assert len(KINDS) == 8


def make_tokens(kind: str, count: int, stream: int) -> np.ndarray:
    kind_id = sorted(KINDS).index(kind)
    return np.stack([KINDS[kind](np.random.default_rng([stream, kind_id, i])) for i in range(count)]).astype(np.float32)


def check(indices: np.ndarray, kept: np.ndarray, tokens: np.ndarray, budget: int, label: str) -> None:
    """Every row: exactly the reference's indices (int64, ascending) and tokens[indices] bit for bit."""
    assert indices.dtype == np.int64 and indices.shape == (len(tokens), budget)
    for b in range(len(tokens)):
        assert indices[b].tolist() == reference(tokens[b], budget).tolist(), f"{label} row {b}"
    np.testing.assert_array_equal(kept, np.take_along_axis(tokens, indices[:, :, None], axis=1))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs, name: str, kind: str) -> None:
    g = graphs[name]
    tokens = make_tokens(kind, CASES_PER_KIND[name], stream=1)
    outputs = g.run(tokens)
    for budget, indices, kept in zip(g.budgets, outputs[0::2], outputs[1::2]):
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
    tokens = make_tokens("gaussian", 2, stream=4)
    rng = np.random.default_rng(4)
    text, mask = rng.standard_normal((2, 3, D)).astype(np.float32), np.ones((2, 3), np.int64)
    batched = {"tokens": torch.from_numpy(tokens), "text": torch.from_numpy(text), "text_mask": torch.from_numpy(mask)}
    kept, indices = pruning_ops.select(batched, budget)
    assert indices.tolist() == [un.uniform_indices(N, 8)] * 2
    np.testing.assert_array_equal(kept.numpy(), tokens[:, un.uniform_indices(N, 8)])
    for b in range(2):
        ref_indices, ref_tokens = pruning_ops.select_reference({"tokens": tokens[b], "text": text[b], "text_mask": mask[b]}, budget)
        assert ref_indices.tolist() == un.uniform_indices(N, 8)
        np.testing.assert_array_equal(ref_tokens, tokens[b][ref_indices])


def test_reference_loads_without_torch() -> None:
    """The runtime may call the NumPy reference on a machine without torch: the module imports it lazily."""
    code = (
        "import sys; sys.modules['torch'] = None; import numpy as np; "
        "from prunert.config import UniformConfig; from prunert.pruning_ops.uniform import uniform_reference; "
        "x = np.random.default_rng(0).standard_normal((12, 3)); "
        "print(uniform_reference({'tokens': x, 'cls_attention': x[:, 0]}, 4, UniformConfig())[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 4
