"""Runners: one small interface, `infer(dict[str, ndarray]) -> dict[str, ndarray]`, checked against
the manifest's tensor specs before anything runs. Backends are imported lazily."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from prunert.errors import BackendUnavailableError, InputShapeError
from prunert.manifest import GraphSpec


class Runner(ABC):
    def __init__(self, spec: GraphSpec):
        self.spec = spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.spec, feeds)
        return self._run(feeds)

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_inputs(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> None:
    """Names, dtypes, ranks, static sizes, and one size per symbolic dim across all inputs."""
    expected = [t.name for t in spec.inputs]
    missing = [name for name in expected if name not in feeds]
    unknown = sorted(set(feeds) - set(expected))
    if missing or unknown:
        raise InputShapeError(f"{spec.file}: missing inputs {missing}, unknown inputs {unknown}; expected {expected}")
    bound: dict[str, tuple[int, str]] = {}
    for tensor in spec.inputs:
        value = feeds[tensor.name]
        if not isinstance(value, np.ndarray):
            raise InputShapeError(f"input '{tensor.name}': got {type(value).__name__}, expected a numpy array")
        if value.dtype != np.dtype(tensor.dtype):
            raise InputShapeError(f"input '{tensor.name}': got dtype {value.dtype}, expected {tensor.dtype}")
        shape_ok = value.ndim == len(tensor.shape) and all(
            isinstance(dim, str) or dim == size for dim, size in zip(tensor.shape, value.shape)
        )
        if not shape_ok:
            raise InputShapeError(f"input '{tensor.name}': got {tuple(value.shape)}, expected {tensor.describe()}")
        for dim, size in zip(tensor.shape, value.shape):
            if not isinstance(dim, str):
                continue
            if dim in bound and bound[dim][0] != size:
                other_size, other = bound[dim]
                raise InputShapeError(
                    f"input '{tensor.name}': got {tuple(value.shape)}, expected {tensor.describe()} with "
                    f"{dim}={other_size} as in input '{other}'"
                )
            bound.setdefault(dim, (size, tensor.name))


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session over one graph of an artifact (CPU by default)."""

    def __init__(self, path: Path, spec: GraphSpec, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
        super().__init__(spec)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("backend 'onnxruntime': package onnxruntime is not installed (pip install onnxruntime)") from None
        available = ort.get_available_providers()
        absent = [p for p in providers if p not in available]
        if absent:
            raise BackendUnavailableError(f"ONNX Runtime providers {absent} unavailable; this onnxruntime has {available}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.output_names = [o.name for o in spec.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))
