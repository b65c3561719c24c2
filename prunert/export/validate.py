"""Validation after export (as Optimum does): run each ONNX graph in ONNX Runtime on the batch-2
export examples, check every output's shape against what the manifest declares, and compare with the
torch module at the export dtype. Raises ExportError on any mismatch.

Two halves, so that a big model never has its torch weights and an ONNX Runtime session resident together:
`reference()` runs the torch module while it exists and keeps its outputs (a GraphCheck); `check_graph()`
runs ONNX Runtime on the saved feeds once the export freed the torch weights (pipeline.release_weights),
one session at a time, created lean (ort_session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunert import metrics
from prunert.config import PRECISION_TOLERANCES
from prunert.errors import ExportError
from prunert.manifest import GraphSpec


@dataclass(frozen=True)
class ExportTolerance:
    """How ONNX Runtime must match the torch module at one export dtype. max_abs None: judged by cosine
    (elementwise max-abs is meaningless at fp16); integer [B, K] outputs (kept indices) by per-row set overlap."""

    max_abs: float | None
    min_cosine: float | None
    kept_min_overlap: float


# fp32 graph vs fp32 eager on random inputs: 1e-3 and equal sets. fp16: ONNX Runtime's CPU provider computes the fp16
# graph's MatMuls in fp32 (it casts around kernels it has only in fp32) while torch computes in fp16, so outputs are
# judged by the fp16 parity cosine, tokens on the rows both kept. The selection itself is fp32, but on the export's
# random-noise example its near-ties flip on fp16-level feature differences and a greedy method cascades (llava-tiny,
# K=16: 14/16 in common): the bar only catches a broken selection (a random one keeps ~K/N in common); parity's fp16
# kept-index bar (0.98, on a real image) judges the selection, as for `prunert convert`'s fp16 variants.
EXPORT_TOLERANCES = {
    "fp32": ExportTolerance(max_abs=1e-3, min_cosine=None, kept_min_overlap=1.0),
    "fp16": ExportTolerance(max_abs=None, min_cosine=PRECISION_TOLERANCES["fp16"]["logits_min_cosine"], kept_min_overlap=0.5),
}
MAX_ABS = EXPORT_TOLERANCES["fp32"].max_abs


@dataclass(frozen=True)
class GraphCheck:
    """One exported graph's validation: the example feeds and the torch module's outputs on them (by output
    name, float32), kept so that ONNX Runtime can be compared after the torch weights are gone."""

    path: Path
    spec: GraphSpec
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    dtype: str = "fp32"  # the export dtype: picks EXPORT_TOLERANCES


def reference(module: torch.nn.Module, args: tuple, path: Path, spec: GraphSpec, dtype: str = "fp32") -> GraphCheck:
    """The torch module on the export example `args` (flattened in the order of spec.inputs) -> a GraphCheck."""
    with torch.no_grad():
        outputs = module(*args)
    flat = [a for arg in args for a in (arg if isinstance(arg, tuple) else (arg,))]
    feeds = {t.name: value.numpy() for t, value in zip(spec.inputs, flat)}
    expected = {t.name: value.detach().numpy() for t, value in zip(spec.outputs, outputs)}
    return GraphCheck(path, spec, feeds, expected, dtype)


def check_graph(check: GraphCheck) -> None:
    """ONNX Runtime on the check's feeds against its saved torch outputs, within the export dtype's tolerance."""
    got = _run(check.path, check.spec, check.feeds)
    tolerance = EXPORT_TOLERANCES[check.dtype]
    for name, expected in check.expected.items():  # integer outputs first: a kept-index mismatch is the real cause
        if not np.issubdtype(expected.dtype, np.floating):
            _same_sets(check.path, name, expected, got[name], tolerance.kept_min_overlap)
    kept = next((n for n, v in check.expected.items() if v.ndim == 2 and np.issubdtype(v.dtype, np.integer)), None)  # [B, K]
    for name, expected in check.expected.items():
        if not np.issubdtype(expected.dtype, np.floating):
            continue
        if kept and tolerance.kept_min_overlap < 1 and expected.shape[:2] == check.expected[kept].shape:  # tokens [B, K, D] it gathered
            pairs = zip(check.expected[kept], expected, got[kept], got[name])
            cosine = min((value for value in (metrics.matched_token_cosine(*pair) for pair in pairs) if value is not None), default=1.0)
            if not cosine >= tolerance.min_cosine:
                raise ExportError(f"{check.path.name}: output '{name}' has cosine {cosine:.6f} to torch on the tokens both kept "
                                  f"(min {tolerance.min_cosine})")
        else:
            _close(check.path, name, expected, got[name], tolerance)


def validate_vision(module: torch.nn.Module, args: tuple, path: Path, spec: GraphSpec, dtype: str = "fp32") -> None:
    """reference() and check_graph() at once (the module stays alive: for graphs that fit twice in memory)."""
    check_graph(reference(module, args, path, spec, dtype))


validate_decoder = validate_vision  # the same two steps: outputs compared by type, whatever the graph


def ort_session(path: Path) -> Any:
    """An ONNX Runtime CPU session that holds the graph's weights once: no graph optimisation (constant folding
    would turn the casts ORT inserts around its fp32-only kernels into fp32 copies of every fp16 weight), no
    pre-packed weight copies, no memory arena kept at its peak, nodes in priority order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    # fp16 weights reach ORT's fp32-only CPU MatMul through Casts it inserts; in the default order every weight's Cast
    # (ready at the start) ran first and all fp32 copies lived at once (7.1 GB peak for a 2.5 GB fp16 decoder); in
    # priority order each runs just before its MatMul (2.6 GB)
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ExportError(f"{path.name}: ONNX Runtime cannot load the exported graph: {str(exc).splitlines()[0][:300]}") from None


