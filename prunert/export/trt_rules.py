"""The rules of the TensorRT-compatibility check: a walk over every graph and subgraph of a model
with the checks listed in `prunert.export.trt_check` (which holds the public API and the config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from prunert.export.trt_check import (
    INT4_WEIGHT_ONLY_RULES,
    INT32_MAX,
    MODEL_NODE,
    TrtCheckConfig,
    TrtIssue,
    _INTEGER_TYPES,
    _NOT_FOLDABLE,
    _SMALL_EXTERNAL_BYTES,
    _version,
    op_table,
)

def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    found = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == AttributeProto.GRAPHS:
            found.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return found


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


class _Scope:
    """Names visible in one graph: kind ('weights', 'folded', 'runtime'), weights and dtypes."""

    def __init__(self, parent: "_Scope | None" = None) -> None:
        self.parent = parent
        self.kinds: dict[str, str] = {}
        self.weights: dict[str, TensorProto] = {}
        self.types: dict[str, int] = {}
        self.readers: dict[str, list[tuple[str, int]]] = {}  # name -> (op type, input index) of this graph's readers

    def define(self, name: str, kind: str, tensor: TensorProto | None = None) -> None:
        if name:
            self.kinds[name] = kind
            if tensor is not None:
                self.weights[name] = tensor

    def kind(self, name: str) -> str:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.kinds:
                return scope.kinds[name]
            scope = scope.parent
        return "runtime"  # unknown names (dangling inputs) are treated as run-time values

    def tensor(self, name: str) -> TensorProto | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.kinds:
                return scope.weights.get(name)
            scope = scope.parent
        return None

    def dtype(self, name: str) -> int:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.types:
                return scope.types[name]
            scope = scope.parent
        return TensorProto.UNDEFINED


class _Checker:
    def __init__(self, model: onnx.ModelProto, config: TrtCheckConfig, base_dir: Path | None) -> None:
        self.model = _with_types(model)
        self.config = config
        self.base_dir = base_dir
        self.table = op_table()
        self.target = _version(config.trt_version)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.issues: list[TrtIssue] = []

    def run(self) -> list[TrtIssue]:
        self._check_opsets(self.model.opset_import, MODEL_NODE)
        self._walk(self.model.graph, None, "")
        return self.issues

    def _issue(self, node: str, op: str, why: str) -> None:
        self.issues.append(TrtIssue(node, op, why))

    def _applies(self, until: str | None) -> bool:
        return until is None or self.target < _version(until)

    # ---- walking

    def _check_opsets(self, imports: Iterable[onnx.OperatorSetIdProto], where: str) -> None:
        lo, hi = self.config.min_opset, self.config.max_opset
        for entry in imports:
            if entry.domain in self.table["default_domains"] and not lo <= entry.version <= hi:
                self._issue(
                    where, "opset",
                    f"default-domain opset {entry.version} outside the allowed {lo}..{hi} ({self.table['opset']['note']}); "
                    f"re-export with --opset {min(max(entry.version, lo), hi)}",
                )

    def _walk(self, graph: onnx.GraphProto, parent: _Scope | None, prefix: str, runtime_inputs: Iterable[str] = ()) -> None:
        scope = _Scope(parent)
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type"):
                scope.types[info.name] = info.type.tensor_type.elem_type
        for name in runtime_inputs:
            scope.define(name, "runtime")
        for value in graph.input:
            scope.define(value.name, "runtime")
        for init in graph.initializer:  # an initializer also listed as an input stays a weight (IR >= 4)
            scope.define(init.name, "weights", init)
            scope.types[init.name] = init.data_type
        for node in graph.node:
            for position, name in enumerate(node.input):
                scope.readers.setdefault(name, []).append((node.op_type, position))
        for index, node in enumerate(graph.node):
            path = prefix + (node.name or f"{node.op_type}_{index}")
            self._check_node(node, path, scope)
            self._propagate(node, scope)

    def _propagate(self, node: onnx.NodeProto, scope: _Scope) -> None:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            scope.define(node.output[0], "weights", _constant_tensor(node))
            return
        inputs = [name for name in node.input if name]
        foldable = (
            inputs
            and node.op_type not in _NOT_FOLDABLE
            and not _subgraphs(node)
            and node.domain in ("", "ai.onnx")
            and all(scope.kind(name) != "runtime" for name in inputs)
        )
        for output in node.output:
            scope.define(output, "folded" if foldable else "runtime")

    def _check_node(self, node: onnx.NodeProto, path: str, scope: _Scope) -> None:
        op = node.op_type
        if node.domain not in self.table["default_domains"]:
            function = self.functions.get((node.domain, op))
            if function is not None:  # the parser inlines model-local functions (TensorRT >= 9.0)
                self._check_opsets(function.opset_import, path)
                body = onnx.GraphProto(node=function.node)
                self._walk(body, scope, f"{path}/{function.name}/", runtime_inputs=function.input)
                return
            kind = {"com.microsoft": "ONNX Runtime contrib op", "ai.onnx.ml": "ONNX-ML op"}.get(node.domain, "custom-domain op")
            self._issue(path, op, f"{kind} (domain '{node.domain}'): TensorRT's ONNX parser has no importer for it; "
                                  "re-export with standard ONNX ops or register a TensorRT plugin")
            return
        entry = self.table["ops"].get(op)
        if entry is None:
            note = self.table["unsupported"].get(op)
            if note is None:
                self._issue(path, op, "not in TensorRT's ONNX operator table")
            else:
                self._issue(path, op, "not supported by TensorRT's ONNX parser" + (f" ({note})" if note else ""))
        elif "since" in entry and self.target < _version(entry["since"]):
            self._issue(path, op, f"supported by TensorRT's ONNX parser only from {entry['since']} (target {self.config.trt_version})")
        else:
            self._check_restrictions(node, path, scope, entry)
        for attr_name, sub in _subgraphs(node):
            self._walk(sub, scope, f"{path}/{attr_name}/")

    # ---- per-op rules

    def _check_restrictions(self, node: onnx.NodeProto, path: str, scope: _Scope, entry: dict[str, Any]) -> None:
        op = node.op_type
        if "data_dependent_shape" in entry:
            self._issue(path, op, f"data-dependent output shape ({entry['data_dependent_shape']}): TensorRT needs an "
                                  "output allocator and cannot plan static profiles; avoid it")
        for name, rule in entry.get("attributes", {}).items():
            value = _attr(node, name, rule["default"])
            if value not in rule["allowed"]:
                allowed = " or ".join(str(v) for v in rule["allowed"])
                self._issue(path, op, f"attribute {name}={value}: TensorRT requires {name}={allowed}")
        for name, required in entry.get("attributes_all", {}).items():
            values = _attr(node, name, [])
            if any(v != required for v in values):
                self._issue(path, op, f"attribute {name}={list(values)}: TensorRT requires all {required}")
        for name in entry.get("absent_attributes", []):
            if _attr(node, name) is not None:
                self._issue(path, op, f"attribute {name} is not supported by TensorRT")
        if "max_outputs" in entry and any(node.output[entry["max_outputs"]:]):
            self._issue(path, op, f"only the first {entry['max_outputs']} output(s) are supported by TensorRT; "
                                  "leave the others unused")
        for index, rule in entry.get("constant_inputs", {}).items():
            if self._applies(rule["until"]):
                self._check_weights_input(node, path, scope, int(index), rule)
        for index, since in entry.get("integer_inputs", {}).items():  # one issue per node: the first integer input
            if self._check_integer_input(node, path, scope, int(index), since):
                break
        if op == "TopK":
            self._check_topk(node, path, scope, entry)
        elif op == "Loop":
            self._check_loop(node, path, scope)
        elif op == "DequantizeLinear" and (scope.dtype(node.input[0]) in _INT4_TYPES or _attr(node, "block_size", 0)):
            self._check_int4_weights(node, path, scope)

    def _check_int4_weights(self, node: onnx.NodeProto, path: str, scope: _Scope) -> None:
        """INT4 / block DequantizeLinear: an int4 weight-only graph's weight, as TensorRT takes it (INT4_WEIGHT_ONLY_RULES)."""
        op, data = node.op_type, node.input[0]
        if not self.config.int4_weight_only:
            self._issue(path, op, "INT4 / block-quantized DequantizeLinear: allowed in an int4 weight-only variant's graphs only "
                                  "(`prunert quantize ARTIFACT --weights int4`; check-trt ARTIFACT checks them with the int4 rules)")
            return
        floor = INT4_WEIGHT_ONLY_RULES["trt_version"]
        if self.target < _version(floor):
            self._issue(path, op, f"INT4 block quantization needs TensorRT >= {floor} (target {self.config.trt_version})")
        if scope.dtype(data) != TensorProto.INT4:
            self._issue(path, op, f"input '{data}' is {_INT4_TYPES.get(scope.dtype(data), 'not int4')}: TensorRT takes symmetric INT4 weights only")
        if scope.kind(data) != "weights":
            self._issue(path, op, f"input '{data}' is not an initializer: TensorRT's INT4 quantization is weight-only")
        if not _attr(node, "block_size", 0):
            self._issue(path, op, "INT4 DequantizeLinear without block_size: the int4 weight-only form is block-wise")
        zero = node.input[2] if len(node.input) > 2 else ""
        if zero and (scope.kind(zero) != "weights" or _nonzero(scope.tensor(zero))):
            self._issue(path, op, f"zero point '{zero}' is not a constant 0: TensorRT's DequantizeLayer is symmetric")
        scale, weight = scope.tensor(node.input[1]), scope.tensor(data)
        if scale is not None and weight is not None and len(scale.dims) != len(weight.dims):
            self._issue(path, op, f"block scale of rank {len(scale.dims)} for a rank-{len(weight.dims)} weight: TensorRT needs equal ranks")
        readers = [reader for out in node.output for reader in scope.readers.get(out, [])]
        if not readers or any(reader != ("MatMul", 1) for reader in readers):
            self._issue(path, op, f"feeds {sorted({r[0] for r in readers}) or 'nothing'}, not only a MatMul's weight input: "
                                  "the int4 form is weight-only (DequantizeLinear -> MatMul B)")

    def _check_weights_input(self, node: onnx.NodeProto, path: str, scope: _Scope, index: int, rule: dict) -> None:
        if index >= len(node.input) or not node.input[index]:
            return
        name = node.input[index]
        kind = scope.kind(name)
        lifted = f" (TensorRT >= {rule['until']} accepts a tensor)" if rule["until"] else ""
        if kind == "runtime":
            self._issue(path, node.op_type, f"{rule['name']} input '{name}' is computed at run time; TensorRT's parser "
                                            f"needs it as an initializer{lifted}")
        elif kind == "folded" and not self.config.assume_constant_folding:
            self._issue(path, node.op_type, f"{rule['name']} input '{name}' is computed from constants, not an "
                                            f"initializer; fold constants before building{lifted}")

    def _check_integer_input(self, node: onnx.NodeProto, path: str, scope: _Scope, index: int, since: str | None) -> bool:
        if index >= len(node.input) or not node.input[index]:
            return False
        dtype = scope.dtype(node.input[index])
        if dtype not in _INTEGER_TYPES or (since is not None and self.target >= _version(since)):
            return False
        later = f" before TensorRT {since}" if since else ""
        self._issue(path, node.op_type, f"{_INTEGER_TYPES[dtype]} input '{node.input[index]}': TensorRT's "
                                        f"{node.op_type} takes floating-point data only{later}")
        return True

    def _check_topk(self, node: onnx.NodeProto, path: str, scope: _Scope, entry: dict) -> None:
        if len(node.input) < 2 or not node.input[1]:  # opset < 10: K is an attribute
            k = _attr(node, "k")
        else:
            name = node.input[1]
            kind = scope.kind(name)
            if kind == "runtime":
                if not self.config.allow_dynamic_topk_k:
                    self._issue(path, "TopK", f"K must be a build-time constant (input '{name}' is computed at run "
                                              f"time, so K <= {self.config.max_topk} cannot be checked)")
                return
            k = self._scalar(scope.tensor(name)) if kind == "weights" else None
        if k is not None and k > self.config.max_topk:
            self._issue(path, "TopK", f"K={k} exceeds TensorRT's TopK limit of {self.config.max_topk}")

    def _check_loop(self, node: onnx.NodeProto, path: str, scope: _Scope) -> None:
        body = _attr(node, "body")
        if body is None:  # malformed; the ONNX checker reports it
            return
        trip, cond = (list(node.input) + ["", ""])[:2]
        carried = max(len(node.input) - 2, 0)
        scans = len(body.output) - 1 - carried
        trip_kind = scope.kind(trip) if trip else None
        trip_value = self._scalar(scope.tensor(trip)) if trip_kind == "weights" else None
        has_trip = bool(trip) and not (trip_value is not None and trip_value >= INT32_MAX)
        if not has_trip and body.input and _reads(body, body.input[0].name):
            self._issue(path, "Loop", f"body reads the iteration counter '{body.input[0].name}' but the Loop has no trip "
                                      "count; TensorRT defines the counter only with a trip count")
        if scans > 0:
            if not has_trip:
                self._issue(path, "Loop", f"{scans} scan output(s) of dynamic length: no trip count, so TensorRT cannot "
                                          "size them; export a fixed trip count or carry a fixed-size buffer")
            elif trip_kind == "runtime":
                self._issue(path, "Loop", f"{scans} scan output(s) of dynamic length: trip count '{trip}' is computed at "
                                          "run time")
            elif cond and not _always_true(body, cond, scope, self._scalar):
                self._issue(path, "Loop", f"{scans} scan output(s) of dynamic length: the loop can stop early on its "
                                          "condition, and TensorRT sizes scan outputs by the trip count")
        for i in range(carried):
            before, after = body.input[2 + i], body.output[1 + i]
            a, b = _static_shape(before), _static_shape(after)
            if a is not None and b is not None and not _same_shape(a, b):
                self._issue(path, "Loop", f"loop-carried value '{before.name}' changes shape across iterations "
                                          f"({_fmt(a)} -> {_fmt(b)}); TensorRT needs constant carried shapes")

    def _scalar(self, tensor: TensorProto | None) -> int | None:
        """The single value of a small constant tensor (reading tiny external data if needed)."""
        if tensor is None:
            return None
        try:
            if tensor.data_location == TensorProto.EXTERNAL:
                if self.base_dir is None:
                    return None
                info = {entry.key: entry.value for entry in tensor.external_data}
                if int(info.get("length", _SMALL_EXTERNAL_BYTES + 1)) > _SMALL_EXTERNAL_BYTES:
                    return None
                tensor = _copy(tensor)
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(self.base_dir))
            array = numpy_helper.to_array(tensor)
        except Exception:  # unreadable constant: nothing to compare
            return None
        return int(array.reshape(-1)[0]) if array.size == 1 else None


