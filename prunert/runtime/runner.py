"""Runners: one small interface, `infer(dict[str, ndarray]) -> dict[str, ndarray]`, checked against
the manifest's tensor specs before anything runs. Backends are imported lazily."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from prunert.errors import ArtifactError, BackendUnavailableError, InputShapeError
from prunert.manifest import KV_SHARED_BUFFER, GraphSpec

# The decoder graph's declared tensor names (prunert.export.graphs writes them; Optimum / onnxruntime-genai use the same)
HOST_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")  # what the host feeds every step
LOGITS = "logits"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."  # past_key_values.{i}.key -> present.{i}.key


@dataclass(frozen=True)
class CacheNames:
    """The decoder's KV-cache tensors by their declared names: past[j] is fed what present[j] returned."""

    past: tuple[str, ...]  # inputs past_key_values.{i}.key/value, in the graph's input order
    present: tuple[str, ...]  # outputs present.{i}.key/value, the same layer and kind as past[j]


def cache_names(spec: GraphSpec, num_layers: int | None = None) -> CacheNames:
    """The KV-cache names of a decoder GraphSpec, found by name (never by position): every past_key_values.X input
    pairs with the output present.X, no present.* output is left unpaired, and (num_layers given) there are 2 per layer."""
    past = tuple(t.name for t in spec.inputs if t.name.startswith(PAST_PREFIX))
    present = tuple(PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in past)
    outputs = [t.name for t in spec.outputs]
    missing = [name for name in present if name not in outputs]
    unpaired = [name for name in outputs if name.startswith(PRESENT_PREFIX) and name not in present]
    if missing or unpaired or LOGITS not in outputs:
        raise ArtifactError(f"{spec.file}: decoder outputs {outputs} do not match its past inputs {list(past)}: expected "
                            f"'{LOGITS}' and one {PRESENT_PREFIX}X per {PAST_PREFIX}X (missing {missing}, unpaired {unpaired})")
    if num_layers is not None and len(past) != 2 * num_layers:
        raise ArtifactError(f"{spec.file}: {len(past)} {PAST_PREFIX}* inputs, expected {2 * num_layers} (key and value "
                            f"for each of the manifest's {num_layers} layers)")
    return CacheNames(past, present)


class Runner(ABC):
    def __init__(self, spec: GraphSpec):
        self.spec = spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.spec, feeds)
        return self._run(feeds)

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decoder_session(self, num_layers: int) -> "DecoderSession":
        """A step-by-step decoder over this runner's graph. Backends that can keep the KV cache on
        their device override this; the default round-trips it through numpy on every step."""
        return HostKVSession(self, num_layers)


class DecoderSession(ABC):
    """Runs the decoder graph step by step and owns the KV cache between steps.

    reset(batch)      empty cache for a new batch
    run(embeds, mask, positions) -> logits [B, S, V]; appends the step's keys/values to the cache
                      embeds [B, S, D], mask [B, past + S], positions [B, S] (or the family's layout, [3, B, S])
    present()         host copy of the cache: 2 x layers arrays [B, kv_heads, T, head_dim] (parity, tests)
    """

    def __init__(self, runner: Runner, num_layers: int):
        self.runner = runner
        self.num_layers = num_layers
        names = cache_names(runner.spec, num_layers)
        self.past_names, self.present_names = list(names.past), list(names.present)

    @abstractmethod
    def reset(self, batch: int) -> None: ...

    @abstractmethod
    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def present(self) -> list[np.ndarray]: ...

    def host_feeds(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, batch: int,
                   cached: int) -> dict[str, np.ndarray]:
        """The step's host inputs by name, checked against the spec, and the mask against the cache a session holds
        itself ([batch, cached + S]): the sessions that keep the cache on their side feed only these."""
        feeds = dict(zip(HOST_INPUTS, (inputs_embeds, attention_mask, position_ids)))
        check_inputs(self.runner.spec, feeds, only=HOST_INPUTS)
        new = inputs_embeds.shape[1]
        if attention_mask.shape != (batch, cached + new):
            raise InputShapeError(f"input 'attention_mask': got {attention_mask.shape}, expected ({batch}, {cached + new}) "
                                  f"(cached {cached} + new {new} positions)")
        return feeds

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return empty_past(self.runner.spec, batch)


def empty_past(spec: GraphSpec, batch: int) -> list[np.ndarray]:
    """Zero-length past tensors [B, kv_heads, 0, head_dim] of a decoder graph, in its past_key_values.* order, with the
    dtype and sizes it declares."""
    tensors = [spec.input(name) for name in cache_names(spec).past]
    return [np.zeros((batch, t.shape[1], 0, t.shape[3]), np.dtype(t.dtype)) for t in tensors]


