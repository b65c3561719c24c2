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

import collections
import importlib
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
from prunert.config import BudgetConfig, RandomConfig  # noqa: E402
from prunert.pruning_ops import random as rnd  # noqa: E402

N, D = 48, 8
GRAPHS = {"k8": ((8,), RandomConfig()), "k1_k47": ((1, N - 1), RandomConfig(seed=1234))}
CASES_PER_KIND = {"k8": 15, "k1_k47": 10}


def reference(tokens: np.ndarray, budget: int, cfg: RandomConfig) -> np.ndarray:
    return rnd.random_reference({"tokens": tokens}, budget, cfg)[0]


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


class SelectGraph(torch.nn.Module):
    def __init__(self, budgets: tuple[int, ...], cfg: RandomConfig):
        super().__init__()
        self.budgets, self.cfg = budgets, cfg

    def forward(self, tokens):
        out = []
        for budget in self.budgets:
            kept_tokens, kept = rnd.random_op({"tokens": tokens}, budget, self.cfg)
            out += [kept, kept_tokens]
        return tuple(out)


@dataclass
class Exported:
    budgets: tuple[int, ...]
    cfg: RandomConfig
    model: onnx.ModelProto
    session: ort.InferenceSession

    def run(self, tokens: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"tokens": tokens})


def export_graph(path, budgets: tuple[int, ...], cfg: RandomConfig) -> Exported:
    outputs = [f"{kind}_{k}" for k in budgets for kind in ("kept_indices", "kept_tokens")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            SelectGraph(budgets, cfg).eval(),
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
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Exported(budgets, cfg, onnx.load(str(path)), session)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Exported]:
    out = tmp_path_factory.mktemp("random_onnx")
    return {name: export_graph(out / f"{name}.onnx", budgets, cfg) for name, (budgets, cfg) in GRAPHS.items()}


def _dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_structure(graphs, name: str) -> None:
    g = graphs[name]
    onnx.checker.check_model(g.model)
    assert {o.domain: o.version for o in g.model.opset_import}[""] == 20
    ops = collections.Counter(n.op_type for n in g.model.graph.node)
    assert not {"NonZero", "TopK", "Loop", "Scan", "If", "RandomUniform", "RandomNormal"} & set(ops), ops
    assert all(n.domain in ("", "ai.onnx") for n in g.model.graph.node)
    inputs, outputs = {v.name: _dims(v) for v in g.model.graph.input}, {v.name: _dims(v) for v in g.model.graph.output}
    batch = inputs["tokens"][0]
    assert isinstance(batch, str) and inputs["tokens"] == [batch, N, D]
    for k in g.budgets:
        assert outputs[f"kept_indices_{k}"] == [batch, k] and outputs[f"kept_tokens_{k}"] == [batch, k, D]
    # the seed's subset is baked in as a constant
    constants = [onnx.numpy_helper.to_array(t).reshape(-1).tolist() for t in g.model.graph.initializer]
    for k in g.budgets:
        assert rnd.random_indices(g.cfg.seed, N, k) in constants


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


def check(indices: np.ndarray, kept: np.ndarray, tokens: np.ndarray, budget: int, cfg: RandomConfig, label: str) -> None:
    """Every row: exactly the reference's indices (int64, ascending) and tokens[indices] bit for bit."""
    assert indices.dtype == np.int64 and indices.shape == (len(tokens), budget)
    for b in range(len(tokens)):
        assert indices[b].tolist() == reference(tokens[b], budget, cfg).tolist(), f"{label} row {b}"
    np.testing.assert_array_equal(kept, np.take_along_axis(tokens, indices[:, :, None], axis=1))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_ort_matches_reference(graphs, name: str, kind: str) -> None:
    g = graphs[name]
    tokens = make_tokens(kind, CASES_PER_KIND[name], stream=1)
    outputs = g.run(tokens)
    for budget, indices, kept in zip(g.budgets, outputs[0::2], outputs[1::2]):
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
    rng = np.random.default_rng(4)
    text, mask = rng.standard_normal((2, 3, D)).astype(np.float32), np.ones((2, 3), np.int64)
    batched = {"tokens": torch.from_numpy(tokens), "text": torch.from_numpy(text), "text_mask": torch.from_numpy(mask)}
    for cfg in (RandomConfig(), RandomConfig(seed=5)):
        budget = BudgetConfig(budget=8, method="random", params=cfg)
        kept, indices = pruning_ops.select(batched, budget)
        want = rnd.random_indices(cfg.seed, N, 8)
        assert indices.tolist() == [want] * 2
        np.testing.assert_array_equal(kept.numpy(), tokens[:, want])
        for b in range(2):
            ref_indices, ref_tokens = pruning_ops.select_reference({"tokens": tokens[b], "text": text[b], "text_mask": mask[b]}, budget)
            assert ref_indices.tolist() == want
            np.testing.assert_array_equal(ref_tokens, tokens[b][ref_indices])


def test_module_name_shadows_no_stdlib_module() -> None:
    """prunert/pruning_ops/random.py is only ever prunert.pruning_ops.random: `import random` (absolute
    imports) stays the standard library's, also after the module was imported."""
    import random

    assert random is not rnd and sys.modules["random"] is random
    assert importlib.import_module("prunert.pruning_ops.random") is rnd
    assert hasattr(random, "Random") and not hasattr(rnd, "Random")


def test_reference_loads_without_torch() -> None:
    """The runtime may call the NumPy reference on a machine without torch: the module imports it lazily."""
    code = (
        "import sys; sys.modules['torch'] = None; import numpy as np; "
        "from prunert.config import RandomConfig; from prunert.pruning_ops.random import random_reference; "
        "x = np.random.default_rng(0).standard_normal((12, 3)); "
        "print(random_reference({'tokens': x, 'cls_attention': x[:, 0]}, 4, RandomConfig())[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 4
