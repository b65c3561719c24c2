"""`prunert convert`: an artifact's fp32 graphs -> strongly typed fp16 or bf16 graphs with fp32 islands.

TensorRT 11 has no fp16 builder flag; precision is baked into the ONNX: fp16/bf16 weights and tensor
types, Cast nodes wherever a converted node meets an fp32 one, and the network is built strongly
typed. Graph inputs and outputs keep their float32 type and names (a Cast after each input, before
each output), so the runtime feeds the same arrays at every precision. Integer and bool tensors are
never touched. Written with the `onnx` package alone (no onnxconverter-common).

What stays fp32 (an "island"), first matching reason wins, per top-level node that reads or writes a
float32 tensor (see GraphConversion.fp32_nodes):
  subgraph   every Loop/If/Scan node, with its whole body: bodies are never retyped (the selection
             op's greedy loop is one). Outer-scope tensors a body reads are cast to fp32 for it.
  selection  every node in the selection op's name scope (config.SELECTION_SCOPE) when
             keep_selection_fp32: its argmax / top-k decisions flip on fp16 rounding.
  op_type    fp32_op_types, by default LayerNormalization: fp16 LayerNorm after attention overflows
             (mean of squares) in vision towers.
  pattern    fp32_node_patterns (fnmatch on the node name or any of its module scopes), e.g. a late
             MLP down-projection "*encoder.layers.23.mlp.fc2*".
  schema     ops whose ONNX schema has no fp16/bf16 output type (Range, ...) or an unknown domain.
  overflow   with auto_islands and sample feeds: the fp32 graph runs in ONNX Runtime with every
             intermediate exposed, and every node one of whose float inputs or outputs reaches
             overflow_fraction * the largest finite value of the target type (65504 for fp16; bf16
             has fp32's range) stays fp32. Checking inputs as well keeps the consumer of a large
             tensor fp32 too (the tensor is cast down only after it shrank). On the Llama decoder this
             covers the decomposed RMSNorm (Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul:
             x^2 overflows fp16 once |x| > 256) and the causal/padding mask, whose finfo(float32).min
             fill makes Where -> Add -> Softmax of every attention layer fp32 islands.
Schema inputs that only take float32 (Resize scales) stay fp32 inside converted nodes.
Opset <= 20 schemas give Conv, Cos and Sin no bf16 type: at bf16 they stay fp32 ("schema").
On the tiny synthetic LLaVA (the test artifact) the fp16 defaults keep, in the vision graph, the 5
LayerNorms and the 40 float nodes of the selection op (its Loop included), nothing else; in the
decoder nothing without sample feeds, and with them the mask Where plus each layer's mask Add and
Softmax (5 nodes). Without feeds the finfo.min mask fill is clamped to -32752 (see below) and
padded positions stay finite.

Weights: float32 initializers read only by converted nodes are converted; one read by both an island
and a converted node keeps its fp32 copy for the island and gains a converted copy. Values outside
the target range are clamped (+-max/2, so an attention-mask fill plus a bounded score stays finite;
nonzero values below the smallest subnormal keep their sign at that subnormal) and counted.
Top-level float Constant nodes become initializers first. value_info is dropped and re-inferred.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

import prunert
from prunert import metrics
from prunert.artifact_update import ArtifactUpdate
from prunert.config import TENSORRT_GRAPHS, ExportConfig, PrecisionConfig
from prunert.errors import ArtifactError, ConfigError, ExportError
from prunert.export.precision_islands import (
    FINFO_MAX,
    LOW_TYPES,
    activation_ranges,
    constants_to_initializers,
    element_types,
    name_scopes,
    plan_islands,
    rewrite,
)
from prunert.manifest import GraphSpec, Manifest, VariantSpec, load_manifest

TOOL = "prunert.export.precision"
REFERENCE_MAX_BYTES = 64 << 20  # graphs (with weights) validated with onnx.reference too: numpy fp16 is slow
Feeds = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class GraphConversion:
    """What convert_graph did to one graph."""

    graph: str  # source file name
    precision: str
    fp32_nodes: tuple[tuple[str, str], ...]  # (node name, reason) of every float node kept fp32
    converted_nodes: int  # float nodes now computing in fp16/bf16
    converted_initializers: int
    duplicated_initializers: int  # shared by an island and a converted node: both copies kept
    casts_inserted: int
    clamped_values: int  # weight values outside the target range
    overflow: tuple[tuple[str, float], ...]  # nodes kept fp32 by the overflow check, with their max |x|
    matched_patterns: tuple[str, ...]  # fp32_node_patterns that matched a node of this graph
    external_data: str | None  # weights file written beside the converted graph, if any
    sample_count: int  # sample feeds the overflow check ran

    def reasons(self) -> dict[str, int]:
        """fp32 node count per reason category (subgraph, selection, op_type, pattern, schema, overflow)."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.fp32_nodes))

    def summary(self) -> dict[str, Any]:
        return {
            "fp32_nodes": len(self.fp32_nodes),
            "fp32_by_reason": self.reasons(),
            "islands": [f"{name} ({reason})" for name, reason in self.fp32_nodes],
            "converted_nodes": self.converted_nodes,
            "converted_initializers": self.converted_initializers,
            "duplicated_initializers": self.duplicated_initializers,
            "casts_inserted": self.casts_inserted,
            "clamped_values": self.clamped_values,
            "overflow_samples": self.sample_count,
        }


