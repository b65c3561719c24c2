"""The graph rewrite behind prunert.export.precision: which nodes stay fp32, how large the fp32 graph's
activations get on sample inputs, and the cast-inserting fp32 -> fp16/bf16 conversion itself.

Only the top-level graph is rewritten: Loop/If/Scan nodes always stay fp32 together with their bodies,
so a body never needs retyping; outer-scope tensors a body reads are cast back to fp32 where needed
and renamed inside the body. Standard library + numpy + onnx (+ onnxruntime for the overflow run).
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from prunert.config import SELECTION_SCOPE, PrecisionConfig
from prunert.errors import ConfigError, ExportError

FLOAT = TensorProto.FLOAT
LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
TYPE_NAMES = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
FINFO_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}  # largest finite value
SMALLEST = {"fp16": 2.0**-24, "bf16": 2.0**-133}  # smallest subnormal: nonzero weights never flush to 0
CLAMP_FRACTION = 0.5  # out-of-range constants (mask fills = finfo(float32).min) become +-max/2: adding to them stays finite
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
SUBGRAPH_OPS = ("Loop", "If", "Scan")
TYPE_AGNOSTIC = ("Shape", "Size", "Cast")  # accept any input dtype: their inputs are never cast
DTYPE_ATTR_OPS = ("EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli")


@dataclass
class Plan:
    """Which top-level nodes stay fp32 (index -> reason) and which inputs of converted nodes must stay fp32."""

    fp32: dict[int, str] = field(default_factory=dict)
    fp32_slots: set[tuple[int, int]] = field(default_factory=set)  # (node index, input slot): schema wants float32
    float_nodes: set[int] = field(default_factory=set)  # nodes that read or write a float32 tensor
    matched_patterns: set[str] = field(default_factory=set)
    overflow: dict[str, float] = field(default_factory=dict)  # node name -> max |x| that kept it fp32


@dataclass
class RewriteStats:
    converted_nodes: int = 0
    converted_initializers: int = 0
    duplicated_initializers: int = 0
    casts_inserted: int = 0
    clamped_values: int = 0
    low_outputs: list[str] = field(default_factory=list)  # float outputs of converted nodes: must infer as fp16/bf16


def name_scopes(node: onnx.NodeProto) -> list[str]:
    """The exporter's module scopes of a node (metadata 'pkg.torch.onnx.name_scopes', a Python list repr)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes] if isinstance(scopes, (list, tuple)) else []
    return []


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [
        g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs
    ]


def outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    used = {i for n in graph.node for i in n.input if i}
    for node in graph.node:
        for sub in subgraphs(node):
            used |= outer_refs(sub)
    return used - defined


def _rename_refs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name == old:
                node.input[slot] = new
        for sub in subgraphs(node):
            _rename_refs(sub, old, new)


def constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Top-level float32 Constant nodes become initializers, so weights are handled in one place."""
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        tensor = None
        if attr is not None and attr.name == "value" and attr.t.data_type == FLOAT:
            tensor = attr.t
        elif attr is not None and attr.name in ("value_float", "value_floats"):
            values = attr.f if attr.name == "value_float" else list(attr.floats)
            tensor = numpy_helper.from_array(np.asarray(values, np.float32))
        if tensor is None or node.output[0] in outputs:
            keep.append(node)
            continue
        init = graph.initializer.add()
        init.CopyFrom(tensor)
        init.name = node.output[0]
    del graph.node[:]
    graph.node.extend(keep)


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every top-level tensor, by shape inference on a weight-less copy (any model size)."""
    g = model.graph
    is_big = lambda t: t.data_type == FLOAT and np.prod(t.dims, dtype=np.int64) > 64  # noqa: E731
    small = [t for t in g.initializer if not is_big(t)]
    big = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer if is_big(t)]
    skeleton_graph = helper.make_graph(list(g.node), g.name, [*g.input, *big], list(g.output), small, value_info=list(g.value_info))
    skeleton = helper.make_model(skeleton_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version, functions=list(model.functions))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception as exc:  # onnx raises InferenceError and friends
        raise ExportError(f"graph {g.name!r}: shape inference failed ({type(exc).__name__}: {exc}); expected a valid ONNX graph") from None
    types = {t.name: t.data_type for t in g.initializer}
    for info in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types.setdefault(info.name, info.type.tensor_type.elem_type)
    return types


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _allowed(schema, index: int, is_input: bool) -> set[str]:
    params = schema.inputs if is_input else schema.outputs
    if not params:
        return set()
    param = params[min(index, len(params) - 1)]
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return constraints.get(param.type_str, {param.type_str})


