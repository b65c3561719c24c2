"""Validation after export (as Optimum does): run each ONNX graph in ONNX Runtime on the batch-2
export examples, check every output's shape against what the manifest declares, and compare with the
torch module. Raises ExportError on any mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prunert.errors import ExportError
from prunert.manifest import GraphSpec
from prunert.runtime.runner import OnnxRuntimeRunner

MAX_ABS = 1e-3  # fp32 graph vs fp32 eager on random inputs


def _run(path: Path, spec: GraphSpec, args: tuple) -> dict[str, np.ndarray]:
    """ONNX Runtime on the export example; every output's shape checked against the spec (check_output_shapes)."""
    flat = [a for arg in args for a in (arg if isinstance(arg, tuple) else (arg,))]
    feeds = {t.name: value.numpy() for t, value in zip(spec.inputs, flat)}
    got = OnnxRuntimeRunner(path, spec).infer(feeds)
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


def validate_vision(module: torch.nn.Module, args: tuple, path: Path, spec: GraphSpec) -> None:
    with torch.no_grad():
        tokens, kept = module(*args)
    got = _run(path, spec, args)
    for row, (ref_row, ort_row) in enumerate(zip(kept.numpy(), got["kept_indices"])):
        if set(ref_row.tolist()) != set(ort_row.tolist()):
            raise ExportError(f"{path.name}: kept_indices of example row {row} differ between torch and ONNX Runtime")
    _close(path, "visual_tokens", tokens.numpy(), got["visual_tokens"])


def validate_decoder(module: torch.nn.Module, args: tuple, path: Path, spec: GraphSpec) -> None:
    with torch.no_grad():
        outputs = module(*args)
    got = _run(path, spec, args)
    for tensor, expected in zip(spec.outputs, outputs):
        _close(path, tensor.name, expected.numpy(), got[tensor.name])


def _close(path: Path, name: str, expected: np.ndarray, actual: np.ndarray) -> None:
    if expected.shape != actual.shape:
        raise ExportError(f"{path.name}: output '{name}' has shape {actual.shape} in ONNX Runtime, {expected.shape} in torch")
    diff = float(np.abs(expected - actual).max()) if expected.size else 0.0
    if not diff <= MAX_ABS:
        raise ExportError(f"{path.name}: output '{name}' differs from torch by {diff:.3g} (max {MAX_ABS})")