def convert_graph(
    src: Path,
    dst: Path,
    config: PrecisionConfig,
    sample_feeds: Feeds | None = None,
    *,
    external_data_threshold_bytes: int = ExportConfig.external_data_threshold_bytes,
) -> GraphConversion:
    """Write `src` (an fp32 ONNX graph, external data allowed) converted per `config` to `dst`.

    The converted weights go to `dst.name + ".data"` beside it when they exceed the threshold."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ArtifactError(f"convert '{src}': no such ONNX file")
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"convert '{src}': not an ONNX model ({type(exc).__name__})") from None
    constants_to_initializers(model.graph)
    types = element_types(model)
    ranges = None
    feeds = list(sample_feeds or [])
    if config.auto_islands and feeds:
        ranges = activation_ranges(model, src.parent, feeds, types)
    plan = plan_islands(model, types, config, ranges)
    fp32_nodes = tuple((model.graph.node[i].name, reason) for i, reason in sorted(plan.fp32.items()))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    except Exception as exc:
        raise ArtifactError(f"convert '{src}': cannot read its external data ({exc})") from None
    stats = rewrite(model, types, plan, config.precision)
    data_file = _save(model, dst, external_data_threshold_bytes)
    after = element_types(onnx.load(str(dst), load_external_data=False))
    wrong = [name for name in stats.low_outputs if after.get(name) != LOW_TYPES[config.precision]]
    if wrong:  # a producer whose output type comes from an attribute this converter does not retarget
        raise ExportError(f"converted {dst.name}: tensors {wrong[:5]} are not {config.precision} after conversion; expected a strongly typed graph")
    return GraphConversion(
        graph=src.name,
        precision=config.precision,
        fp32_nodes=fp32_nodes,
        converted_nodes=stats.converted_nodes,
        converted_initializers=stats.converted_initializers,
        duplicated_initializers=stats.duplicated_initializers,
        casts_inserted=stats.casts_inserted,
        clamped_values=stats.clamped_values,
        overflow=tuple(sorted(plan.overflow.items())),
        matched_patterns=tuple(sorted(plan.matched_patterns)),
        external_data=data_file,
        sample_count=len(feeds) if ranges is not None else 0,
    )


def _save(model: onnx.ModelProto, dst: Path, threshold: int) -> str | None:
    """Save (external data beside it above the threshold), then re-infer value_info on a weight-less load."""
    size = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    data_file = dst.name + ".data" if size > threshold else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    if data_file:
        (dst.parent / data_file).unlink(missing_ok=True)
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    skeleton = onnx.load(str(dst), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(
            f"converted {dst.name}: strict type/shape inference failed ({str(exc).splitlines()[0]}); expected a consistently typed graph"
        ) from None
    onnx.save_model(inferred, str(dst))
    return data_file


# ----------------------------------------------------------------------------------------- validation


def validate_graph(reference: Path, converted: Path, precision: str, feeds: Feeds | None) -> dict[str, Any]:
    """Check a converted graph; compare its outputs on the feeds with the fp32 graph's.

    onnx.checker with strict type/shape inference always. ONNX Runtime must load fp16 graphs (bf16 is
    attempted: ORT CPU has few bf16 kernels). Outputs are compared twice where possible:
      onnxruntime_cpu: ORT CPU runs ops that lack fp16 kernels (MatMul, Add, Mul, ...) in fp32 and drops
                       the casts between them: optimistic, and blind to fp16 overflow;
      reference:       onnx.reference (numpy) computes in the stored fp16/bf16 types, like a strongly
                       typed TensorRT engine (fp32 accumulation); only for graphs up to REFERENCE_MAX_BYTES.
    Each gives the min cosine per float output, min per-row overlap of integer index outputs ([B, K]), the min
    matched-token cosine of the tokens both kept and max |diff| (all prunert.metrics, as parity and calibration
    drift report them). An output that is inf/NaN where fp32 is finite raises ExportError."""
    try:
        onnx.checker.check_model(str(converted), full_check=True)
    except Exception as exc:
        raise ExportError(f"converted {converted.name}: onnx.checker failed ({str(exc).splitlines()[0]})") from None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    result: dict[str, Any] = {"checker": "ok", "onnxruntime": "loads", "samples": len(feeds or [])}
    runners: dict[str, Callable[[dict[str, np.ndarray]], list[np.ndarray]]] = {}
    try:
        session = ort.InferenceSession(str(converted), options, providers=["CPUExecutionProvider"])
        runners["onnxruntime_cpu"] = lambda feed: session.run(None, feed)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200]
        if precision == "fp16":
            raise ExportError(f"converted {converted.name}: ONNX Runtime cannot load it ({reason})") from None
        result["onnxruntime"] = f"not runnable on CPU: {reason}"
    if not feeds:
        return result
    weights = sum(f.stat().st_size for f in converted.parent.glob(converted.name + "*"))
    if weights <= REFERENCE_MAX_BYTES:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(converted), new_ops=[_gather_elements()])
        runners["reference"] = lambda feed: evaluator.run(None, feed)
    fp32 = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    names, inputs = [o.name for o in fp32.get_outputs()], [i.name for i in fp32.get_inputs()]
    for engine, run in runners.items():
        cosine: dict[str, float] = {}
        same_index: dict[str, float] = {}
        overlap: dict[str, float] = {}
        max_diff: dict[str, float] = {}
        for number, feed in enumerate(feeds):
            missing = [name for name in inputs if name not in feed]
            if missing:
                raise ConfigError(f"sample feed {number} for {reference.name}: missing input(s) {missing}; expected {inputs}")
            feed = {name: np.asarray(feed[name]) for name in inputs}
            wants, gots = dict(zip(names, fp32.run(names, feed))), dict(zip(names, (np.asarray(v) for v in run(feed))))
            indices = [n for n in names if np.issubdtype(wants[n].dtype, np.integer) and wants[n].ndim == 2 and wants[n].size]
            for name in indices:  # [B, K] kept-token indices: compared as sets per row
                rows = [metrics.kept_overlap(a, b) for a, b in zip(wants[name], gots[name])]
                overlap[name] = min(overlap.get(name, 1.0), float(np.mean(rows)))
            for name in (n for n in names if np.issubdtype(wants[n].dtype, np.floating)):
                want, got = _unpadded(name, wants[name], feed), _unpadded(name, gots[name].astype(np.float32), feed)
                if not np.isfinite(got[np.isfinite(want)]).all():
                    raise ExportError(
                        f"converted {converted.name}: output {name!r} has inf/NaN where fp32 is finite ({precision} overflow, "
                        f"{engine}); convert with sample feeds and auto_islands, or keep the offending layers fp32 (fp32_node_patterns)"
                    )
                cosine[name] = min(cosine.get(name, 1.0), metrics.cosine(want, got))
                max_diff[name] = max(max_diff.get(name, 0.0), metrics.max_abs_diff(want, got))
                for index in (i for i in indices if want.shape[:2] == wants[i].shape):  # tokens [B, K, D] gathered by it
                    value = _same_index_cosine(want, got, wants[index], gots[index])
                    same_index[name] = min(same_index.get(name, 1.0), value)
        result[engine] = {
            "cosine": {k: round(v, 7) for k, v in cosine.items()},
            "cosine_same_index": {k: round(v, 7) for k, v in same_index.items()},
            "index_overlap": overlap,
            "max_abs_diff": {k: float(f"{v:.4g}") for k, v in max_diff.items()},
        }
    return result


def _same_index_cosine(want: np.ndarray, got: np.ndarray, want_index: np.ndarray, got_index: np.ndarray) -> float:
    """Mean cosine of the token features both graphs kept, over the batch (prunert.metrics.matched_token_cosine's
    rule; a flipped pick shifts every later row of the [B, K, D] output, so the plain cosine mixes selection
    changes with feature error); 0.0 if they kept none in common."""
    pairs = [metrics.common_rows(a, b) for a, b in zip(want_index, got_index)]  # per row: (rows of want, rows of got)
    a = np.concatenate([want[row, rows] for row, (rows, _) in enumerate(pairs)])  # [matched, D]
    b = np.concatenate([got[row, rows] for row, (_, rows) in enumerate(pairs)])
    return float(metrics.token_cosines(a, b).mean()) if len(a) else 0.0


def _gather_elements() -> type:
    """onnx.reference's GatherElements (np.choose) takes at most 64 rows: a take_along_axis one."""
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        def _run(self, data, indices, axis=None):  # noqa: D401 - onnx.reference signature
            return (np.take_along_axis(data, indices, axis=axis or 0),)

    return GatherElements