class HostKVSession(DecoderSession):
    """The KV cache lives in numpy arrays; every step feeds them in and takes the new ones out."""

    def reset(self, batch: int) -> None:
        self.cache = self.empty_past(batch)

    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = dict(zip(HOST_INPUTS, (inputs_embeds, attention_mask, position_ids)))
        out = self.runner.infer({**feeds, **dict(zip(self.past_names, self.cache))})
        self.cache = [out[name] for name in self.present_names]
        return out[LOGITS]

    def present(self) -> list[np.ndarray]:
        return list(self.cache)


def check_inputs(spec: GraphSpec, feeds: dict[str, np.ndarray], only: Sequence[str] | None = None) -> None:
    """Names, dtypes, ranks, static sizes, and one size per symbolic dim across all inputs.
    only: check just these inputs (a decoder session holds the KV cache itself)."""
    expected = [t.name for t in spec.inputs if only is None or t.name in only]
    missing = [name for name in expected if name not in feeds]
    unknown = sorted(set(feeds) - set(expected))
    if missing or unknown:
        raise InputShapeError(f"{spec.file}: missing inputs {missing}, unknown inputs {unknown}; expected {expected}")
    bound: dict[str, tuple[int, str]] = {}
    for tensor in spec.inputs:
        if tensor.name not in expected:
            continue
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
            if dim in spec.dim_ranges and not spec.dim_ranges[dim][0] <= size <= spec.dim_ranges[dim][2]:
                low, _, high = spec.dim_ranges[dim]
                raise InputShapeError(f"input '{tensor.name}': got {tuple(value.shape)}, expected {tensor.describe()} with "
                                      f"{dim} in {low}..{high} (the exported range)")


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session over one graph of an artifact (CPU by default)."""

    def __init__(self, path: Path, spec: GraphSpec, providers: Sequence[Any] = ("CPUExecutionProvider",), runtime: Any = None,
                 session_config: dict[str, str] | None = None, session: Any = None):
        """providers: names or (name, options) pairs, as ONNX Runtime takes them.
        runtime: prunert.config.RuntimeConfig (threads, spinning); None = its defaults (ORT's thread count, no spinning).
        session_config: SessionOptions config entries a graph variant needs (its manifest settings say which).
        session: an InferenceSession already open over `path` with options of the caller's (export validation's lean
        one, prunert.export.validate.ort_session); providers, runtime and session_config then do not apply."""
        from prunert.config import RuntimeConfig

        super().__init__(spec)
        runtime = runtime or RuntimeConfig()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("backend 'onnxruntime': package onnxruntime is not installed (pip install onnxruntime)") from None
        available = ort.get_available_providers()
        names = [p if isinstance(p, str) else p[0] for p in providers]
        absent = [name for name in names if name not in available]
        if absent:
            raise BackendUnavailableError(f"ONNX Runtime providers {absent} unavailable; this onnxruntime has {available}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if runtime.threads:
            options.intra_op_num_threads = runtime.threads
        for key, value in {**runtime.session_config(), **(session_config or {})}.items():
            options.add_session_config_entry(key, str(value))
        self.session = session or _open_session(ort, Path(path), options, list(providers))
        self.output_names = [o.name for o in spec.outputs]
        self.device = "cuda" if names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))

    def decoder_session(self, num_layers: int) -> DecoderSession:
        # On the GPU, IOBinding keeps the cache on the device. On the CPU it measured no faster than the
        # numpy round trip (21.4 vs 21.9 tok/s, llava-1.5-shaped K=64, best of 4): decode there is bound
        # by reading the weights, not by copying the cache, so the simpler session stays the default.
        if self.spec.kv_cache == KV_SHARED_BUFFER:
            return SharedBufferKVSession(self, num_layers)
        if self.device == "cuda":
            return OrtBoundKVSession(self, num_layers)
        return HostKVSession(self, num_layers)


def _open_session(ort: Any, path: Path, options: Any, providers: list[Any]) -> Any:
    """An InferenceSession over the graph file; one that ONNX Runtime cannot load (corrupt or truncated, e.g. under
    --no-verify, or its external data) is an ArtifactError naming it, not ONNX Runtime's traceback."""
    if not path.is_file():
        raise ArtifactError(f"graph '{path}': file not found")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) from its C++ core
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"graph '{path}': ONNX Runtime cannot load it ({reason}); without --no-verify its sha256 is checked") from None


class OrtBoundKVSession(DecoderSession):
    """ONNX Runtime IOBinding: the present tensors of one step are bound, as OrtValues on the session's
    device, as the past of the next; only embeds/mask/positions go in and logits come out each step."""

    runner: OnnxRuntimeRunner

    def reset(self, batch: int) -> None:
        import onnxruntime as ort

        self.cache = [ort.OrtValue.ortvalue_from_numpy(past, self.runner.device, 0) for past in self.empty_past(batch)]

    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = self.host_feeds(inputs_embeds, attention_mask, position_ids, self.cache[0].shape()[0], self.cache[0].shape()[2])
        binding = self.runner.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.past_names, self.cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS)  # host
        for name in self.present_names:
            binding.bind_output(name, self.runner.device)
        self.runner.session.run_with_iobinding(binding)
        outputs = dict(zip([LOGITS, *self.present_names], binding.get_outputs()))  # in the order bound
        self.cache = [outputs[name] for name in self.present_names]
        return outputs[LOGITS].numpy()

    def present(self) -> list[np.ndarray]:
        return [value.numpy() for value in self.cache]


