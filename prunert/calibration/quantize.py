"""Explicit (Q/DQ) quantization of an artifact's graphs with ONNX Runtime's static quantizer.

TensorRT reads QuantizeLinear/DequantizeLinear as explicit quantization: symmetric int8 (zero point 0),
per-channel weights (Conv axis 0, MatMul/Gemm the output-channel axis 1), per-tensor activations; or
FP8 E4M3FN the same way. Only config.op_types are quantized (inputs of MatMul/Gemm/Conv), biases stay
float, and every node of the selection op (name scope SELECTION_SCOPE) is excluded and kept clear of
Q/DQ: its argmax decisions are precision-sensitive.

The quantized graphs are written through ArtifactUpdate: `calibrate_artifact` stages them, checks
each with check_trt and ONNX Runtime CPU, measures the drift against fp32 (prunert.calibration.drift),
then installs them as the manifest's `variants[precision]` in one atomic step.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from prunert.artifact_update import ArtifactUpdate
from prunert.calibration.dataset import CalibrationSet, FeedReader, collect_feeds, feed_summary
from prunert.calibration.drift import ORT_FP8_SESSION_CONFIG, DriftReport, compare, ort_session, quantized_pipeline
from prunert.config import GRAPH_NAMES, SELECTION_SCOPE, CalibrationConfig
from prunert.errors import BackendUnavailableError, ExportError
from prunert.export.trt_check import TrtCheckConfig, check_trt
from prunert.manifest import GraphSpec, Manifest, VariantSpec, load_manifest

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QUANT_TYPES = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}
_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_DRIFT_GREEDY_TOKENS = 8
ORT_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,  # TensorRT wants float biases, not int32 DQ
    "DedicatedQDQPair": True,  # one Q/DQ pair per consumer, as TensorRT expects
    "CalibStridedMinMax": 1,  # one feed per calibration pass: feeds differ in shape (histogram calibrators)
}


@dataclass(frozen=True)
class QuantizationSummary:
    graph: str  # output file name
    precision: str
    tool: str
    calibrate_method: str  # ONNX Runtime's CalibrationMethod name actually used
    samples: int
    quantized_nodes: dict[str, int]  # op type -> nodes whose inputs are dequantized
    qdq_nodes: dict[str, int]  # QuantizeLinear / DequantizeLinear counts
    per_channel_weights: int  # weight DequantizeLinear nodes with a per-channel (1-D) scale
    excluded_nodes: int
    pre_process: str  # what quant_pre_process did, or why it was skipped
    external_data: str | None  # weights file beside the graph, if any
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selection_nodes(model: onnx.ModelProto, scope: str = SELECTION_SCOPE) -> set[str]:
    """Names of the top-level nodes whose torch name scopes include `scope` (the selection op)."""
    names = set()
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == NAME_SCOPES and scope in _scopes(prop.value):
                names.add(node.name)
    return names


def _scopes(value: str) -> list[str]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in parsed] if isinstance(parsed, (list, tuple)) else []


def quantize_graph(
    src: Path,
    dst: Path,
    feeds: list[dict[str, np.ndarray]],
    config: CalibrationConfig,
    exclude: set[str] = frozenset(),
    pre_process: bool = True,
    fp8_scales: str = "amax",
) -> QuantizationSummary:
    """Q/DQ-quantize the graph at `src` into `dst` from calibration feeds; nodes in `exclude` stay float.

    fp8_scales: "amax" (default): ORT places and calibrates symmetric int8 Q/DQ (config.method), then
    every Q/DQ becomes FP8 E4M3FN with scale = amax / 448 (weights per channel from the float weights),
    the TensorRT / ModelOpt convention. "onnxruntime": ORT's own QFLOAT8E4M3FN, whose scales come from
    each tensor's standard deviation (CalibrationMethod.Distribution) and saturate values beyond ~4.5
    sigma; measured 3x the decoder logits KL of "amax" on the tiny artifact.

    Raises BackendUnavailableError when onnxruntime is not installed and ExportError when the
    result quantizes nothing, breaks the exclusion, has non-zero zero points or does not run in ORT CPU.
    """
    src, dst = Path(src), Path(dst)
    try:
        import onnxruntime
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError:
        raise BackendUnavailableError("quantizer 'onnxruntime': package onnxruntime is not installed (pip install onnxruntime)") from None
    if not feeds:
        raise ExportError(f"{src.name}: no calibration feeds")
    start = time.perf_counter()
    source = onnx.load(str(src), load_external_data=False)
    external = any(init.data_location == TensorProto.EXTERNAL for init in source.graph.initializer)
    if fp8_scales not in ("amax", "onnxruntime"):
        raise ExportError(f"fp8_scales: got {fp8_scales!r}, expected 'amax' or 'onnxruntime'")
    native_fp8 = config.precision == "fp8" and fp8_scales == "onnxruntime"
    if config.precision == "fp8" and _opset(source) < 19:
        raise ExportError(f"{src.name}: opset {_opset(source)} has no float8 Q/DQ; re-export with opset >= 19 for fp8")
    qtype = QuantType.QFLOAT8E4M3FN if native_fp8 else QuantType.QInt8
    method = "Distribution" if native_fp8 else _METHODS[config.method]  # ORT: float8 needs Distribution
    with tempfile.TemporaryDirectory(prefix="prunert-quant-", dir=dst.parent) as tmp:
        model_in, how = _pre_process(src, Path(tmp), external) if pre_process else (src, "skipped (pre_process=False)")
        out = Path(tmp) / "quantized.onnx"
        try:
            with _quiet():
                quantize_static(
                    str(model_in), str(out), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=qtype, weight_type=qtype, per_channel=True, reduce_range=False,
                    op_types_to_quantize=list(config.op_types), nodes_to_exclude=sorted(exclude),
                    calibrate_method=getattr(CalibrationMethod, method), use_external_data_format=external,
                    extra_options=ORT_EXTRA_OPTIONS,
                )
        except Exception as exc:  # ORT raises ValueError, RuntimeError, onnxruntime Fail, ...
            raise ExportError(f"{src.name}: onnxruntime quantize_static failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        model = onnx.load(str(out))
        if config.precision == "fp8" and not native_fp8:  # amax scales (see the docstring)
            _int8_to_fp8(model, onnx.load(str(model_in)))
        _restore_metadata(model, source)
        _unwrap_excluded(model, exclude)
        _save(model, dst, external)
    quantized, qdq, per_channel = _check_qdq(dst, config, exclude)
    _check_runs(dst, config.precision, feeds[0])
    rescaled = config.precision == "fp8" and not native_fp8
    return QuantizationSummary(
        graph=dst.name,
        precision=config.precision,
        tool=f"onnxruntime.quantization {onnxruntime.__version__}" + (" + prunert fp8 amax/448 rescale" if rescaled else ""),
        calibrate_method=method,
        samples=len(feeds),
        quantized_nodes=quantized,
        qdq_nodes=qdq,
        per_channel_weights=per_channel,
        excluded_nodes=len(exclude),
        pre_process=how,
        external_data=dst.name + ".data" if external else None,
        size_bytes=sum(p.stat().st_size for p in dst.parent.glob(dst.name + "*")),
        seconds=round(time.perf_counter() - start, 3),
    )


def _opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _int8_to_fp8(model: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    """Turn ORT's symmetric int8 Q/DQ into FP8 E4M3FN with scale = amax / 448: activations from the
    calibrated int8 scale (amax / 127), weights re-quantized from `float_model`'s float initializers."""
    import ml_dtypes

    fp8, top = ml_dtypes.float8_e4m3fn, float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
    inits = {init.name: init for init in model.graph.initializer}
    floats = {init.name: init for init in float_model.graph.initializer}
    done: set[str] = set()

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
        done.add(name)

    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        data, scale, zero = node.input[:3]
        if node.op_type == "DequantizeLinear" and data in inits:  # a weight: ORT names it <weight>_quantized
            if data.removesuffix("_quantized") not in floats:
                raise ExportError(f"fp8: cannot find the float weight of '{data}' (onnxruntime's naming changed?)")
            weight = numpy_helper.to_array(floats[data.removesuffix("_quantized")]).astype(np.float32)
            old = numpy_helper.to_array(inits[scale])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % weight.ndim
            keep = old.ndim == 1 and old.size > 1  # per channel along `axis`
            amax = np.abs(weight).max(axis=tuple(i for i in range(weight.ndim) if i != axis)) if keep else np.abs(weight).max()
            new = (np.maximum(amax, np.finfo(np.float32).tiny) / top).astype(np.float32)
            shape = [-1 if i == axis else 1 for i in range(weight.ndim)] if keep else []
            put(data, np.clip(weight / new.reshape(shape), -top, top).astype(fp8))
            put(scale, new.reshape(old.shape))
        elif scale not in done:
            put(scale, (numpy_helper.to_array(inits[scale]).astype(np.float32) * 127.0 / top).astype(np.float32))
        if zero not in done:
            put(zero, np.zeros(numpy_helper.to_array(inits[zero]).shape, fp8))