def plan_islands(model: onnx.ModelProto, types: dict[str, int], config: PrecisionConfig, ranges: dict[str, float] | None = None) -> Plan:
    """Decide which float nodes stay fp32. Reasons, first match wins: selection, subgraph, op_type,
    pattern, schema (the op has no fp16/bf16 type), overflow. Loop/If/Scan nodes are always fp32."""
    plan = Plan()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 20)
    target = TYPE_NAMES[config.precision]
    limit = config.overflow_fraction * FINFO_MAX[config.precision]
    for index, node in enumerate(model.graph.node):
        refs = [name for sub in subgraphs(node) for name in outer_refs(sub)]
        reads = [] if node.op_type in TYPE_AGNOSTIC else list(node.input)
        floats_in = [i for i in [*reads, *refs] if i and types.get(i) == FLOAT]
        floats_out = [o for o in node.output if o and types.get(o) == FLOAT]
        if not floats_in and not floats_out:
            continue
        plan.float_nodes.add(index)
        scopes = name_scopes(node)
        matched = [p for p in config.fp32_node_patterns if fnmatch.fnmatchcase(node.name, p) or any(fnmatch.fnmatchcase(s, p) for s in scopes)]
        plan.matched_patterns.update(matched)
        schema = _schema(node, opset) if node.domain in ("", "ai.onnx") else None
        reason = None
        if config.keep_selection_fp32 and SELECTION_SCOPE in scopes:
            reason = "selection"
        elif node.op_type in SUBGRAPH_OPS or subgraphs(node):
            reason = f"subgraph:{node.op_type}"
        elif node.op_type in config.fp32_op_types:
            reason = f"op_type:{node.op_type}"
        elif matched:
            reason = f"pattern:{matched[0]}"
        elif schema is None:
            reason = f"schema:{node.domain or 'ai.onnx'}::{node.op_type} unknown"
        elif any(target not in _allowed(schema, i, False) for i, o in enumerate(node.output) if o in floats_out):
            reason = f"schema:{node.op_type} has no {config.precision} output type"
        elif ranges:
            peak = max((ranges.get(name, 0.0) for name in [*floats_in, *floats_out]), default=0.0)
            if peak > limit:
                reason = f"overflow:{peak:.3g}"
                plan.overflow[node.name] = peak
        if reason is not None:
            plan.fp32[index] = reason
        elif schema is not None:
            for slot, name in enumerate(node.input):
                if name in floats_in and target not in _allowed(schema, slot, True):
                    plan.fp32_slots.add((index, slot))
    return plan


# ------------------------------------------------------------------------------------------- overflow