class SharedBufferKVSession(DecoderSession):
    """A graph whose past and present are one buffer (manifest kv_cache "shared-buffer", prunert.export.fused_decoder):
    past_key_values.{i}.* are preallocated once per batch at the cache capacity, [B, kv_heads, capacity, head_dim],
    and bound as both the input and the present.{i}.* output, so each step writes only its own rows (no copy of
    the cache). The graph keeps each row's tokens from slot 0 and reads its length from the mask's count of ones;
    the host's protocol is the standard graph's (a left-padded prefill, then one mask column more per step), so
    the prefill's rows are shifted to slot 0 on the way in and their logits back on the way out."""

    runner: OnnxRuntimeRunner

    def __init__(self, runner: Runner, num_layers: int):
        super().__init__(runner, num_layers)
        self.capacity = runner.spec.dim_ranges["cache"][2]  # the artifact's max_sequence
        self.buffers: list[Any] = []
        self.length = 0
        self.padding = np.zeros(0, np.int64)  # [B] the prefill's left padding per row

    def reset(self, batch: int) -> None:
        import onnxruntime as ort

        self.length, self.padding = 0, np.zeros(batch, np.int64)
        if self.buffers and self.buffers[0].shape()[0] == batch:
            return  # slots past a row's length are never read: the old contents need no clearing
        specs = [self.runner.spec.input(name) for name in self.past_names]
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type((batch, spec.shape[1], self.capacity, spec.shape[3]),
                                                                 np.dtype(spec.dtype), self.runner.device, 0) for spec in specs]
        self.binding = self.runner.session.io_binding()  # bound once; each step rebinds only the host inputs
        self.binding.bind_output(LOGITS)  # host; rebound by each run (allocated by it)
        for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)  # the same buffer: written in place

    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = self.host_feeds(inputs_embeds, attention_mask, position_ids, self.buffers[0].shape()[0], self.length)
        new = inputs_embeds.shape[1]
        if self.length + new > self.capacity:
            raise InputShapeError(f"input 'inputs_embeds': {self.length} cached + {new} new positions exceed the KV cache's "
                                  f"{self.capacity} (the artifact's max_sequence)")
        first = self.length == 0
        if first:  # [B, S, D] and positions [..., B, S]: each row's tokens from slot 0
            self.padding = left_padding(attention_mask)
            feeds[HOST_INPUTS[0]] = shift_rows(inputs_embeds, -self.padding, axis=1)
            feeds[HOST_INPUTS[2]] = shift_rows(position_ids, -self.padding, axis=-1)
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.binding.bind_output(LOGITS)  # unallocated again: its shape changes from prefill to decode
        self.runner.session.run_with_iobinding(self.binding)
        self.length += new
        logits = self.binding.get_outputs()[0].numpy()  # [B, S, V], bound first
        return shift_rows(logits, self.padding, axis=1) if first else logits  # the host's layout: each row's last token at -1

    def present(self) -> list[np.ndarray]:
        """The cache in the host's left-padded layout, [B, kv_heads, length, head_dim]: zeros where a row is padded."""
        out = []
        for buffer in self.buffers:
            held = buffer.numpy()[:, :, : self.length]
            cache = np.zeros_like(held)
            for row, pad in enumerate(self.padding):
                cache[row, :, pad:] = held[row, :, : self.length - pad]
            out.append(cache)
        return out


def left_padding(mask: np.ndarray) -> np.ndarray:
    """mask [B, S] of a prefill -> each row's count of leading zeros [B]; a row whose zeros are not all leading is an
    InputShapeError (the host pads on the left only)."""
    pad = mask.shape[1] - mask.sum(axis=1)  # [B]
    aligned = np.arange(mask.shape[1])[None] >= pad[:, None]  # [B, S]: the mask a left-padded row has
    if not (mask.astype(bool) == aligned).all():
        row = int(np.flatnonzero((mask.astype(bool) != aligned).any(axis=1))[0])
        raise InputShapeError(f"input 'attention_mask': row {row} of the prefill is not left-padded (expected zeros, then ones)")
    return pad.astype(np.int64)


def shift_rows(x: np.ndarray, shift: np.ndarray, axis: int) -> np.ndarray:
    """Roll each batch row of x along `axis` by its own shift (> 0: towards the end); the batch axis is the one before
    `axis` ([B, S, ...] with axis 1, or [..., B, S] with axis -1). No shift: x itself."""
    if not shift.any():
        return x
    axis = axis % x.ndim
    size = x.shape[axis]
    index = (np.arange(size)[None] - shift[:, None]) % size  # [B, S]: source of each destination slot
    shape = [1] * x.ndim
    shape[axis - 1], shape[axis] = index.shape
    return np.take_along_axis(x, index.reshape(shape), axis=axis)