_INT4_TYPES = {TensorProto.INT4: "int4", TensorProto.UINT4: "uint4"}


def _nonzero(tensor: TensorProto | None) -> bool:
    """A zero-point constant that is not all 0 (an unreadable one counts as non-zero)."""
    try:
        return tensor is None or bool(np.any(numpy_helper.to_array(tensor).astype(np.float32) != 0))
    except Exception:
        return True


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value types (for the integer-input rule); the original if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except Exception:
        return model


def _copy(tensor: TensorProto) -> TensorProto:
    out = TensorProto()
    out.CopyFrom(tensor)
    return out


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t
        if attr.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(attr), dtype="int64"))
        if attr.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(attr), dtype="float32"))
    return None


def _reads(graph: onnx.GraphProto, name: str) -> bool:
    """Whether any node in `graph` (or its subgraphs) or its outputs read `name`."""
    if any(output.name == name for output in graph.output):
        return True
    for node in graph.node:
        if name in node.input:
            return True
        if any(_reads(sub, name) for _, sub in _subgraphs(node)):
            return True
    return False


def _always_true(body: onnx.GraphProto, cond: str, scope: _Scope, scalar) -> bool:
    """The loop never stops on its condition: the initial cond is a constant true and the body passes
    its cond input through (directly or via Identity) or outputs a constant true."""
    if scope.kind(cond) != "weights" or scalar(scope.tensor(cond)) != 1:
        return False
    out = body.output[0].name
    cond_in = body.input[1].name if len(body.input) > 1 else None
    producers = {output: node for node in body.node for output in node.output}
    while out in producers and producers[out].op_type == "Identity":
        out = producers[out].input[0]
    if out == cond_in:
        return True
    constants = {init.name: init for init in body.initializer}
    node = producers.get(out)
    tensor = constants.get(out) or (_constant_tensor(node) if node is not None and node.op_type == "Constant" else None)
    return tensor is not None and scalar(tensor) == 1


def _static_shape(info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]


def _same_shape(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _fmt(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