def activation_ranges(model: onnx.ModelProto, base_dir: Path, feeds: list[dict[str, np.ndarray]], types: dict[str, int]) -> dict[str, float]:
    """Largest finite |x| of every top-level float32 tensor over the feeds, from an fp32 ONNX Runtime run
    with every intermediate exposed as an output. `model` is loaded without external data."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # weight-less when the model has external data; < 2 GB otherwise
    existing = {o.name for o in probe.graph.output}
    names = [o for n in probe.graph.node for o in n.output if o and types.get(o) == FLOAT and o not in existing]
    probe.graph.output.extend(helper.make_tensor_value_info(name, FLOAT, None) for name in names)
    for tensor in probe.graph.initializer:  # small external tensors inline: ORT reads shapes/axes from them
        if tensor.data_location == TensorProto.EXTERNAL and (tensor.data_type != FLOAT or np.prod(tensor.dims, dtype=np.int64) <= 1024):
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    locations = {e.value for t in probe.graph.initializer for e in t.external_data if e.key == "location"}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    inputs = [i.name for i in probe.graph.input if i.name not in {t.name for t in probe.graph.initializer}]
    ranges: dict[str, float] = defaultdict(float)
    with _probe_dir(base_dir, locations) as tmp:
        if locations:  # external weights: the probe sits beside hard links to them
            onnx.save_model(probe, str(Path(tmp) / "probe.onnx"))
            source = str(Path(tmp) / "probe.onnx")
        else:
            source = probe.SerializeToString()
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"overflow check: ONNX Runtime cannot load the fp32 graph {model.graph.name!r} ({str(exc).splitlines()[0]})") from None
        for number, feed in enumerate(feeds):
            missing = [name for name in inputs if name not in feed]
            if missing:
                raise ConfigError(f"sample feed {number} for graph {model.graph.name!r}: missing input(s) {missing}; expected {inputs}")
            feed = {name: np.asarray(feed[name]) for name in inputs}
            outputs = session.run(None, feed)
            for name, value in [*zip([o.name for o in session.get_outputs()], outputs), *feed.items()]:
                value = np.asarray(value)
                if value.dtype == np.float32 and value.size:
                    finite = np.abs(value[np.isfinite(value)])
                    if finite.size:
                        ranges[name] = max(ranges[name], float(finite.max()))
    return dict(ranges)


@contextlib.contextmanager
def _probe_dir(base_dir: Path, locations: set[str]):
    """A temp dir holding hard links to the external data files (ORT refuses symlinks and paths that
    leave the model's directory): in the system temp dir, or beside the source on another filesystem."""
    for parent in (None, base_dir):
        with tempfile.TemporaryDirectory(prefix=".prunert-overflow-", dir=parent) as tmp:
            try:
                for location in locations:
                    os.link(base_dir / location, Path(tmp) / location)
            except OSError:
                if parent is None:
                    continue
                raise ExportError(f"overflow check: cannot link the external data {sorted(locations)} of {base_dir} into a temp dir") from None
            yield tmp
            return


# -------------------------------------------------------------------------------------------- rewrite


def to_low(array: np.ndarray, precision: str, stats: RewriteStats) -> np.ndarray:
    """float32 -> fp16/bf16 values, out-of-range magnitudes clamped (counted in stats)."""
    array = np.asarray(array, np.float32)
    top, tiny = CLAMP_FRACTION * FINFO_MAX[precision], SMALLEST[precision]
    magnitude = np.abs(array)
    clamp = np.isfinite(array) & ((magnitude > FINFO_MAX[precision]) | ((magnitude > 0) & (magnitude < tiny)))
    if clamp.any():
        stats.clamped_values += int(clamp.sum())
        array = np.where(clamp & (magnitude > 1), np.sign(array) * top, array)
        array = np.where(clamp & (magnitude <= 1), np.sign(array) * tiny, array)
    return array.astype(helper.tensor_dtype_to_np_dtype(LOW_TYPES[precision]))


def _low_tensor(tensor: onnx.TensorProto, precision: str, stats: RewriteStats, name: str | None = None) -> onnx.TensorProto:
    out = numpy_helper.from_array(to_low(numpy_helper.to_array(tensor), precision, stats), name if name is not None else tensor.name)
    if out.data_type != LOW_TYPES[precision]:  # pragma: no cover - onnx without ml_dtypes support
        raise ExportError(f"tensor {tensor.name!r}: could not be stored as {precision}")
    return out


def _retarget(node: onnx.NodeProto, outputs: list[str], types: dict[str, int], precision: str, stats: RewriteStats) -> None:
    """Attributes of a converted node that would produce float32: Cast(to), Constant(value),
    ConstantOfShape(value), dtype. `outputs`: the node's output names before renaming."""
    low = LOW_TYPES[precision]
    if node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = low
    elif node.op_type == "Constant" and types.get(outputs[0]) == FLOAT:  # one left in place (a graph output)
        attr = node.attribute[0]
        values = attr.t if attr.name == "value" else numpy_helper.from_array(np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32))
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", _low_tensor(values, precision, stats, name="")))
    elif node.op_type == "ConstantOfShape" and types.get(outputs[0]) == FLOAT:
        values = [a for a in node.attribute if a.name == "value"]
        tensor = values[0].t if values else numpy_helper.from_array(np.zeros(1, np.float32))
        converted = _low_tensor(tensor, precision, stats, name=tensor.name)
        if values:
            values[0].t.CopyFrom(converted)
        else:
            node.attribute.append(helper.make_attribute("value", converted))
    elif node.op_type in DTYPE_ATTR_OPS and any(types.get(o) == FLOAT for o in outputs):
        attrs = [a for a in node.attribute if a.name == "dtype"]
        if attrs:
            attrs[0].i = low
        elif node.op_type != "EyeLike" and not node.op_type.endswith("Like"):
            node.attribute.append(helper.make_attribute("dtype", low))


def _all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name in a graph and its subgraphs: new names must not collide with any (SSA)."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        for sub in subgraphs(node):
            names |= _all_names(sub)
    return names


