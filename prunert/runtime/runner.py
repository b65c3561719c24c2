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
from prunert.runtime.huge_pages import Collapse

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
    rows              the rows it holds
    merge(other)      append the rows another session of the same graph holds (continuous batching: a request's own
                      prefill joins the running batch); the shorter side is left-padded to the longer's T
    keep(rows, trim)  only these rows stay, in this order, without their first `trim` positions (padding of every row)
    The cache is left-padded like the host's attention mask, so the mask the host keeps beside it stays valid.
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

    @property
    @abstractmethod
    def rows(self) -> int: ...

    @abstractmethod
    def merge(self, other: DecoderSession) -> None: ...

    @abstractmethod
    def keep(self, rows: Sequence[int], trim: int = 0) -> None: ...

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


def merge_caches(mine: list[np.ndarray], theirs: list[np.ndarray]) -> list[np.ndarray]:
    """Two left-padded caches [B1, H, T1, hd] and [B2, H, T2, hd] as one [B1 + B2, H, max T, hd] (zeros on the left)."""
    width = max(mine[0].shape[2], theirs[0].shape[2])

    def pad(cache: np.ndarray) -> np.ndarray:
        return np.pad(cache, [(0, 0), (0, 0), (width - cache.shape[2], 0), (0, 0)])

    return [np.concatenate([pad(a), pad(b)]) for a, b in zip(mine, theirs)]


def keep_caches(cache: list[np.ndarray], rows: Sequence[int], trim: int) -> list[np.ndarray]:
    """DecoderSession.keep on host caches [B, H, T, hd] -> [len(rows), H, T - trim, hd]."""
    index = np.asarray(rows, np.int64)
    return [np.ascontiguousarray(c[index][:, :, trim:]) for c in cache]


def empty_past(spec: GraphSpec, batch: int) -> list[np.ndarray]:
    """Zero-length past tensors [B, kv_heads, 0, head_dim] of a decoder graph, in its past_key_values.* order, with the
    dtype and sizes it declares."""
    tensors = [spec.input(name) for name in cache_names(spec).past]
    return [np.zeros((batch, t.shape[1], 0, t.shape[3]), np.dtype(t.dtype)) for t in tensors]


class HostRowsSession(DecoderSession):
    """A session whose rows join and leave through host copies of its cache: merge and keep are made on present()'s
    arrays and written back with _load (the numpy cache, ORT-CUDA's OrtValues, TensorRT's device buffers)."""

    @abstractmethod
    def _load(self, cache: list[np.ndarray]) -> None: ...

    def merge(self, other: DecoderSession) -> None:  # one host copy per admitted request
        self._load(merge_caches(self.present(), other.present()))

    def keep(self, rows: Sequence[int], trim: int = 0) -> None:
        self._load(keep_caches(self.present(), rows, trim))


class HostKVSession(HostRowsSession):
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

    @property
    def rows(self) -> int:
        return self.cache[0].shape[0]

    def _load(self, cache: list[np.ndarray]) -> None:
        self.cache = cache


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
        runtime: prunert.config.RuntimeConfig (threads, spinning, huge pages); None = its defaults (ORT's thread count, no
        spinning, huge pages for a CPU session's weights).
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
        self.device = "cuda" if names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.runtime = runtime
        self.huge_page_bytes = 0  # the session's weights collapsed into huge pages (prunert.runtime.huge_pages)
        if session is None:
            with Collapse(runtime.huge_pages and self.device == "cpu") as collapse:
                session = _open_session(ort, Path(path), options, list(providers))
            self.huge_page_bytes = collapse.bytes
        self.session = session
        self.output_names = [o.name for o in spec.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))

    def decoder_session(self, num_layers: int) -> DecoderSession:
        # On the GPU, IOBinding keeps the cache on the device. On the CPU it measured no faster than the
        # numpy round trip (21.4 vs 21.9 tok/s, llava-1.5-shaped K=64, best of 4): decode there is bound
        # by reading the weights, not by copying the cache, so the simpler session stays the default.
        if self.spec.kv_cache == KV_SHARED_BUFFER:
            from prunert.runtime.shared_kv import SharedBufferKVSession

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


class OrtBoundKVSession(HostRowsSession):
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

    @property
    def rows(self) -> int:
        return self.cache[0].shape()[0]

    def _load(self, cache: list[np.ndarray]) -> None:
        import onnxruntime as ort

        self.cache = [ort.OrtValue.ortvalue_from_numpy(c, self.runner.device, 0) for c in cache]