def _unpadded(name: str, value: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Decoder outputs at padded positions (attention_mask == 0) are garbage at any precision: compare
    logits [B, L, V] and present.* [B, H, T, D] at real positions only."""
    mask = feed.get("attention_mask")
    if mask is None or mask.ndim != 2 or value.ndim < 3 or value.shape[0] != mask.shape[0]:
        return value
    if name == "logits" and value.shape[1] <= mask.shape[1]:
        return value[mask[:, mask.shape[1] - value.shape[1] :].astype(bool)]
    if name.startswith("present.") and value.shape[2] == mask.shape[1]:
        return value.transpose(0, 2, 1, *range(3, value.ndim))[mask.astype(bool)]
    return value


def _check_tensorrt(path: Path, opset: int) -> None:
    from prunert.export import trt_check

    issues = trt_check.check_trt(path, trt_check.TrtCheckConfig(max_opset=opset))
    if issues:
        lines = "; ".join(issue.line() for issue in issues[:5])
        raise ExportError(f"converted {path.name}: {len(issues)} TensorRT-compatibility problem(s): {lines}")


# ------------------------------------------------------------------------------------------- artifact


def convert_artifact(
    directory: Path,
    config: PrecisionConfig,
    sample_feeds: dict[str, Feeds] | None = None,
    log: Callable[[str], None] = print,
    *,
    external_data_threshold_bytes: int = ExportConfig.external_data_threshold_bytes,
) -> Manifest:
    """Convert every graph of the artifact, check and validate each, and commit them as the
    `config.precision` variant (replacing an existing one, whose folder is deleted)."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    feeds = dict(sample_feeds or {})
    unknown = sorted(set(feeds) - set(manifest.graphs))
    if unknown:
        raise ConfigError(f"sample feeds: unknown graph(s) {unknown}; expected keys among {sorted(manifest.graphs)}")
    _check_patterns(directory, manifest, config)
    old = manifest.variants.get(config.precision)
    drop = sorted({spec.file.split("/")[0] for spec in old.graphs.values() if "/" in spec.file}) if old else []
    summaries: dict[str, Any] = {}
    graphs: dict[str, GraphSpec] = {}
    with ArtifactUpdate(directory, config.precision) as update:
        for name, spec in ((n, s) for n, s in manifest.graphs.items() if n in TENSORRT_GRAPHS):  # not ONNX Runtime's fused form
            src, dst = directory / spec.file, update.staging / Path(spec.file).name
            log(f"converting {spec.file} to {config.precision}")
            conversion = convert_graph(src, dst, config, feeds.get(name), external_data_threshold_bytes=external_data_threshold_bytes)
            _check_tensorrt(dst, manifest.opset)
            validation = validate_graph(src, dst, config.precision, feeds.get(name))
            log(f"  {len(conversion.fp32_nodes)} fp32 node(s) {conversion.reasons()}, {conversion.casts_inserted} casts; {_describe(validation)}")
            summaries[name] = {**conversion.summary(), "validation": validation}
            graphs[name] = GraphSpec(
                file=update.file(dst.name),
                inputs=spec.inputs,  # graph I/O stays float32: the runtime feeds the same arrays
                outputs=spec.outputs,
                external_data=update.file(conversion.external_data) if conversion.external_data else None,
            )
        settings = {
            "config": _jsonable(dataclasses.asdict(config)),
            "target_max": FINFO_MAX[config.precision],
            "graphs": summaries,
        }
        variant = VariantSpec(precision=config.precision, graphs=graphs, tool=f"{TOOL} {prunert.__version__}", settings=settings)
        committed = update.commit(lambda m: dataclasses.replace(m, variants={**m.variants, config.precision: variant}), drop=drop)
    log(f"wrote the {config.precision} variant ({', '.join(graphs)}) into {directory}")
    return committed


def _check_patterns(directory: Path, manifest: Manifest, config: PrecisionConfig) -> None:
    """An fp32_node_patterns entry that matches no node of any graph is a typo: say so before converting."""
    if not config.fp32_node_patterns:
        return
    import fnmatch

    left = set(config.fp32_node_patterns)
    for spec in (s for n, s in manifest.graphs.items() if n in TENSORRT_GRAPHS):
        model = onnx.load(str(directory / spec.file), load_external_data=False)
        for node in model.graph.node:
            keys = [node.name, *name_scopes(node)]
            left -= {p for p in left if any(fnmatch.fnmatchcase(key, p) for key in keys)}
    if left:
        raise ConfigError(
            f"fp32_node_patterns {sorted(left)}: match no node name or name scope in {sorted(manifest.graphs)}; "
            "expected fnmatch patterns such as '*encoder.layers.23.mlp.fc2*'"
        )


def _describe(validation: dict[str, Any]) -> str:
    engine = "reference" if "reference" in validation else "onnxruntime_cpu"
    if engine not in validation:
        return f"onnxruntime: {validation['onnxruntime']}"
    cosine = validation[engine]["cosine"]
    parts = [f"{k} cos {v:.5f}" for k, v in cosine.items() if not k.startswith("present.")]
    if any(k.startswith("present.") for k in cosine):
        parts.append(f"present.* cos >= {min(v for k, v in cosine.items() if k.startswith('present.')):.5f}")
    parts += [f"{k} cos {v:.5f} on the tokens both kept" for k, v in validation[engine]["cosine_same_index"].items()]
    parts += [f"{k} overlap {v:.3f}" for k, v in validation[engine]["index_overlap"].items()]
    return f"{engine}: " + ", ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