def rewrite(model: onnx.ModelProto, types: dict[str, int], plan: Plan, precision: str) -> RewriteStats:
    """Retype the converted region to fp16/bf16 in place; Cast at every fp32 <-> low boundary and at
    float graph inputs/outputs (which keep their names and float32 type)."""
    g, stats, low = model.graph, RewriteStats(), LOW_TYPES[precision]
    nodes = list(g.node)
    is_fp32 = lambda index: index in plan.fp32  # noqa: E731
    graph_outputs = {o.name for o in g.output}
    taken = _all_names(g)

    def fresh(base: str) -> str:
        name, count = base, 1
        while name in taken:
            name, count = f"{base}_{count}", count + 1
        taken.add(name)
        return name

    # what precision each float tensor's readers need
    need: dict[str, set[str]] = defaultdict(set)
    for index, node in enumerate(nodes):
        if node.op_type not in TYPE_AGNOSTIC:
            for slot, name in enumerate(node.input):
                if name and types.get(name) == FLOAT:
                    need[name].add("fp32" if is_fp32(index) or (index, slot) in plan.fp32_slots else "low")
        for sub in subgraphs(node):
            for name in outer_refs(sub):
                if types.get(name) == FLOAT:
                    need[name].add("fp32")
    for name in graph_outputs:
        need[name].add("fp32")

    # versions[name][precision] = tensor name holding that precision
    versions: dict[str, dict[str, str]] = defaultdict(dict)
    for value in g.input:
        if types.get(value.name) == FLOAT:
            versions[value.name]["fp32"] = value.name
    for init in list(g.initializer):
        if init.data_type != FLOAT:
            continue
        wants = need.get(init.name, set())
        if wants == {"low"}:
            init.CopyFrom(_low_tensor(init, precision, stats))
            versions[init.name]["low"] = init.name
            stats.converted_initializers += 1
        else:
            versions[init.name]["fp32"] = init.name
            if "low" in wants:
                copy = _low_tensor(init, precision, stats, name=fresh(f"{init.name}_{precision}"))
                g.initializer.append(copy)
                versions[init.name]["low"] = copy.name
                stats.duplicated_initializers += 1
    original_outputs = [list(node.output) for node in nodes]
    for index, node in enumerate(nodes):
        for slot, name in enumerate(node.output):
            if name and types.get(name) == FLOAT:
                if is_fp32(index):
                    versions[name]["fp32"] = name
                else:
                    if name in graph_outputs:  # the graph output keeps its name: the low tensor is renamed
                        node.output[slot] = fresh(f"{name}_{precision}")
                    versions[name]["low"] = node.output[slot]

    out_nodes: list[onnx.NodeProto] = []

    def version(name: str, want: str) -> str:
        have = versions[name]
        if want not in have:
            source = have["low" if want == "fp32" else "fp32"]
            cast = fresh(f"{name}_cast_{precision if want == 'low' else 'fp32'}")
            out_nodes.append(helper.make_node("Cast", [source], [cast], name=cast, to=low if want == "low" else FLOAT))
            have[want] = cast
            stats.casts_inserted += 1
        return have[want]

    for index, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            if not name or types.get(name) != FLOAT:
                continue
            if node.op_type in TYPE_AGNOSTIC:
                node.input[slot] = next(iter(versions[name].values()), name)
            else:
                node.input[slot] = version(name, "fp32" if is_fp32(index) or (index, slot) in plan.fp32_slots else "low")
        for sub in subgraphs(node):
            for name in sorted(outer_refs(sub)):
                if types.get(name) == FLOAT and version(name, "fp32") != name:
                    _rename_refs(sub, name, version(name, "fp32"))
        if index not in plan.fp32 and index in plan.float_nodes:
            _retarget(node, original_outputs[index], types, precision, stats)
            stats.low_outputs += [versions[o]["low"] for o in original_outputs[index] if o and types.get(o) == FLOAT]
            stats.converted_nodes += 1
        out_nodes.append(node)
        for name in original_outputs[index]:
            if name in graph_outputs and types.get(name) == FLOAT and "low" in versions[name]:
                versions[name]["fp32"] = name
                out_nodes.append(helper.make_node("Cast", [versions[name]["low"]], [name], name=fresh(f"{name}_cast_fp32"), to=FLOAT))
                stats.casts_inserted += 1
    del g.node[:]
    g.node.extend(out_nodes)
    del g.value_info[:]  # re-inferred after saving
    return stats
