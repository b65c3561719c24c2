"""CPU-only TensorRT compatibility check for ONNX graphs: `prunert check-trt FILE.onnx|ARTIFACT_DIR`.

Walks every node (Loop/If/Scan bodies and model-local functions included) and reports what
TensorRT's ONNX parser would reject or mishandle. The op table and every per-op restriction live
in `prunert/data/trt_supported_ops.json` (source: onnx-tensorrt docs/operators.md for TensorRT
10.x, its changelog and importer code); this module holds only the rules that read it:

1. opset of the default domain outside [min_opset, max_opset]; ops from any other domain
   (com.microsoft contrib ops, custom domains) unless the model defines them as local functions,
   whose bodies are checked instead (the parser inlines local functions since TensorRT 9.0);
2. ops missing from the table, marked unsupported, or added after the target TensorRT version;
3. TopK: sorted=0, K not a build-time constant, K > max_topk;
4. inputs the parser reads as weights (Reduce* axes, CumSum axis before 10.8, Squeeze/Unsqueeze
   axes before 10.7, ...) that are computed at run time, or computed from constants without
   being folded into an initializer;
5. ops with data-dependent output shapes (NonZero, NonMaxSuppression; Unique/Compress are
   unsupported outright);
6. Loop: scan outputs without a build-time trip count or with an early-exit condition, the
   iteration counter read without a trip count, loop-carried values that change shape;
7. integer (int32/int64) data fed to ops whose TensorRT layer takes floating-point data only.
   int64 graph I/O and int64 constants are NOT flagged: TensorRT >= 9 parses INT64 natively;
8. INT4 / block-quantized DequantizeLinear: only in an int4 weight-only variant's graph (config.int4_weight_only,
   which `for_int4` sets and the artifact walk uses for WEIGHT_ONLY_PRECISIONS variants), and then only as TensorRT
   takes it (INT4_WEIGHT_ONLY_RULES): a symmetric int4 initializer (no zero point) with a block_size, feeding a
   MatMul's weight input, opset >= 21, TensorRT >= 10.0.
Plus the table's attribute restrictions (ScatterND reduction, Resize modes, ...) and unused-output
limits (LayerNormalization, MaxPool Indices).

Models are loaded without their external data, so multi-GB graphs check in seconds. Standard
library + onnx (and the numpy it brings) only: no torch, no TensorRT.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Union

import onnx
from onnx import TensorProto

from prunert.config import DEFAULT_OPSET, TRT_MAX_TOPK
from prunert.errors import ArtifactError, ConfigError

DATA_FILE = "trt_supported_ops.json"
MODEL_NODE = "<model>"
INT32_MAX = 2**31 - 1
_INTEGER_TYPES = {TensorProto.INT32: "int32", TensorProto.INT64: "int64"}
_NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
_SMALL_EXTERNAL_BYTES = 1 << 16  # external tensors read back for their value (TopK K, trip counts)

ModelLike = Union[str, Path, onnx.ModelProto]

# INT4 weight-only block quantization as TensorRT's ONNX parser takes it (docs/deploy.md, "int4 weight-only"):
# opset 21 brings the INT4 type and DequantizeLinear's block_size (ONNX; NVIDIA/TensorRT#4298: block-wise
# quantization only from opset 21); the parser imports INT4 Q/DQ from TensorRT 10.0 (onnx-tensorrt Changelog,
# 10.0 EA: "Added support for INT4 quantization"); IDequantizeLayer takes zero points of 0 only and a block
# scale of the input's rank; weight-only: the DequantizeLinear reads an initializer and feeds a MatMul's B.
INT4_WEIGHT_ONLY_RULES = {"opset": 21, "trt_version": "10.0"}


def _version(text: str, what: str = "TensorRT version") -> tuple[int, ...]:
    try:
        parts = tuple(int(part) for part in str(text).split("."))
    except ValueError:
        parts = ()
    if not parts:
        raise ConfigError(f"{what}: got {text!r}, expected a version such as 10.3")
    return parts


@dataclass(frozen=True)
class TrtCheckConfig:
    """What the graphs must satisfy.

    max_opset / min_opset:   default-domain opset range the oldest target parser accepts
                             (TensorRT 10.0-10.3: 9-20).
    max_topk:                largest TopK K TensorRT supports.
    trt_version:             oldest TensorRT the engines must build with; gates rules the table
                             dates ("since"/"until").
    allow_dynamic_topk_k:    accept a TopK K computed at run time (TensorRT >= 8.6 takes it as a
                             shape tensor, but K <= max_topk can then not be checked here).
    assume_constant_folding: treat inputs computed from constants only as initializers (set it when
                             the build folds constants first, e.g. polygraphy surgeon sanitize
                             --fold-constants); the parser itself reads only initializers and
                             Constant outputs as weights.
    """

    max_opset: int = DEFAULT_OPSET
    min_opset: int = 9
    max_topk: int = TRT_MAX_TOPK
    trt_version: str = "10.3"
    allow_dynamic_topk_k: bool = False
    assume_constant_folding: bool = False
    int4_weight_only: bool = False  # INT4 block DequantizeLinear -> MatMul allowed (an int4 variant's graph; for_int4)

    def for_int4(self) -> "TrtCheckConfig":
        """This config for an int4 weight-only graph: INT4 block DQ allowed, the opset ceiling raised to 21."""
        return replace(self, int4_weight_only=True, max_opset=max(self.max_opset, INT4_WEIGHT_ONLY_RULES["opset"]))

    def __post_init__(self) -> None:
        if not 1 <= self.min_opset <= self.max_opset:
            raise ConfigError(f"check-trt opset range: got {self.min_opset}..{self.max_opset}, expected 1 <= min <= max")
        if self.max_topk < 1:
            raise ConfigError(f"check-trt max_topk: got {self.max_topk}, expected >= 1")
        _version(self.trt_version, "check-trt trt_version")


@dataclass(frozen=True)
class TrtIssue:
    node: str  # path-like node name: "Loop_0/body/ArgMax_3"; "<model>" for model-level issues
    op: str
    why: str

    def line(self) -> str:
        return f"{self.node}  {self.op}  {self.why}"


@dataclass(frozen=True)
class TrtCheckResult:
    """One graph's verdict, for the CLI."""

    label: str
    issues: tuple[TrtIssue, ...]
    op_counts: dict[str, int] = field(default_factory=dict)
    config: TrtCheckConfig | None = None  # the rules it was checked with, where not the command's (an int4 variant's graph)

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self, config: TrtCheckConfig) -> str:
        nodes = sum(self.op_counts.values())
        ranked = sorted(self.op_counts.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{op} {count}" for op, count in ranked[:8]) + (", ..." if len(ranked) > 8 else "")
        config = self.config or config
        target = f"TensorRT >= {config.trt_version}, opset <= {config.max_opset}" + (", int4 weight-only rules" if config.int4_weight_only else "")
        if self.ok:
            return f"OK  {self.label}: {nodes} nodes, {len(ranked)} op types ({shown}); {target}"
        return f"FAIL  {self.label}: {len(self.issues)} problem(s) in {nodes} nodes; {target}"


# ------------------------------------------------------------------------------------------ public API


@lru_cache(maxsize=1)
def op_table() -> dict[str, Any]:
    """The parsed data file (supported ops, restrictions, sources)."""
    text = resources.files("prunert").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file's graph without its external data; ArtifactError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"check-trt '{path}': no such file")
    if not path.is_file():
        raise ArtifactError(f"check-trt '{path}': not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-derived errors, ...
        raise ArtifactError(f"check-trt '{path}': not an ONNX model ({type(exc).__name__})") from None
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        raise ArtifactError(f"check-trt '{path}': not an ONNX model (no IR version, opset or graph)")
    return model


def check_trt(model: ModelLike, config: TrtCheckConfig = TrtCheckConfig()) -> list[TrtIssue]:
    """Every problem TensorRT's ONNX parser would have with `model` (a path or a ModelProto)."""
    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        base_dir = Path(model).parent
        model = load_model(model)
    from prunert.export.trt_rules import _Checker

    return _Checker(model, config, base_dir).run()


def op_histogram(model: ModelLike) -> dict[str, int]:
    """Node count per op type (custom domains as 'domain::Op'), subgraphs included."""
    from prunert.export.trt_rules import _op_label, _subgraphs

    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[_op_label(node)] += 1
            for sub in _subgraphs(node):
                walk(sub[1])

    walk(model.graph)
    return dict(counts)


def check_target(path: str | Path, config: TrtCheckConfig = TrtCheckConfig()) -> list[TrtCheckResult]:
    """An .onnx file, or an artifact directory (every graph its manifest lists, in order)."""
    path = Path(path)
    if path.is_dir():
        from prunert.config import TENSORRT_GRAPHS
        from prunert.manifest import load_manifest

        manifest = load_manifest(path, verify_hashes=False)  # structure only: this is not an integrity check
        files = [(spec.file, path / spec.file, config) for name, spec in manifest.graphs.items() if name in TENSORRT_GRAPHS]
        files += _variant_files(manifest, path, config, {file for file, _, _ in files})
    else:
        files = [(str(path), path, config)]
    from prunert.export.trt_rules import _Checker

    results = []
    for label, file, graph_config in files:
        model = load_model(file)
        issues = _Checker(model, graph_config, file.parent).run()
        if path.is_dir():
            issues = [TrtIssue(f"{label}:{issue.node}", issue.op, issue.why) for issue in issues]
        results.append(TrtCheckResult(label, tuple(issues), op_histogram(model), None if graph_config == config else graph_config))
    return results


def _variant_files(manifest, path: Path, config: TrtCheckConfig, seen: set[str]) -> list[tuple[str, Path, TrtCheckConfig]]:
    """Each variant's own TensorRT graphs (not the fp32 files it points at), int4 weight-only ones with for_int4."""
    from prunert.config import TENSORRT_GRAPHS, WEIGHT_ONLY_PRECISIONS

    files = []
    for precision, variant in sorted(manifest.variants.items()):
        graph_config = config.for_int4() if precision in WEIGHT_ONLY_PRECISIONS else config
        for name, spec in variant.graphs.items():
            if name in TENSORRT_GRAPHS and spec.file not in seen:
                seen.add(spec.file)
                files.append((spec.file, path / spec.file, graph_config))
    return files