def _run(path: Path, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the export example; every output's shape checked against the spec (check_output_shapes)."""
    session = ort_session(path)
    names = [t.name for t in spec.outputs]
    got = dict(zip(names, session.run(names, feeds)))
    del session
    check_output_shapes(path, spec, {name: value.shape for name, value in feeds.items()}, {name: value.shape for name, value in got.items()})
    return got


def check_output_shapes(path: Path, spec: GraphSpec, fed: dict[str, tuple], got: dict[str, tuple]) -> None:
    """Every output of `spec` has the shape the manifest declares for it: each static dim equal, each symbolic
    dim the size it has wherever else it appears (bound by the inputs first: "batch" is the example's batch).
    An exporter or selection op that yields another token count than the declared N or K is caught here."""
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        for want, size in zip(tensor.shape, fed.get(tensor.name, ())):
            if isinstance(want, str):
                sizes.setdefault(want, int(size))
    for tensor in spec.outputs:
        actual = tuple(int(size) for size in got[tensor.name])
        expected = tuple(want if isinstance(want, int) else sizes.setdefault(want, size) for want, size in zip(tensor.shape, actual))
        if len(actual) != len(tensor.shape) or actual != expected:
            declared = "[" + ", ".join(map(str, tensor.shape)) + "]"
            raise ExportError(f"{path.name}: output '{tensor.name}' has shape {list(actual)} in ONNX Runtime, expected {declared} "
                              f"as the manifest declares" + (f" (= {list(expected)})" if len(actual) == len(tensor.shape) else ""))


def check_symbolic_dims(path: Path, inputs: list[tuple[str, str, tuple]], hint: str = "") -> None:
    """Every dim the manifest declares symbolic is symbolic in the ONNX graph's inputs. The dynamo exporter
    can silently fix a declared dynamic dim to the example's size (an op that reads the size as a Python int,
    e.g. a selection method whose indices are computed from N at trace time); such a graph would reject
    every other size at run time."""
    import onnx

    declared = {name: shape for name, _, shape in inputs}  # (name, dtype, shape) as the manifest will record them
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        for axis, (want, got) in enumerate(zip(declared.get(value.name, ()), value.type.tensor_type.shape.dim)):
            if isinstance(want, str) and got.HasField("dim_value"):
                raise ExportError(f"{path.name}: input '{value.name}' dim {axis} ({want!r}) was fixed to {got.dim_value} "
                                  f"by the exporter, expected it to stay dynamic{hint}")


def _same_sets(path: Path, name: str, expected: np.ndarray, actual: np.ndarray, min_overlap: float) -> None:
    """Integer [B, K] outputs (kept indices) compared as sets per example row."""
    for row, (ref_row, ort_row) in enumerate(zip(expected.reshape(len(expected), -1), actual.reshape(len(actual), -1))):
        overlap = metrics.kept_overlap(ref_row, ort_row) if ref_row.size else 1.0
        if not overlap >= min_overlap:
            share = "differ" if min_overlap >= 1 else f"overlap {overlap:.3f} (min {min_overlap})"
            raise ExportError(f"{path.name}: {name} of example row {row} {share} between torch and ONNX Runtime")


def _close(path: Path, name: str, expected: np.ndarray, actual: np.ndarray, tolerance: ExportTolerance) -> None:
    if expected.shape != actual.shape:
        raise ExportError(f"{path.name}: output '{name}' has shape {actual.shape} in ONNX Runtime, {expected.shape} in torch")
    if not expected.size:
        return
    if tolerance.max_abs is not None:
        diff = float(np.abs(expected - actual).max())
        if not diff <= tolerance.max_abs:
            raise ExportError(f"{path.name}: output '{name}' differs from torch by {diff:.3g} (max {tolerance.max_abs})")
    if tolerance.min_cosine is not None:
        cosine = metrics.cosine(expected, actual)
        if not cosine >= tolerance.min_cosine:
            raise ExportError(f"{path.name}: output '{name}' has cosine {cosine:.6f} to torch (min {tolerance.min_cosine})")