@contextlib.contextmanager
def _quiet():
    """quantize_static prints progress and logs advice on the root logger: keep both off the CLI's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _pre_process(src: Path, tmp: Path, external: bool) -> tuple[Path, str]:
    """quant_pre_process with ONNX shape inference only. Symbolic shape inference fails on the selection
    Loop; ORT's graph optimizations rewrite the fp32 selection op (a double Not dropped) and changed no
    drift number on the tiny artifact, so the quantized graph stays the exported one plus Q/DQ (TensorRT
    fuses on its own)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "pre.onnx"
    try:
        quant_pre_process(
            str(src),
            str(out),
            skip_optimization=True,
            skip_symbolic_shape=True,
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            external_data_location="pre.onnx.data" if external else None,
        )
    except Exception as exc:  # fall back to the exported graph; the settings say why
        return src, f"failed, quantized the exported graph ({type(exc).__name__}: {_first_line(exc)[:120]})"
    return out, "quant_pre_process(skip_optimization=True, skip_symbolic_shape=True): onnx shape inference"


def _restore_metadata(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give nodes the source's metadata_props back by name (pre-processing drops it)."""
    props = {node.name: node.metadata_props for node in source.graph.node if node.name}
    for node in model.graph.node:
        if node.name in props and not node.metadata_props:
            node.metadata_props.extend(props[node.name])


def _unwrap_excluded(model: onnx.ModelProto, exclude: set[str]) -> None:
    """An excluded node that shares an input with a quantized node can end up reading the DQ output:
    point it back at the float tensor, then drop Q/DQ nodes nothing reads any more."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.name not in exclude:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        used |= _subgraph_inputs(graph)
        dead = [node for node in graph.node if node.op_type in QDQ_OPS and not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | _subgraph_inputs(graph) | {o.name for o in graph.output}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= {name for inner in sub.node for name in inner.input}
                names |= _subgraph_inputs(sub)
    return names


def _save(model: onnx.ModelProto, dst: Path, external: bool) -> None:
    dst.unlink(missing_ok=True)
    if external:
        data = dst.parent / (dst.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def _check_qdq(path: Path, config: CalibrationConfig, exclude: set[str]) -> tuple[dict[str, int], dict[str, int], int]:
    """Quantized node counts; ExportError unless zero points are 0 of the target type and excluded
    nodes neither read a DequantizeLinear output nor feed a QuantizeLinear."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    want = QUANT_TYPES[config.precision]
    qdq = {op: 0 for op in QDQ_OPS}
    per_channel = 0
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        qdq[node.op_type] += 1
        if len(node.input) < 3 or node.input[2] not in inits:
            raise ExportError(f"{path.name}: {node.op_type} '{node.name}' has no constant zero point (TensorRT needs 0)")
        zero = inits[node.input[2]]
        if zero.data_type != want or np.any(numpy_helper.to_array(zero, base_dir=str(path.parent)).astype(np.float32) != 0):
            raise ExportError(f"{path.name}: {node.op_type} '{node.name}' zero point is not {config.precision} 0 (TensorRT needs symmetric Q/DQ)")
        scale = inits.get(node.input[1])
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
            per_channel += 1
    quantized: dict[str, int] = {}
    for node in graph.node:
        reads_dq = any(producer.get(name) is not None and producer[name].op_type == "DequantizeLinear" for name in node.input)
        if node.name in exclude:
            feeds_q = any(c.op_type == "QuantizeLinear" for out in node.output for c in consumers.get(out, []))
            if reads_dq or feeds_q:
                raise ExportError(f"{path.name}: Q/DQ next to excluded (selection) node '{node.name}'")
        elif reads_dq and node.op_type in config.op_types:
            quantized[node.op_type] = quantized.get(node.op_type, 0) + 1
    if not quantized:
        raise ExportError(
            f"{path.name}: the quantizer inserted no Q/DQ around {list(config.op_types)} (no calibrated tensors; check the feeds' shapes)"
        )
    return dict(sorted(quantized.items())), qdq, per_channel


def _check_runs(path: Path, precision: str, feed: dict[str, np.ndarray]) -> None:
    try:
        outputs = ort_session(path, precision).run(None, feed)
    except Exception as exc:
        raise ExportError(f"{path.name}: the {precision} graph does not run in ONNX Runtime CPU: {_first_line(exc)}") from exc
    for value in outputs:
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ExportError(f"{path.name}: the {precision} graph gives non-finite outputs on a calibration sample")


def calibrate_artifact(
    directory: Path,
    calibration_set: CalibrationSet,
    config: CalibrationConfig = CalibrationConfig(),
    log: Callable[[str], None] = print,
) -> tuple[Manifest, DriftReport]:
    """Quantize config.graphs from the calibration set and install them as variants[config.precision].

    -> (the new manifest, the DriftReport of the variant against fp32). Atomic: on any failure the
    staged folder is removed and the manifest is unchanged. Recalibrating replaces the old variant.
    """
    from prunert.runtime import VLMPipeline

    directory = Path(directory)
    manifest = load_manifest(directory)
    precision = config.precision
    if len(calibration_set.samples) > config.max_samples:
        calibration_set = replace(calibration_set, samples=calibration_set.samples[: config.max_samples])
    old = manifest.variants.get(precision)
    drop = sorted({spec.file.split("/")[0] for spec in old.graphs.values() if "/" in spec.file}) if old else []
    total = time.perf_counter()
    log(f"running the fp32 graphs on {len(calibration_set.samples)} calibration samples")
    pipe = VLMPipeline(directory, decoder="decoder")  # the standard form: the one quantized here, and the drift reference
    feeds = collect_feeds(pipe, calibration_set)
    vision_model = onnx.load(str(directory / manifest.graphs["vision"].file), load_external_data=False)
    exclude = {"vision": selection_nodes(vision_model), "decoder": set()}
    summaries: dict[str, QuantizationSummary] = {}
    with ArtifactUpdate(directory, precision) as update:
        graphs: dict[str, GraphSpec] = {}
        for name in GRAPH_NAMES:
            spec = manifest.graphs[name]
            if name not in config.graphs:
                graphs[name] = spec
                continue
            log(f"quantizing {spec.file} to {precision} ({len(feeds[name])} feeds, {len(exclude[name])} selection nodes kept fp32)")
            dst = update.staging / f"{name}.onnx"
            summary = quantize_graph(directory / spec.file, dst, feeds[name], config, exclude[name])
            issues = check_trt(dst, TrtCheckConfig())
            if issues:
                lines = "; ".join(issue.line() for issue in issues[:5])
                raise ExportError(f"{precision} {name}.onnx: {len(issues)} TensorRT-compatibility problem(s): {lines}")
            summaries[name] = summary
            external = update.file(summary.external_data) if summary.external_data else None
            graphs[name] = GraphSpec(update.file(dst.name), spec.inputs, spec.outputs, external)
        log(f"measuring {precision} drift against fp32 in ONNX Runtime CPU")
        files = {name: update.staging / f"{name}.onnx" for name in summaries}
        drift = compare(pipe, quantized_pipeline(pipe, files, graphs, precision), calibration_set, precision, _DRIFT_GREEDY_TOKENS)
        report_name = f"drift-{precision}.json"
        drift.write(update.staging / report_name)
        settings = _settings(config, calibration_set, feeds, summaries, exclude, manifest, drift, update.file(report_name))
        variant = VariantSpec(precision, graphs, summaries[next(iter(summaries))].tool, settings)
        new = update.commit(lambda m: replace(m, variants={**m.variants, precision: variant}), drop=drop)
    log(f"wrote {precision} variant {update.folder}/ in {time.perf_counter() - total:.1f} s")
    return new, drift


def _settings(config, calibration_set, feeds, summaries, exclude, manifest, drift, report) -> dict[str, Any]:
    return {
        "precision": config.precision,
        "quantizer": "onnxruntime",
        "op_types": list(config.op_types),
        "graphs": list(config.graphs),
        "method": config.method,
        "calibrate_method": {name: s.calibrate_method for name, s in summaries.items()},
        "max_samples": config.max_samples,
        "scheme": "symmetric (zero point 0), per-channel weights, per-tensor activations, float biases, QDQ format",
        "fp8_scales": "amax / 448 (int8 placement and calibration by onnxruntime, then E4M3FN)" if config.precision == "fp8" else None,
        "calibration_set": {**calibration_set.summary(), "feeds": feed_summary(feeds)},
        "quantized_nodes": {name: s.quantized_nodes for name, s in summaries.items()},
        "qdq_nodes": {name: s.qdq_nodes for name, s in summaries.items()},
        "per_channel_weights": {name: s.per_channel_weights for name, s in summaries.items()},
        "excluded_selection_nodes": len(exclude["vision"]) if "vision" in summaries else 0,
        "pre_process": {name: s.pre_process for name, s in summaries.items()},
        "fp32_graphs": {name: manifest.graphs[name].file for name in GRAPH_NAMES if name not in summaries},
        "ort_session_config": ORT_FP8_SESSION_CONFIG if config.precision == "fp8" else {},
        "drift": drift.summary(),
        "drift_report": report,
    }
