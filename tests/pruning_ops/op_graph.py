"""What the pruning-op tests (test_*.py beside this file) share: `import op_graph as og` (pytest puts this
directory on sys.path: it has no __init__.py, and pytest's default import mode prepends it).

  export      one op (the registry's `op(inputs, budget, cfg)`) wrapped for export with torch.onnx (dynamo,
              opset 20, batch 2 examples, batch and text length symbolic), loaded in ONNX Runtime CPU, one thread.
              Each graph outputs kept_indices_K [B, K] and kept_tokens_K [B, K, D] for every budget K it holds.
  graph       node walks (Loop bodies included), constants, input / output dims, and `check_graph`: the
              properties every op graph must have.
  outputs     the invariants of a selection (K distinct ascending indices in [0, N), tokens gathered bit for
              bit) and row-by-row agreement with a reference.
  inputs      deterministic random inputs: one generator per input kind, rng seeded by (stream, kind, i);
              the shared kinds of plain tokens and of tokens with text.
  registry    pruning_ops.select / select_reference dispatch, and the NumPy reference without torch.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from prunert import pruning_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPSET = 20
EXAMPLE_BATCH = 2  # batch 1 would specialise
M_EXPORT = 5  # example text length at export (M is symbolic in the graph)


# ----------------------------------------------------------------------------------------- export


class SelectGraph(torch.nn.Module):
    """The op as the export pipeline calls it: inputs by name -> (kept_indices, kept_tokens) for each budget."""

    def __init__(self, op: Callable, names: tuple[str, ...], budgets: tuple[int, ...], cfg: Any):
        super().__init__()
        self.op, self.names, self.budgets, self.cfg = op, names, budgets, cfg

    def forward(self, *tensors):
        inputs = dict(zip(self.names, tensors))
        out = []
        for budget in self.budgets:
            kept_tokens, kept = self.op(inputs, budget, self.cfg)
            out += [kept, kept_tokens]
        return tuple(out)


@dataclass
class Exported:
    budgets: tuple[int, ...]
    cfg: Any
    names: tuple[str, ...]  # graph inputs, in order
    model: onnx.ModelProto
    session: ort.InferenceSession

    @property
    def budget(self) -> int:
        (budget,) = self.budgets
        return budget

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Inputs in the order of `names` -> [kept_indices, kept_tokens] for each budget, in order."""
        return self.session.run(None, dict(zip(self.names, arrays)))

    def selections(self, *arrays: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(budget, kept_indices, kept_tokens) for each budget."""
        outputs = self.run(*arrays)
        return list(zip(self.budgets, outputs[0::2], outputs[1::2]))


def _example(name: str, n: int, d: int, dv: int | None) -> torch.Tensor:
    b = EXAMPLE_BATCH
    return {
        "tokens": lambda: torch.randn(b, n, d),
        "cls_attention": lambda: torch.rand(b, n),
        "patch_keys": lambda: torch.randn(b, n, dv),
        "text": lambda: torch.randn(b, M_EXPORT, d),
        "text_mask": lambda: torch.ones(b, M_EXPORT, dtype=torch.int64),
    }[name]()


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_selection(
    path, op: Callable, budgets: int | tuple[int, ...], cfg: Any, names: tuple[str, ...] = ("tokens",), *, n: int, d: int,
    dv: int | None = None, n_range: tuple[int, int] | None = None,
) -> Exported:
    """Export `op` at each budget into one graph (example batch 2, M=5; batch and M symbolic; N symbolic too over
    n_range = (min, max) if given, as in Qwen2.5-VL's one graph over a range of N) and load it in ORT."""
    budgets = (budgets,) if isinstance(budgets, int) else tuple(budgets)
    batch, m = torch.export.Dim("batch"), torch.export.Dim("m")
    tokens = {0: batch} if n_range is None else {0: batch, 1: torch.export.Dim("n", min=n_range[0], max=n_range[1])}
    dynamic = [{0: batch, 1: m} if name in ("text", "text_mask") else tokens for name in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            SelectGraph(op, names, budgets, cfg).eval(),
            tuple(_example(name, n, d, dv) for name in names),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(names),
            output_names=[f"{kind}_{k}" for k in budgets for kind in ("kept_indices", "kept_tokens")],
            dynamic_shapes={"tensors": tuple(dynamic)},  # keyed by SelectGraph.forward's parameter, *tensors
            verbose=False,
        )
    program.save(str(path))
    return Exported(budgets, cfg, names, onnx.load(str(path)), session(path))


def export_each(out_dir: Path, op: Callable, graphs: dict[str, tuple], names: tuple[str, ...] = ("tokens",), **dims) -> dict[str, Exported]:
    """{name: (budget or budgets, cfg)} -> {name: Exported}, each exported to out_dir/name.onnx."""
    return {name: export_selection(out_dir / f"{name}.onnx", op, budgets, cfg, names, **dims) for name, (budgets, cfg) in graphs.items()}


def check_symbolic_n(tmp_path: Path, op: Callable, reference: Callable, cfg: Any, budget: int = 7) -> None:
    """One graph over a range of N (Qwen2.5-VL's symbolic N): TensorRT-clean, N stays symbolic, and for every N in
    the range both rows keep exactly the reference's indices of that N, tokens gathered bit for bit."""
    from prunert.export.trt_check import TrtCheckConfig, check_trt

    graph = export_selection(tmp_path / "symbolic.onnx", op, budget, cfg, n=40, d=4, n_range=(budget, 300))
    assert not check_trt(tmp_path / "symbolic.onnx", TrtCheckConfig())
    assert dims(graph.model.graph.input[0])[1] == "n"
    for n in (budget, budget + 1, 40, 113, 300):
        tokens = np.random.default_rng(n).standard_normal((2, n, 4)).astype(np.float32)
        kept, kept_tokens = graph.run(tokens)
        want, _ = reference({"tokens": tokens[0]}, budget, cfg)
        assert (kept == want).all(), n
        np.testing.assert_array_equal(kept_tokens[1], tokens[1][want])


# ----------------------------------------------------------------------------------------- graph


def all_nodes(graph: onnx.GraphProto):
    """Every node, those of subgraphs (Loop / If bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            for sub in attr.graphs:
                yield from all_nodes(sub)


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in all_nodes(model.graph))


def node_count(model: onnx.ModelProto) -> int:
    """Nodes including those of subgraphs."""
    return sum(op_counts(model).values())


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in all_nodes(model.graph):
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def assert_io(model: onnx.ModelProto, inputs: dict[str, list], outputs: dict[str, list]) -> None:
    """Graph inputs and outputs are exactly these, with these dims; a str stands for a symbolic dim (the same
    str for the same symbol, different strs for different symbols), an int for a fixed one."""
    symbols: dict[str, str] = {}
    for values, want in ((model.graph.input, inputs), (model.graph.output, outputs)):
        got = {v.name: dims(v) for v in values}
        assert set(got) == set(want), (sorted(got), sorted(want))
        for name, shape in want.items():
            assert len(got[name]) == len(shape), (name, got[name], shape)
            for w, g in zip(shape, got[name]):
                if isinstance(w, str):
                    assert isinstance(g, str) and g, f"{name}: {w} must be symbolic (example batch 2, never specialised), got {got[name]}"
                    assert symbols.setdefault(w, g) == g, (name, w, g, symbols)
                else:
                    assert g == w, (name, got[name], shape)
    assert len(set(symbols.values())) == len(symbols), symbols


def check_graph(g: Exported, inputs: dict[str, list], *, absent: Iterable[str] = ("NonZero",), topk_k_in_budgets: bool = False) -> collections.Counter:
    """What every op graph must be: a valid opset-20 model of standard ops only, none of `absent` (subgraphs
    included; NonZero would mean data-dependent shapes), every TopK sorted, no Loop with scan outputs
    (TensorRT wants none), the inputs as given (dims as in `assert_io`) and kept_indices_K [batch, K],
    kept_tokens_K [batch, K, D] for each budget K. With `topk_k_in_budgets`, every TopK's k is a constant
    among the budgets (<= K <= 3840). Returns the op counts, subgraphs included."""
    onnx.checker.check_model(g.model)
    assert {o.domain: o.version for o in g.model.opset_import}.get("") == OPSET
    every = list(all_nodes(g.model.graph))
    ops = collections.Counter(n.op_type for n in every)
    assert not set(absent) & set(ops), ops
    assert all(n.domain in ("", "ai.onnx") for n in every), "standard ops only"
    for loop in (n for n in every if n.op_type == "Loop"):
        assert len(loop.output) == len(loop.input) - 2, "Loop has scan outputs (TensorRT wants none)"
    values = constants(g.model) if topk_k_in_budgets else {}
    for topk in (n for n in every if n.op_type == "TopK"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in topk.attribute}
        assert attrs.get("sorted", 1) == 1
        if topk_k_in_budgets:
            assert int(values[topk.input[1]].reshape(())) in g.budgets
    d = inputs["tokens"][-1]
    outputs = {}
    for k in g.budgets:
        outputs |= {f"kept_indices_{k}": ["batch", k], f"kept_tokens_{k}": ["batch", k, d]}
    assert_io(g.model, inputs, outputs)
    return ops


# ----------------------------------------------------------------------------------------- outputs


def assert_valid_indices(indices: np.ndarray, batch: int, budget: int, n: int) -> None:
    """Every row: K distinct indices (int64), strictly ascending, in [0, N)."""
    assert indices.dtype == np.int64 and indices.shape == (batch, budget), (indices.dtype, indices.shape)
    assert (indices >= 0).all() and (indices < n).all()
    assert (np.diff(indices, axis=1) > 0).all(), "indices not strictly ascending (duplicates or unsorted)"


def assert_valid(indices: np.ndarray, kept: np.ndarray | None, tokens: np.ndarray, budget: int) -> None:
    """Every row: K distinct ascending indices in [0, N); kept tokens [B, K, D] == tokens[indices] bit for bit."""
    assert_valid_indices(indices, tokens.shape[0], budget, tokens.shape[1])
    if kept is not None:
        assert kept.shape == (tokens.shape[0], budget, tokens.shape[2])
        np.testing.assert_array_equal(kept, np.take_along_axis(tokens, indices[:, :, None], axis=1))


def assert_same_sets(got: np.ndarray, wants: Iterable[np.ndarray], label: str) -> None:
    """Row b of `got` is exactly the b-th reference selection (ascending indices); a failure names the
    indices kept only on each side."""
    wants = list(wants)
    assert len(got) == len(wants), (len(got), len(wants))
    for b, want in enumerate(wants):
        only_got, only_want = sorted(set(got[b].tolist()) - set(want.tolist())), sorted(set(want.tolist()) - set(got[b].tolist()))
        assert got[b].tolist() == want.tolist(), f"{label} row {b}: kept only here {only_got}, only in reference {only_want}"


# ----------------------------------------------------------------------------------------- inputs


def kinds_in(namespace: dict[str, Any]) -> dict[str, Callable]:
    """The input kinds of a test module: its functions kind_NAME, by NAME."""
    return {name[len("kind_") :]: fn for name, fn in sorted(namespace.items()) if name.startswith("kind_") and callable(fn)}


def case_rngs(kinds: dict[str, Callable], kind: str, count: int, stream: int) -> list[np.random.Generator]:
    """One generator per input: seeded by (stream, the kind's rank among the kinds, i), so adding an input
    to one kind or test changes no other."""
    kind_id = sorted(kinds).index(kind)
    return [np.random.default_rng([stream, kind_id, i]) for i in range(count)]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def copy_rows(rng: np.random.Generator, x: np.ndarray, count: int, factors=(1.0,)) -> np.ndarray:
    """`count` rows of x overwritten by (scaled) copies of other rows."""
    src, dst = rng.integers(0, len(x), count), rng.integers(0, len(x), count)
    x[dst] = x[src] * rng.choice(factors, count)[:, None]
    return x


def token_kinds(n: int, d: int) -> dict[str, Callable[[np.random.Generator], np.ndarray]]:
    """Tokens [N, D] alone, for ops that do not look at their values: degenerate and non-finite ones included
    (NaN / inf tokens are passed through untouched and change no index)."""

    def gaussian(rng):
        return rng.standard_normal((n, d)) * 10 ** rng.uniform(-4, 4)

    def all_zero(rng):
        return np.zeros((n, d))

    def all_equal(rng):
        return np.tile(rng.standard_normal(d), (n, 1))

    def duplicates(rng):
        x = rng.standard_normal((n, d))
        return x[rng.integers(0, 4, n)]

    def non_finite(rng):
        x = rng.standard_normal((n, d))
        x[rng.integers(0, n, 6)] = rng.choice([np.nan, np.inf, -np.inf])
        return x

    def huge(rng):
        return rng.standard_normal((n, d)) * 1e30

    def small_ints(rng):
        return rng.integers(-2, 3, (n, d)).astype(float)

    def zero_rows(rng):
        x = rng.standard_normal((n, d))
        x[rng.integers(0, n, 20)] = 0.0
        return x

    return kinds_in({f"kind_{f.__name__}": f for f in (gaussian, all_zero, all_equal, duplicates, non_finite, huge, small_ints, zero_rows)})


def make_tokens(kinds: dict[str, Callable], kind: str, count: int, stream: int) -> np.ndarray:
    """[count, N, D] float32 of one kind of `token_kinds`."""
    return np.stack([kinds[kind](rng) for rng in case_rngs(kinds, kind, count, stream)]).astype(np.float32)


@dataclass
class TextCase:
    tokens: np.ndarray  # [N, D] float32
    text: np.ndarray  # [M, D] float32
    mask: np.ndarray  # [M] int64, nonzero = content word


def stack_text(cases: list[TextCase]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch cases; text padded to the longest with zero rows and mask 0 (padding must not matter)."""
    m = max(len(c.mask) for c in cases)
    text = np.zeros((len(cases), m, cases[0].tokens.shape[1]), np.float32)
    mask = np.zeros((len(cases), m), np.int64)
    for b, c in enumerate(cases):
        text[b, : len(c.mask)], mask[b, : len(c.mask)] = c.text, c.mask
    return np.stack([c.tokens for c in cases]), text, mask


def random_text(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    """1..7 Gaussian text rows [M, D], all content words (mask 1)."""
    m = int(rng.integers(1, 8))
    return rng.standard_normal((m, d)), np.ones(m, np.int64)


def text_kinds(n: int, d: int) -> dict[str, Callable]:
    """Tokens with text, for text-conditioned ops: kind(rng, budget) -> tokens [N, D], text [M, D], mask [M].
    The kinds both ResPrune and CDPruner run; each test module adds the ones it words its own way."""

    def text(rng):
        return random_text(rng, d)

    def gaussian(rng, k):  # one scale per image, 1e-4 .. 1e4
        return rng.standard_normal((n, d)) * 10 ** rng.uniform(-4, 4), *text(rng)

    def extreme_scale(rng, k):  # 1e+-(15..25): fp32 energies / norms would overflow / underflow without row scaling
        return rng.standard_normal((n, d)) * 10 ** (rng.choice([-1, 1]) * rng.uniform(15, 25)), *text(rng)

    def duplicates(rng, k):  # rows copied exactly
        return copy_rows(rng, rng.standard_normal((n, d)), 20), *text(rng)

    def scaled_duplicates(rng, k):  # copies times -1 and powers of two (exact in fp32): cosine +-1, collinear ties
        return copy_rows(rng, rng.standard_normal((n, d)), 20, (-1.0, 2.0, -0.5, 4.0, 0.25)), *text(rng)

    def zero_rows(rng, k):
        x = rng.standard_normal((n, d))
        x[rng.integers(0, n, 12)] = 0.0
        return x, *text(rng)

    def all_zero(rng, k):
        return np.zeros((n, d)), *text(rng)

    def low_rank(rng, k):  # rank < K (and < D): later picks by the tau rule + lowest index
        rank = int(rng.integers(1, max(2, min(k, d))))
        return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)), *text(rng)

    def small_ints(rng, k):  # exact Gram in fp32, many exact ties
        return rng.integers(-3, 4, (n, d)).astype(float), *text(rng)

    def all_equal(rng, k):
        return np.tile(rng.standard_normal(d), (n, 1)), *text(rng)

    def huge_token(rng, k):  # one token 1e3 .. 1e8 times the others: must not floor the others' energies (cosines ignore it)
        x = rng.standard_normal((n, d))
        x[rng.integers(n)] *= 10 ** rng.uniform(3, 8)
        return x, *text(rng)

    def no_text(rng, k):  # no content words: r = 1
        t, mask = text(rng)
        return rng.standard_normal((n, d)), t, np.zeros_like(mask)

    def partial_mask(rng, k):  # masked rows hold garbage (NaN, 1e30, noise) and must not matter; nonzero = content
        t, mask = text(rng)
        mask = rng.choice([0, 0, 1, 2, -1], len(mask)).astype(np.int64)
        t[mask == 0] = rng.choice([np.nan, 1e30, -7.0])
        return rng.standard_normal((n, d)), t, mask

    def text_is_token(rng, k):  # text rows equal to tokens: cosines of exactly 1
        x = rng.standard_normal((n, d))
        t, mask = text(rng)
        return x, x[rng.integers(0, n, len(mask))], mask

    def orthogonal_text(rng, k):  # text orthogonal to every token (rotated): cosines 0 up to rounding, flat relevance
        rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
        x = np.zeros((n, d))
        x[:, 1:] = rng.standard_normal((n, d - 1))
        t, mask = text(rng)
        t[:] = 0.0
        t[:, 0] = rng.standard_normal(len(mask))
        return x @ rotation.T, t @ rotation.T, mask

    def cancelling_text(rng, k):  # content words t and -t: "mean" cosines are 0 up to rounding
        t, mask = text(rng)
        return rng.standard_normal((n, d)), np.concatenate([t, -t]), np.concatenate([mask, mask])

    kinds = (gaussian, extreme_scale, duplicates, scaled_duplicates, zero_rows, all_zero, low_rank, small_ints, all_equal)
    kinds += (huge_token, no_text, partial_mask, text_is_token, orthogonal_text, cancelling_text)
    return kinds_in({f"kind_{f.__name__}": f for f in kinds})


def make_text_cases(kinds: dict[str, Callable], kind: str, count: int, budget: int, stream: int) -> list[TextCase]:
    """`count` inputs of one kind (float32 tokens and text, int64 mask)."""
    cases = []
    for rng in case_rngs(kinds, kind, count, stream):
        x, text, mask = kinds[kind](rng, budget)
        cases.append(TextCase(x.astype(np.float32), text.astype(np.float32), np.asarray(mask, np.int64)))
    return cases


# ----------------------------------------------------------------------------------------- registry


def check_dispatch(budget, inputs: dict[str, np.ndarray], want: np.ndarray, rng: np.random.Generator | None = None):
    """pruning_ops.select on the batch `inputs` plus 3 text rows (drawn from rng, default seed 4; mask 1), and
    select_reference on each of its rows, both keep the indices `want` [B, K] and tokens[want] bit for bit.
    Returns select's (kept_tokens, kept_indices) tensors."""
    rng = np.random.default_rng(4) if rng is None else rng
    tokens = inputs["tokens"]
    text = rng.standard_normal((len(tokens), 3, tokens.shape[2])).astype(np.float32)
    batch = {**inputs, "text": text, "text_mask": np.ones((len(tokens), 3), np.int64)}
    kept_tokens, indices = pruning_ops.select({k: torch.from_numpy(v) for k, v in batch.items()}, budget)
    assert indices.dtype == torch.int64 and indices.tolist() == want.tolist()
    np.testing.assert_array_equal(kept_tokens.numpy(), np.take_along_axis(tokens, want[:, :, None], axis=1))
    for b in range(len(tokens)):
        ref_indices, ref_tokens = pruning_ops.select_reference({k: v[b] for k, v in batch.items()}, budget)
        assert ref_indices.tolist() == want[b].tolist()
        np.testing.assert_array_equal(ref_tokens, tokens[b][ref_indices])
    return kept_tokens, indices


def check_reference_without_torch(module: str, reference: str, config: str, inputs: str) -> None:
    """The runtime may call the NumPy reference on a machine without torch: in a fresh interpreter, importing
    prunert.pruning_ops.MODULE imports no torch, and REFERENCE(INPUTS, 4, CONFIG()) runs with torch
    unimportable (x: 12 x 3 Gaussian) and keeps 4 distinct ascending indices in [0, 12)."""
    code = (
        "import sys, json; import numpy as np; "
        f"from prunert.config import {config}; from prunert.pruning_ops.{module} import {reference}; "
        "assert 'torch' not in sys.modules, 'importing the op module imported torch'; "
        "sys.modules['torch'] = None; "  # from here on, `import torch` fails
        "x = np.random.default_rng(0).standard_normal((12, 3)); "
        f"print(json.dumps({reference}({inputs}, 4, {config}())[0].tolist()))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kept = json.loads(out.stdout)
    assert len(kept) == 4 and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 12, kept
