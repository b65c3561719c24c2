"""TensorRT backend: a Runner over one serialized engine, and a decoder session whose KV cache stays on
the GPU. tensorrt and cuda-python are imported lazily (BackendUnavailableError names the missing one);
no torch, no transformers.

Engines are not portable: the engine's recorded TensorRT version and compute capability are checked
against this machine BEFORE deserializing (a mismatch is an ArtifactError naming `prunert build`).

Device memory: one buffer per I/O tensor, shared by the per-profile execution contexts (one `infer` runs
at a time), allocated on first use and grown geometrically up to the tensor's largest profile shape,
never shrunk; empty tensors still get a valid (1-byte) address. Graph I/O is fp32/int64 in prunert
artifacts (reduced precision lives inside the graph); an engine with bf16/fp8 I/O is rejected, since
numpy has no such types.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from prunert.engines import import_tensorrt, trt_logger
from prunert.engines.cache import check_engine_compatible, select_engine
from prunert.engines.profiles import Profile, select_profile
from prunert.errors import ArtifactError, InputShapeError, PrunertError
from prunert.manifest import MANIFEST_NAME, EngineSpec, GraphSpec
from prunert.runtime import cuda as cuda_rt
from prunert.runtime.runner import HOST_INPUTS, LOGITS, HostRowsSession, Runner, check_inputs

_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8,
                "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


class TensorRTExecutionError(PrunertError):
    """TensorRT refused a shape or failed to enqueue the engine."""


def numpy_dtype(trt_dtype: Any, tensor: str) -> np.dtype:
    """numpy dtype of a trt.DataType; bf16/fp8/int4 I/O has none and is an ArtifactError."""
    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1].upper()
    if name not in _NUMPY_TYPES:
        raise ArtifactError(
            f"engine tensor '{tensor}' has TensorRT dtype {name}, which numpy cannot hold: prunert graphs keep "
            f"their inputs and outputs fp32/int64 (bf16/fp8 only inside the graph); rebuild from the artifact's graphs"
        )
    return np.dtype(_NUMPY_TYPES[name])


def _volume(shape: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in shape))


class TensorRTRunner(Runner):
    """TensorRTRunner(engine_path, spec, engine_spec): spec is the graph's manifest GraphSpec at the engine's precision."""

    def __init__(self, engine_path: Path | str, spec: GraphSpec, engine_spec: EngineSpec):
        super().__init__(spec)
        trt = import_tensorrt()
        check_engine_compatible(engine_spec, str(trt.__version__), cuda_rt.compute_capability())
        self.engine_spec = engine_spec
        self.stream = cuda_rt.Stream()
        self._buffers: dict[str, cuda_rt.DeviceBuffer] = {}
        self._runtime = trt.Runtime(trt_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"engine '{engine_path}': TensorRT {trt.__version__} cannot deserialize it (corrupt or from another "
                f"build); rebuild with `prunert build ARTIFACT --precision {engine_spec.precision}`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: numpy_dtype(self.engine.get_tensor_dtype(n), n) for n in names}
        self._check_against_spec()
        labels = [str(p.get("name", i)) for i, p in enumerate(engine_spec.profiles)]
        self.profiles: list[Profile] = []
        self.contexts: list[Any] = []
        for index in range(self.engine.num_optimization_profiles):
            shapes = {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, index)) for n in self.input_names}
            label = labels[index] if len(labels) == self.engine.num_optimization_profiles else str(index)
            self.profiles.append(Profile(label, shapes))  # type: ignore[arg-type]
            context = self.engine.create_execution_context()
            if context is None:
                raise cuda_rt.CudaError(f"engine '{engine_path}': TensorRT could not create an execution context (out of device memory?)")
            if not context.set_optimization_profile_async(index, int(self.stream)):
                raise TensorRTExecutionError(f"engine '{engine_path}': cannot select optimization profile {index}")
            self.contexts.append(context)
        self.stream.synchronize()
        self._max_bytes = self._largest_sizes()

    # ---- setup ---------------------------------------------------------------------------------
    def _check_against_spec(self) -> None:
        expected = {t.name: t.dtype for t in (*self.spec.inputs, *self.spec.outputs)}
        if sorted(self.input_names) != sorted(t.name for t in self.spec.inputs) or sorted(self.output_names) != sorted(
            t.name for t in self.spec.outputs
        ):
            raise ArtifactError(
                f"engine '{self.engine_spec.file}': tensors {sorted(self.input_names)} -> {sorted(self.output_names)} do not "
                f"match {MANIFEST_NAME}'s {self.spec.file}; rebuild with `prunert build ARTIFACT --precision {self.engine_spec.precision}`"
            )
        for name, dtype in expected.items():
            if self.dtypes[name] != np.dtype(dtype):
                raise ArtifactError(f"engine '{self.engine_spec.file}': tensor '{name}' is {self.dtypes[name]}, the manifest says {dtype}")

    def _largest_sizes(self) -> dict[str, int]:
        """Bytes of each tensor at its largest profile shape (outputs via the manifest's symbolic dims)."""
        dims: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for profile in self.profiles:
            for tensor in self.spec.inputs:
                high = profile.max_shape(tensor.name)
                sizes[tensor.name] = max(sizes.get(tensor.name, 0), _volume(high) * self.dtypes[tensor.name].itemsize)
                for dim, size in zip(tensor.shape, high):
                    if isinstance(dim, str):
                        dims[dim] = max(dims.get(dim, 0), int(size))
        for tensor in self.spec.outputs:
            if all(isinstance(d, int) or d in dims for d in tensor.shape):
                shape = [d if isinstance(d, int) else dims[d] for d in tensor.shape]
                sizes[tensor.name] = _volume(shape) * self.dtypes[tensor.name].itemsize
        return sizes

    # ---- device memory -------------------------------------------------------------------------
    def buffer(self, name: str, nbytes: int) -> cuda_rt.DeviceBuffer:
        """The tensor's device buffer, grown (geometrically, up to its largest profile size) to hold nbytes."""
        current = self._buffers.get(name)
        if current is not None and current.nbytes >= nbytes:
            return current
        cap = self._max_bytes.get(name, nbytes)
        size = max(nbytes, min(2 * (current.nbytes if current else 0), cap))
        if current is not None:
            self.stream.synchronize()  # nothing queued may still use the old buffer
            current.free()
        self._buffers[name] = cuda_rt.DeviceBuffer(size)
        return self._buffers[name]

    def context_for(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        index = select_profile(self.profiles, shapes)
        if index < 0:
            ranges = "; ".join(
                f"{p.name}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.shapes.items()) for p in self.profiles
            )
            got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
            raise InputShapeError(f"engine '{self.engine_spec.file}': no optimization profile holds {got} (profiles: {ranges})")
        return self.contexts[index]

    def bind_input(self, context: Any, name: str, array: np.ndarray, keep: list[np.ndarray]) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtypes[name])
        if not context.set_input_shape(name, tuple(int(d) for d in array.shape)):
            raise TensorRTExecutionError(f"engine '{self.engine_spec.file}': TensorRT rejected shape {array.shape} for input '{name}'")
        target = self.buffer(name, array.nbytes)
        target.copy_from_host(array, self.stream)
        keep.append(array)  # alive until the stream is synchronized
        context.set_tensor_address(name, int(target))

    def output_shape(self, context: Any, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise TensorRTExecutionError(f"engine '{self.engine_spec.file}': output '{name}' has unresolved shape {shape}")
        return shape

    def execute(self, context: Any) -> None:
        if not context.execute_async_v3(int(self.stream)):
            raise TensorRTExecutionError(f"engine '{self.engine_spec.file}': TensorRT failed to enqueue the engine")

    # ---- Runner --------------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context = self.context_for({n: tuple(feeds[n].shape) for n in self.input_names})
        keep: list[np.ndarray] = []
        for name in self.input_names:
            self.bind_input(context, name, feeds[name], keep)
        results: dict[str, tuple[np.ndarray, cuda_rt.DeviceBuffer]] = {}
        for name in self.output_names:
            out = np.empty(self.output_shape(context, name), self.dtypes[name])
            target = self.buffer(name, out.nbytes)
            context.set_tensor_address(name, int(target))
            results[name] = (out, target)
        self.execute(context)
        for out, source in results.values():
            source.copy_to_host(out, self.stream)
        self.stream.synchronize()
        return {t.name: results[t.name][0] for t in self.spec.outputs}

    def decoder_session(self, num_layers: int) -> "TensorRTDecoderSession":
        return TensorRTDecoderSession(self, num_layers)

    def close(self) -> None:
        """Free contexts, then the engine, then device buffers (also done when the runner is collected)."""
        if getattr(self, "stream", None) is not None and getattr(self, "_buffers", None):
            self.stream.synchronize()
        self.contexts = []
        self.engine = None
        for buffer in getattr(self, "_buffers", {}).values():
            buffer.free()
        self._buffers = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TensorRTDecoderSession(HostRowsSession):
    """KV cache on the device: per layer two buffers [B, kv_heads, max_total, head_dim] used ping-pong.

    Step t binds past = front buffer viewed as [B, H, past, Dh] and present = back buffer (written densely
    as [B, H, past + S, Dh], exactly the layout the next step reads as its past), then swaps them. Only
    inputs_embeds, attention_mask and position_ids go to the device and only logits come back.
    """

    runner: TensorRTRunner

    def __init__(self, runner: TensorRTRunner, num_layers: int):
        super().__init__(runner, num_layers)
        spec = runner.spec
        self.max_total = max(p.max_shape("attention_mask")[-1] for p in runner.profiles)  # past + sequence
        self.max_batch = max(p.max_shape(self.past_names[0])[0] for p in runner.profiles)
        first = spec.input(self.past_names[0])
        if not (isinstance(first.shape[1], int) and isinstance(first.shape[3], int)):
            raise ArtifactError(f"{spec.file}: past tensors need static heads and head_dim, got {first.describe()}")
        self.heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.dtype = runner.dtypes[self.past_names[0]]
        self.logits_name = LOGITS
        self._front: list[cuda_rt.DeviceBuffer] = []
        self._back: list[cuda_rt.DeviceBuffer] = []
        self._capacity = 0
        self.batch = 0
        self.length = 0

    def reset(self, batch: int) -> None:
        if not 1 <= batch <= self.max_batch:
            raise InputShapeError(f"decoder session: batch {batch}, expected 1..{self.max_batch} (the engine's profiles)")
        if batch > self._capacity:
            self.runner.stream.synchronize()
            for buffer in self._front + self._back:
                buffer.free()
            nbytes = batch * self.heads * self.max_total * self.head_dim * self.dtype.itemsize
            self._front = [cuda_rt.DeviceBuffer(nbytes) for _ in self.past_names]
            self._back = [cuda_rt.DeviceBuffer(nbytes) for _ in self.present_names]
            self._capacity = batch
        self.batch, self.length = batch, 0

    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if self.batch == 0:
            raise InputShapeError("decoder session: call reset(batch) before run")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != self.batch:
            raise InputShapeError(f"inputs_embeds: got {inputs_embeds.shape}, but the session was reset for batch {self.batch}")
        past_shape = (self.batch, self.heads, self.length, self.head_dim)
        empty = np.zeros((), self.dtype)
        feeds = dict(zip(HOST_INPUTS, (inputs_embeds, attention_mask, position_ids)))
        check_inputs(self.runner.spec, {**feeds, **{n: np.broadcast_to(empty, past_shape) for n in self.past_names}})
        steps = inputs_embeds.shape[1]
        total = self.length + steps
        if attention_mask.shape[-1] != total:
            raise InputShapeError(f"attention_mask: got length {attention_mask.shape[-1]}, expected past + sequence = {self.length} + {steps}")
        if total > self.max_total:
            raise InputShapeError(f"decoder session: {total} tokens exceed the engine's maximum sequence {self.max_total}")
        shapes = {name: tuple(value.shape) for name, value in feeds.items()}
        shapes.update({name: past_shape for name in self.past_names})
        runner = self.runner
        context = runner.context_for(shapes)
        keep: list[np.ndarray] = []
        for name, value in feeds.items():
            runner.bind_input(context, name, value, keep)
        for name, buffer in zip(self.past_names, self._front):
            if not context.set_input_shape(name, past_shape):
                raise TensorRTExecutionError(f"engine '{runner.engine_spec.file}': TensorRT rejected shape {past_shape} for '{name}'")
            context.set_tensor_address(name, int(buffer))
        for name, buffer in zip(self.present_names, self._back):
            shape = runner.output_shape(context, name)
            if shape != (self.batch, self.heads, total, self.head_dim):
                raise TensorRTExecutionError(f"engine output '{name}' has shape {shape}, expected {(self.batch, self.heads, total, self.head_dim)}")
            context.set_tensor_address(name, int(buffer))
        logits = np.empty(runner.output_shape(context, self.logits_name), runner.dtypes[self.logits_name])
        target = runner.buffer(self.logits_name, logits.nbytes)
        context.set_tensor_address(self.logits_name, int(target))
        runner.execute(context)
        target.copy_to_host(logits, runner.stream)
        runner.stream.synchronize()
        self._front, self._back = self._back, self._front
        self.length = total
        return logits

    @property
    def rows(self) -> int:
        return self.batch

    def _load(self, cache: list[np.ndarray]) -> None:
        """The front buffers from host caches [B, H, T, hd] (B >= 1; an empty batch holds nothing on the device)."""
        batch, length = cache[0].shape[0], cache[0].shape[2]
        if batch:
            self.reset(batch)
            held = [np.ascontiguousarray(array, self.dtype) for array in cache]  # alive until the stream syncs
            for array, buffer in zip(held, self._front):
                buffer.copy_from_host(array, self.runner.stream)
            self.runner.stream.synchronize()
        self.batch, self.length = batch, length if batch else 0

    def present(self) -> list[np.ndarray]:
        if self.length == 0:
            return self.empty_past(self.batch)
        shape = (self.batch, self.heads, self.length, self.head_dim)
        arrays = [np.empty(shape, self.dtype) for _ in self._front]
        for array, buffer in zip(arrays, self._front):
            buffer.copy_to_host(array, self.runner.stream)
        self.runner.stream.synchronize()
        return arrays


def load_trt_runner(artifact: Any, graph: str, precision: str = "fp32") -> TensorRTRunner:
    """The TensorRT runner for one graph of an artifact (Artifact or directory), using the engine built for
    this machine's TensorRT version and GPU; none is an ArtifactError naming `prunert build`."""
    from prunert.runtime.artifact import Artifact

    opened = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    trt = import_tensorrt()
    engine = select_engine(opened.manifest, graph, precision, str(trt.__version__), cuda_rt.compute_capability())
    return TensorRTRunner(opened.path(engine.file), opened.manifest.graph_spec(graph, precision), engine)
