"""`prunert plan`: the memory an artifact needs at batch B and sequence S, from its manifest and file sizes alone.

Nothing is loaded: no graph is parsed, no session opened, no torch. Weights are the graph files' sizes (a variant the
artifact has is measured from its files; one it lacks is estimated from the fp32 graph's parameter count, its bytes / 4).
Two paths are planned, each with its own total and verdict:
- "tensorrt": the standard-op `decoder` graph on the device's GPU (TensorRT engines, or ORT-CUDA), KV ping-pong buffers;
- "onnxruntime-cpu": `decoder_fused` where the precision's graph set has it (in-place KV preallocated at S), else `decoder`.
Jetson memory is one pool shared by CPU and GPU, so both totals count the process, the host arrays and the embedding table.
The CPU terms are calibrated against the peak RSS (VmHWM) of the ONNX Runtime CPU pipeline, within 15% in
tests/runtime/test_memory_plan.py (-8% .. +3% on the points measured: fused, standard and int4 decoders, a mid-size
and the llava-1.5-shaped artifact); the GPU-only terms (CUDA/TensorRT runtime) are assumptions, not measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from prunert.config import FUSED_DECODER, GRAPH_ROLES, WEIGHT_ONLY_PRECISIONS, EngineBuildConfig, GraphPrecisions, role_precisions
from prunert.errors import ConfigError
from prunert.manifest import KV_SHARED_BUFFER, GraphSpec, Manifest
from prunert.runtime.pipeline import DECODER_GRAPHS
from prunert.runtime.runner import PAST_PREFIX

MIB, GIB = 1 << 20, 1 << 30
DEVICES_FILE = Path(__file__).resolve().parents[1] / "data" / "devices.json"
PATHS = ("tensorrt", "onnxruntime-cpu")
PATH_BACKENDS = {"tensorrt": "trt", "onnxruntime-cpu": "onnxruntime"}  # the pipeline backend each path plans for
FP32 = 4  # bytes per fp32 value: activations, logits and attention scores are counted in fp32
# Bytes per parameter of a weight graph at a precision it has not been made at yet (a made one is measured from its files).
# int8/fp8: 1 B + one fp32 scale per output channel (taken as one per hidden_size weights); int4: 0.5 B + one fp32 scale
# per block of PlanConfig.int4_block weights, as `prunert quantize --weights int4` writes both forms (symmetric, no zero
# point; lm_head included). The fp32 norms, biases and selection op are left at these rates (< 1% of a real graph).
FLOAT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
INT4_SCALE_BYTES = 4.0  # an fp32 scale per int4 block


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    memory_bytes: int
    memory: str  # the datasheet's memory line
    source: str  # where memory_bytes comes from


def devices() -> dict[str, Device]:
    """The device table (prunert/data/devices.json): name -> Device."""
    rows = json.loads(DEVICES_FILE.read_text())["devices"]
    return {row["name"]: Device(row["name"], row["title"], int(row["memory_gib"] * GIB), row["memory"], row["source"]) for row in rows}


def resolve_device(text: str) -> Device:
    """--device: a name from the table, or a memory size in GiB (12.5)."""
    table = devices()
    if text in table:
        return table[text]
    expected = f"expected one of {list(table)} or a memory size in GiB such as 12.5"
    try:
        gib = float(text)
    except ValueError:
        raise ConfigError(f"--device: got {text!r}, {expected}") from None
    if not (math.isfinite(gib) and 0 < gib <= 1 << 20):
        raise ConfigError(f"--device: got {text!r}, {expected} (a finite size > 0)")
    return Device("custom", f"{gib:g} GiB", int(gib * GIB), f"{gib:g} GiB", "--device (given on the command line)")


@dataclass(frozen=True)
class PlanConfig:
    """What to plan for and the model's constants, in one place.

    batch, max_seq: B and S (None: the manifest's text.max_sequence); precisions: per graph role.
    os_reserve_bytes: taken off the device's memory for firmware carve-outs and the OS. An ASSUMPTION: the datasheets
        give no figure (a headless L4T); pass the free memory your device reports as --device GB instead.
    CPU terms, measured here as peak RSS (x86-64 Linux, CPython 3.11, onnxruntime 1.32, numpy 2.4):
    process_bytes: python + numpy + onnxruntime + tokenizers + pillow imported, nothing loaded (60 MB).
    session_bytes: one ONNX Runtime CPU session beyond its weights (tiny artifact: 17 MB for two sessions).
    load_transient: while a session loads, its graph file is resident a second time in part (the largest initializers
        are copied): the load peak is weights * (1 + load_transient).
    arena_factor: ONNX Runtime's CPU arena grows in power-of-two regions, so the memory a run touches exceeds the
        live tensors; the activation estimates are multiplied by it.
    GPU terms, ASSUMPTIONS (no Jetson was measured):
    gpu_runtime_bytes: CUDA context, TensorRT runtime, cuBLAS/cuDNN handles and their kernels.
    workspace_bytes: TensorRT's tactic scratch cap (EngineBuildConfig.workspace_bytes, `prunert build --workspace-gb`),
        counted in full: the worst case an engine may take.
    vision_head_dim: the vision tower's head width, for its head count (hidden / 64); the manifest does not record it.
    """

    batch: int = 1
    max_seq: int | None = None
    precisions: GraphPrecisions = field(default_factory=GraphPrecisions)
    os_reserve_bytes: int = 1 * GIB
    process_bytes: int = 60 * MIB
    session_bytes: int = int(8.5 * MIB)
    load_transient: float = 0.05
    arena_factor: float = 1.25
    gpu_runtime_bytes: int = 1 * GIB
    workspace_bytes: int = EngineBuildConfig().workspace_bytes
    int4_block: int = 32
    vision_head_dim: int = 64

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ConfigError(f"--batch: got {self.batch}, expected an integer >= 1")
        if self.max_seq is not None and self.max_seq < 1:
            raise ConfigError(f"--max-seq: got {self.max_seq}, expected an integer >= 1")


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    how: str  # how it is counted


@dataclass(frozen=True)
class PathEstimate:
    path: str  # one of PATHS
    components: tuple[Component, ...]

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)


@dataclass(frozen=True)
class WeightCell:
    graph: str
    precision: str
    bytes: int
    measured: bool  # False: estimated from the fp32 parameter count


@dataclass(frozen=True)
class Verdict:
    path: str
    fits: bool
    total: int
    usable: int
    changes: tuple[str, ...]  # what to change when it does not fit (each one fits on its own)


@dataclass(frozen=True)
class Plan:
    device: Device
    batch: int
    max_seq: int
    prefill: int  # longest prefill: min(S, the longest prompt with its K visual tokens)
    precisions: GraphPrecisions
    weights: tuple[WeightCell, ...]
    paths: tuple[PathEstimate, ...]
    verdicts: tuple[Verdict, ...]
    notes: tuple[str, ...]


# ---- weights ------------------------------------------------------------------------------------------------------
def graph_bytes(directory: Path, spec: GraphSpec) -> int:
    """Bytes of a graph's files (the .onnx and its external data)."""
    names = [spec.file] + ([spec.external_data] if spec.external_data else [])
    return sum((directory / name).stat().st_size for name in names)


def parameter_count(directory: Path, manifest: Manifest, graph: str) -> int:
    """Parameters of a graph: its fp32 file bytes / 4 (the protobuf's own bytes are < 1% of a real graph)."""
    return graph_bytes(directory, manifest.graphs[graph]) // FP32


def estimated_bytes(params: int, precision: str, hidden: int, block: int) -> int:
    if precision in FLOAT_BYTES:
        return int(params * FLOAT_BYTES[precision])
    if precision == "int4":
        return int(params * (0.5 + INT4_SCALE_BYTES / block))
    return int(params * (1.0 + FP32 / hidden))  # int8 / fp8: per-channel scales


def weight_cell(directory: Path, manifest: Manifest, graph: str, precision: str, path: str, config: PlanConfig) -> WeightCell:
    """A graph's weights at a precision: measured from the variant's files (or the engine built from them, on the
    tensorrt path), else estimated from the fp32 parameter count."""
    if path == "tensorrt":
        engines = [e for e in manifest.engines if e.graph == graph and e.precision == precision]
        if engines:
            return WeightCell(graph, precision, max((directory / e.file).stat().st_size for e in engines), True)
    if made(manifest, graph, precision):
        return WeightCell(graph, precision, graph_bytes(directory, manifest.graph_spec(graph, precision)), True)
    params = parameter_count(directory, manifest, graph)
    return WeightCell(graph, precision, estimated_bytes(params, precision, manifest.decoder.hidden_size, config.int4_block), False)


def weight_table(directory: Path, manifest: Manifest, config: PlanConfig) -> tuple[WeightCell, ...]:
    """Every graph of the artifact at every precision its role may run at (the ONNX files, as the CPU path loads them)."""
    return tuple(weight_cell(directory, manifest, graph, precision, "onnxruntime-cpu", config)
                 for graph in manifest.graphs for precision in role_precisions(GRAPH_ROLES[graph]) if has_form(manifest, graph, precision))


def decoder_graph(manifest: Manifest, path: str, precision: str) -> str:
    """The decoder form a path runs at a precision, as the pipeline picks it (pipeline.DECODER_GRAPHS: the CPU the fused
    form where the precision's graph set has it). A variant not made yet has the fused form only if it is weight-only
    (int4); `convert` / `calibrate` variants have the standard form alone."""
    forms = DECODER_GRAPHS[PATH_BACKENDS[path]]
    return next((graph for graph in forms if has_form(manifest, graph, precision)), "decoder")


def made(manifest: Manifest, graph: str, precision: str) -> bool:
    """The artifact has the graph at the precision (fp32, or a variant that lists it)."""
    return (precision == "fp32" or precision in manifest.variants) and manifest.has_graph(graph, precision)


def has_form(manifest: Manifest, graph: str, precision: str) -> bool:
    """Whether a graph exists at a precision, or (a variant not made yet) would."""
    if precision == "fp32" or precision in manifest.variants:
        return manifest.has_graph(graph, precision)
    return graph in manifest.graphs and (graph != FUSED_DECODER or precision in WEIGHT_ONLY_PRECISIONS)


def shared_kv(manifest: Manifest, graph: str, precision: str) -> bool:
    """Past and present are one buffer preallocated at S (GraphSpec.kv_cache), as the graph (or its fp32 form) declares."""
    spec = manifest.graph_spec(graph, precision) if made(manifest, graph, precision) else manifest.graphs[graph]
    return spec.kv_cache == KV_SHARED_BUFFER


# ---- KV cache and activations ------------------------------------------------------------------------------------
def kv_itemsize(manifest: Manifest, graph: str, precision: str) -> int:
    """Bytes per KV value, as the graph's past inputs declare it (the runtime feeds what the graph declares); a variant
    not made yet keeps its fp32 graph's KV I/O, as `convert`, `calibrate` and `quantize` write them today."""
    spec = manifest.graph_spec(graph, precision) if made(manifest, graph, precision) else manifest.graphs[graph]
    past = next(t for t in spec.inputs if t.name.startswith(PAST_PREFIX))
    return np.dtype(past.dtype).itemsize


def kv_bytes(manifest: Manifest, batch: int, seq: int, itemsize: int) -> int:
    """2 (key, value) x layers x B x S x kv_heads x head_dim x itemsize."""
    dec = manifest.decoder
    return 2 * dec.num_layers * batch * seq * dec.num_kv_heads * dec.head_dim * itemsize


def prefill_length(manifest: Manifest, seq: int) -> int:
    """The longest prefill at S: a prompt of max_prompt_tokens whose placeholder became K visual tokens, at most S."""
    return min(seq, manifest.text.max_prompt_tokens - 1 + manifest.budget.budget)


def decoder_activations(manifest: Manifest, batch: int, prefill: int) -> tuple[int, int]:
    """(logits, attention scores) of a prefill of `prefill` tokens, fp32: logits [B, P, V]; scores [B, heads, P, P] of
    one layer (heads = hidden / head_dim). The standard decoder materialises the scores, and so does ONNX Runtime's
    CPU GroupQueryAttention."""
    dec = manifest.decoder
    heads = max(1, dec.hidden_size // dec.head_dim)
    return batch * prefill * dec.vocab_size * FP32, batch * heads * prefill * prefill * FP32


def vision_activations(manifest: Manifest, batch: int, head_dim: int) -> int:
    """The vision graph's largest live tensors per call, fp32: its inputs, attention scores [n, heads, T, T] and the
    MLP [n, T, 4 D] of one layer over its n sequences. With a batch axis, n = B x tiles (the static axes of the first
    input before its [C, H, W]; LLaVA-NeXT: 5) and T = N / tiles + 1; without one (one image per call), n = 1 and
    T = the largest bounded dim (dim_ranges, Qwen2.5-VL's patches). D = the decoder's hidden size, the tower's own width
    not being in the manifest (heads = D / head_dim): an over-estimate for a tower narrower than its decoder."""
    spec = manifest.graphs["vision"]
    first = spec.inputs[0].shape  # [batch, (tiles,) C, H, W] or [patches, ...]
    per_call = batch if first[0] == "batch" else 1
    tiles = math.prod(d for d in first[1:-3] if isinstance(d, int)) if first[0] == "batch" else 1
    tokens = max((high for _, _, high in spec.dim_ranges.values()), default=-(-manifest.budget.num_visual_tokens // tiles) + 1)
    width = manifest.decoder.hidden_size

    def size(dim: int | str) -> int | None:  # a static size, the batch, a bounded dim's maximum; None: unbounded
        return dim if isinstance(dim, int) else per_call if dim == "batch" else spec.dim_ranges.get(dim, (0, 0, None))[2]

    sizes = [[size(d) for d in t.shape] for t in spec.inputs]
    inputs = sum(math.prod(dims) * np.dtype(t.dtype).itemsize for t, dims in zip(spec.inputs, sizes) if None not in dims)
    return inputs + per_call * tiles * (max(1, width // head_dim) * tokens * tokens + tokens * 4 * width) * FP32


# ---- the two paths ------------------------------------------------------------------------------------------------
def _weights(directory: Path, manifest: Manifest, graph: str, precision: str, path: str, config: PlanConfig) -> Component:
    cell = weight_cell(directory, manifest, graph, precision, path, config)
    how = "measured (its files)" if cell.measured else f"estimated ({parameter_count(directory, manifest, graph) / 1e6:.1f}M parameters)"
    return Component(f"weights {graph} ({precision})", cell.bytes, how)


def _embeddings(directory: Path, manifest: Manifest, batch: int, seq: int) -> Component:
    table = (directory / manifest.text.embeddings).stat().st_size
    rows = min(table, batch * seq * manifest.decoder.hidden_size * FP32)
    return Component("embedding table", rows, f"{manifest.text.embeddings}, {table / MIB:.0f} MiB memory-mapped on the host: "
                     "counted as the B x S rows a run reads")


def estimate_path(directory: Path, manifest: Manifest, config: PlanConfig, path: str) -> PathEstimate:
    """The bytes one path needs at config's B, S and precisions."""
    batch, seq = config.batch, config.max_seq or manifest.text.max_sequence
    prefill = prefill_length(manifest, seq)
    vision_p, decoder_p = config.precisions.vision, config.precisions.decoder
    decoder = decoder_graph(manifest, path, decoder_p)
    itemsize = kv_itemsize(manifest, decoder, decoder_p)
    kv_one, kv_prefill = kv_bytes(manifest, batch, seq, itemsize), kv_bytes(manifest, batch, prefill, itemsize)
    logits, scores = decoder_activations(manifest, batch, prefill)
    vision = vision_activations(manifest, batch, config.vision_head_dim)
    weights = [_weights(directory, manifest, "vision", vision_p, path, config), _weights(directory, manifest, decoder, decoder_p, path, config)]
    scores_how = f"prefill of {prefill}: logits B x P x V and 2 x attention scores B x heads x P x P (fp32)"
    if path == "tensorrt":
        return PathEstimate(path, (
            Component("runtime overhead", config.process_bytes + config.gpu_runtime_bytes,
                      f"host process {config.process_bytes / MIB:.0f} MiB (measured, CPU) + CUDA/TensorRT runtime "
                      f"{config.gpu_runtime_bytes / GIB:.1f} GiB (assumed)"),
            *weights,
            Component("KV cache", 2 * kv_one, f"2 x {kv_one / MIB:.1f} MiB: front and back buffers [B, kv_heads, S, head_dim] of {itemsize} B values (ping-pong)"),
            Component("activations", 2 * logits + 2 * scores + vision, f"{scores_how}, the logits copied to the host; vision graph "
                      "inputs, scores and MLP of one layer"),
            Component("TensorRT workspace", config.workspace_bytes, "the builder's tactic scratch cap (EngineBuildConfig.workspace_bytes; "
                      "`prunert build --workspace-gb`), counted in full"),
            _embeddings(directory, manifest, batch, seq)))
    weight_bytes = sum(c.bytes for c in weights)
    shared = shared_kv(manifest, decoder, decoder_p)  # past and present are one buffer preallocated at S
    prefill_peak = 2 * logits + 2 * scores + (kv_one if shared else kv_prefill)
    decode_peak = int(config.arena_factor * (logits + (1 if shared else 2) * kv_one))
    if decode_peak >= prefill_peak:
        kv = Component("KV cache", decode_peak - int(config.arena_factor * logits),
                       f"{'1 x preallocated' if shared else '2 x (past and present at the last step)'} {kv_one / MIB:.1f} MiB "
                       f"({itemsize} B values) x arena {config.arena_factor}")
        act = int(config.arena_factor * logits)
        act_how = f"decode peak: the prefill's logits B x P x V (P = {prefill}) kept, x arena {config.arena_factor}"
    else:
        kv = Component("KV cache", kv_one if shared else kv_prefill, f"{'preallocated at S' if shared else f'present at the prefill ({prefill})'}, {itemsize} B values")
        act, act_how = 2 * logits + 2 * scores, f"prefill peak: 2 x logits B x P x V and 2 x attention scores B x heads x P x P (P = {prefill})"
    return PathEstimate(path, (
        Component("runtime overhead", config.process_bytes + 2 * config.session_bytes,
                  f"python + numpy + onnxruntime + tokenizers + pillow {config.process_bytes / MIB:.0f} MiB and 2 sessions x "
                  f"{config.session_bytes / MIB:.1f} MiB (measured)"),
        *weights,
        Component("session load", int(config.load_transient * weight_bytes), f"{config.load_transient:.0%} of the weights resident twice while "
                  "the sessions load (measured)"),
        kv,
        Component("activations", act + int(config.arena_factor * vision), f"{act_how}; vision graph inputs, scores and MLP of one layer "
                  f"x arena {config.arena_factor}"),
        _embeddings(directory, manifest, batch, seq)))


# ---- verdict ------------------------------------------------------------------------------------------------------
def usable_bytes(device: Device, config: PlanConfig) -> int:
    return max(0, device.memory_bytes - config.os_reserve_bytes)


def _largest(fits, high: int) -> int:
    """The largest n in 1..high with fits(n) (fits is monotone: true up to some n); 0: none."""
    low, best = 1, 0
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def verdict(directory: Path, manifest: Manifest, config: PlanConfig, path: str, device: Device) -> Verdict:
    """Fits, or what to change so that it does: a shorter S, the int4 decoder, a smaller B (each alone, then combined)."""
    usable, seq = usable_bytes(device, config), config.max_seq or manifest.text.max_sequence
    total = estimate_path(directory, manifest, config, path).total
    if total <= usable:
        return Verdict(path, True, total, usable, ())

    def fits(**change) -> bool:
        return estimate_path(directory, manifest, replace(config, **change), path).total <= usable

    changes: list[str] = []
    s = _largest(lambda n: fits(max_seq=n), seq - 1)
    if s:
        changes.append(f"lower --max-seq to {s} (prompt + generated tokens; TensorRT: `prunert build --max-seq {s}`)")
    int4 = replace(config.precisions, decoder="int4")
    if config.precisions.decoder != "int4":
        if fits(precisions=int4):
            changes.append(f"the int4 decoder (`prunert quantize ARTIFACT --weights int4`, then --precision {int4.label})")
        elif (s4 := _largest(lambda n: fits(precisions=int4, max_seq=n), seq - 1)):
            changes.append(f"the int4 decoder and --max-seq {s4}")
    b = _largest(lambda n: fits(batch=n), config.batch - 1)
    if b:
        changes.append(f"--batch {b}")
    if path == "tensorrt" and total - config.workspace_bytes + 256 * MIB <= usable:
        room = (usable - total + config.workspace_bytes) / GIB
        changes.append(f"a smaller TensorRT workspace: `prunert build --workspace-gb {math.floor(room * 4) / 4:g}`")
    if not changes:
        low = replace(config, batch=1, max_seq=1, precisions=int4)
        least = estimate_path(directory, manifest, low, path).total
        changes.append(f"nothing here fits: even B=1, S=1 with the int4 decoder needs {least / GIB:.2f} GiB; a device with more memory")
    return Verdict(path, False, total, usable, tuple(changes))


def plan(directory: Path, manifest: Manifest, config: PlanConfig, device: Device) -> Plan:
    """The plan for an artifact whose manifest was loaded (load_manifest(directory, verify_hashes=False): files present)."""
    if config.batch > manifest.text.max_batch:
        raise ConfigError(f"--batch: got {config.batch}, expected 1..{manifest.text.max_batch} (the artifact's max_batch)")
    if config.max_seq is not None and config.max_seq > manifest.text.max_sequence:
        raise ConfigError(f"--max-seq: got {config.max_seq}, expected 1..{manifest.text.max_sequence} (the artifact's max_sequence)")
    seq = config.max_seq or manifest.text.max_sequence
    notes = ("vision: the tower, the projector and the selection op are one graph in a prunert artifact; its weights are "
             "reported together (initializers carry no module names to split them by)",
             "Jetson memory is shared by the CPU and the GPU: each total is what the whole process takes from it",
             f"usable = device memory - {config.os_reserve_bytes / GIB:g} GiB for carve-outs and the OS (an assumption: the "
             "datasheets give no figure; pass the free memory your device reports as --device GB)")
    return Plan(device, config.batch, seq, prefill_length(manifest, seq), config.precisions, weight_table(directory, manifest, config),
                tuple(estimate_path(directory, manifest, config, path) for path in PATHS),
                tuple(verdict(directory, manifest, config, path, device) for path in PATHS), notes)
