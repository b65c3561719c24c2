"""Int4 weight-only quantization of the decoder role's graphs: `prunert quantize A --weights int4`.

Every `MatMul(X [.., K], W [K, N] float initializer)` of a decoder graph gets symmetric int4 weights
q in [-8, 7], one fp32 scale per block of `block_size` rows of K per output column n:
    W[k, n] ~= q[k, n] * scale[k // block_size, n]
The SAME q and scales are written in two forms:
  - "dq" (TensorRT form, standard ops): DequantizeLinear(q int4 [K, N], scale [ceil(K/B), N], axis=0,
    block_size=B) -> MatMul. Opset 21 (the INT4 type and DequantizeLinear's block_size attribute).
    ONNX Runtime CPU fuses this pair into MatMulNBits itself (DQMatMulToMatMulNBits).
  - "nbits" (ONNX Runtime form): com.microsoft MatMulNBits(X, B uint8 [N, ceil(K/B), B/2], scales [N*ceil(K/B)])
    with bits=4, no zero-point input (ORT's default zero point 8 for the unsigned nibbles q + 8).
AWQ (prunert.calibration.awq) scales the weights per input channel first and puts the inverse scales into the
norm weight producing their input where exact, else a Mul before the matmuls that share it; RTN and GPTQ
(prunert.calibration.gptq) quantize the weights as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from prunert.errors import ExportError

INT4_LOW, INT4_HIGH = -8, 7
INT4_OPSET = 21  # the INT4 tensor type and DequantizeLinear block_size (ONNX opset 21)
ORT_DOMAIN = "com.microsoft"
FORMS = ("dq", "nbits")
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Int4Weight:
    """One [K, N] weight as block-wise symmetric int4: values [K, N] int8 in [-8, 7], scales [ceil(K/B), N]."""

    values: np.ndarray
    scales: np.ndarray
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """[K, N] float32: q * scale of its block."""
        rows = np.repeat(self.scales, self.block_size, axis=0)[: self.values.shape[0]]  # [K, N]
        return self.values.astype(np.float32) * rows


def quantize_blockwise(weight: np.ndarray, block_size: int) -> Int4Weight:
    """Round-to-nearest block-wise int4 of weight [K, N]: scale = max |w| of the block / 7 (an all-zero block: 1)."""
    weight = np.asarray(weight, np.float32)
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    grouped = padded.reshape(blocks, block_size, n)  # [blocks, B, N]
    amax = np.abs(grouped).max(axis=1)  # [blocks, N]
    scales = np.where(amax > 0, amax / INT4_HIGH, 1.0).astype(np.float32)
    values = np.clip(np.rint(grouped / scales[:, None, :]), INT4_LOW, INT4_HIGH).astype(np.int8)
    return Int4Weight(values.reshape(-1, n)[:k], scales, block_size)


def pack_matmulnbits(weight: Int4Weight) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B uint8 [N, blocks, B/2] (element 2i in the low nibble, stored as q + 8) and scales [N * blocks]."""
    k, n = weight.shape
    blocks, size = weight.scales.shape[0], weight.block_size
    padded = np.zeros((blocks * size, n), np.int16)
    padded[:k] = weight.values
    nibbles = (padded + 8).astype(np.uint8).T.reshape(n, blocks, size)  # [N, blocks, B]
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed, np.ascontiguousarray(weight.scales.T).reshape(-1)


def unpack_matmulnbits(packed: np.ndarray, scales: np.ndarray, k: int, block_size: int) -> Int4Weight:
    """The inverse of pack_matmulnbits (tests, inspection)."""
    n, blocks, _ = packed.shape
    nibbles = np.empty((n, blocks, block_size), np.int16)
    nibbles[..., 0::2] = packed & 0x0F
    nibbles[..., 1::2] = packed >> 4
    values = (nibbles.reshape(n, -1).T[:k] - 8).astype(np.int8)  # [K, N]
    return Int4Weight(values, scales.reshape(n, blocks).T.astype(np.float32), block_size)


@dataclass(frozen=True)
class MatMulTarget:
    """A MatMul whose weight is a 2-D float initializer: node index, its activation input, weight name, [K, N]."""

    node: int
    activation: str
    weight: str
    shape: tuple[int, int]
    dtype: int = TensorProto.FLOAT  # the weight's element type: the int4 scales take it (MatMul's T, MatMulNBits' T1)


def matmul_targets(model: onnx.ModelProto, skip_columns: tuple[int, ...] = ()) -> list[MatMulTarget]:
    """The top-level MatMuls with a 2-D float initializer weight [K, N], except weights with N in skip_columns
    (the lm_head: N = vocab size) and weights some other node also reads."""
    inits = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    targets = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type not in _FLOATS or init.dims[1] in skip_columns or readers[init.name] != 1:
            continue
        targets.append(MatMulTarget(index, node.input[0], init.name, (int(init.dims[0]), int(init.dims[1])), init.data_type))
    return targets


def weight_array(model: onnx.ModelProto, name: str, base_dir: Path | None = None) -> np.ndarray:
    init = next(init for init in model.graph.initializer if init.name == name)
    return numpy_helper.to_array(init, base_dir=str(base_dir) if base_dir else "").astype(np.float32)


def rewrite(model: onnx.ModelProto, quantized: dict[str, Int4Weight], inverse_scales: dict[str, np.ndarray],
            targets: list[MatMulTarget], form: str, accuracy_level: int) -> onnx.ModelProto:
    """A copy of `model` whose target MatMuls read `quantized[weight]` in `form` ("dq" or "nbits"); an
    activation with inverse_scales[activation] [K] is multiplied by them first (AWQ), once for all its readers.
    In the nbits form, sibling targets (one activation, the same K and block size: e.g. gate and up) become one
    MatMulNBits over their weights side by side and a Split (_siblings)."""
    if form not in FORMS:
        raise ExportError(f"int4 form: got {form!r}, expected one of {list(FORMS)}")
    out = _copy_without(model, {t.weight for t in targets})  # not a second copy of the float weights
    graph = out.graph
    by_node = {t.node: t for t in targets}
    scaled = {name: f"{name}_awq_scaled" for name in inverse_scales}
    nodes: list[onnx.NodeProto] = []
    folded = {x: _fold_into_producer(model, graph, x, inverse_scales[x], targets) for x in inverse_scales}
    replaced = {index: node for index, node in folded.values() if index is not None}  # producer index -> its rescaled copy
    muls_done = {x for x, (index, _) in folded.items() if index is not None}
    scaled = {x: name for x, name in scaled.items() if x not in muls_done} | {x: x for x in muls_done}
    siblings = _siblings(targets) if form == "nbits" else {}
    for index, node in enumerate(model.graph.node):
        target = by_node.get(index)
        if target is None:
            nodes.append(replaced.get(index, node))  # the source model's node (extend copies it)
            continue
        group = siblings.get(index, (target,))
        if not group:  # written with its first sibling
            continue
        x = target.activation
        if x in scaled:
            if x not in muls_done:  # [.., K] * [K]
                inverse = inverse_scales[x].astype(helper.tensor_dtype_to_np_dtype(target.dtype))
                graph.initializer.append(numpy_helper.from_array(inverse, f"{x}_awq_inverse"))
                nodes.append(helper.make_node("Mul", [x, f"{x}_awq_inverse"], [scaled[x]], name=f"{x}_awq_mul"))
                muls_done.add(x)
            x = scaled[x]
        if len(group) == 1:
            nodes.extend(_int4_matmul(graph, node, x, quantized[target.weight], target, form, accuracy_level))
        else:
            nodes.extend(_sibling_matmul(graph, model, x, group, quantized, accuracy_level))
    del graph.node[:]
    graph.node.extend(nodes)
    _set_opsets(out, form)
    return out


def _siblings(targets: list[MatMulTarget]) -> dict[int, tuple[MatMulTarget, ...]]:
    """node index -> the sibling group it heads (every target of one activation with the same K and dtype, in graph
    order), or () for a later member. Only groups of two or more.

    A decode step runs each weight-only matmul as its own parallel section: one MatMulNBits over [K, N1 + N2] and a
    Split of its [.., N1 + N2] output measured ~2% faster per int4 step than two MatMulNBits (llava-1.5-shaped
    decoder, gate/up, 2 threads, context 104, 0.6% and 3.6% with either session opened first), and ~1% slower for a
    1500-token prefill (the Split's copy)."""
    groups: dict[tuple, list[MatMulTarget]] = {}
    for target in sorted(targets, key=lambda t: t.node):
        groups.setdefault((target.activation, target.shape[0], target.dtype), []).append(target)
    out: dict[int, tuple[MatMulTarget, ...]] = {}
    for group in (g for g in groups.values() if len(g) > 1):
        out[group[0].node] = tuple(group)
        out.update({t.node: () for t in group[1:]})
    return out


def _sibling_matmul(graph: onnx.GraphProto, model: onnx.ModelProto, x: str, group: tuple[MatMulTarget, ...],
                    quantized: dict[str, Int4Weight], accuracy_level: int) -> list[onnx.NodeProto]:
    """One MatMulNBits over the group's int4 weights side by side [K, sum N], then a Split into each member's output."""
    weights = [quantized[t.weight] for t in group]
    if len({w.block_size for w in weights}) != 1:
        raise ExportError(f"int4 siblings {[t.weight for t in group]}: block sizes {[w.block_size for w in weights]} differ")
    joined = Int4Weight(np.concatenate([w.values for w in weights], axis=1), np.concatenate([w.scales for w in weights], axis=1),
                        weights[0].block_size)  # [K, sum N], [blocks, sum N]
    head, widths = group[0], [t.shape[1] for t in group]
    name = f"{head.weight}_siblings{len(group)}"
    merged = MatMulTarget(head.node, x, name, (head.shape[0], sum(widths)), head.dtype)
    first = model.graph.node[head.node]
    out = f"{name}_out"
    matmul = onnx.NodeProto()
    matmul.CopyFrom(first)  # the head's name and metadata, the joined output
    matmul.name = f"{first.name or name}_siblings{len(group)}"
    del matmul.output[:]
    matmul.output.append(out)
    nodes = _int4_matmul(graph, matmul, x, joined, merged, "nbits", accuracy_level)  # [.., sum N]
    graph.initializer.append(numpy_helper.from_array(np.asarray(widths, np.int64), f"{name}_split"))
    outputs = [model.graph.node[t.node].output[0] for t in group]
    nodes.append(helper.make_node("Split", [out, f"{name}_split"], outputs, name=f"{matmul.name}_split", axis=-1))
    return nodes


def _copy_without(model: onnx.ModelProto, drop: set[str]) -> onnx.ModelProto:
    """A copy of `model` without the graph initializers named in `drop` (never copied: a 7B decoder's weights)."""
    out = onnx.ModelProto()
    for source, target in ((model, out), (model.graph, out.graph)):
        for field_desc, value in source.ListFields():
            if field_desc.name == "graph" and source is model:
                continue
            if field_desc.name == "initializer":
                target.initializer.extend(init for init in value if init.name not in drop)
            elif field_desc.is_repeated:
                getattr(target, field_desc.name).extend(value)
            elif field_desc.type == field_desc.TYPE_MESSAGE:
                getattr(target, field_desc.name).CopyFrom(value)
            else:
                setattr(target, field_desc.name, value)
    return out


# Producers whose output is (normalised x) * weights (+ bias) with [K] initializers at these inputs: dividing them by
# s is exact. Skip* norms' pre-norm bias (input + skip + bias) is not among them.
_SCALE_INPUTS = {"SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (2,), "RMSNormalization": (1,),
                 "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}


def _fold_into_producer(model: onnx.ModelProto, graph: onnx.GraphProto, x: str, inverse: np.ndarray,
                        targets: list[MatMulTarget]) -> tuple[int | None, onnx.NodeProto | None]:
    """Fold the AWQ inverse scales [K] of activation x into the norm (or Mul by a [K] initializer) producing it, where
    exact: x feeds only target matmuls. Its scale initializers are copied, rescaled, into `graph` (the copy being
    written; the originals may be shared with other nodes). -> (the producer's index, its new node), or (None, None):
    not folded, a Mul goes before the matmuls."""
    readers = [node for node in model.graph.node if x in node.input]
    matmuls = {id(model.graph.node[t.node]) for t in targets if t.activation == x}
    if any(id(node) not in matmuls for node in readers) or x in {o.name for o in model.graph.output}:
        return None, None
    index = next((i for i, node in enumerate(model.graph.node) if x in node.output), None)
    producer = model.graph.node[index] if index is not None else None
    if producer is None or producer.domain not in ("", "ai.onnx", "com.microsoft") or producer.output[0] != x:
        return None, None
    inits = {init.name: init for init in graph.initializer}
    if producer.op_type == "Mul":
        positions = tuple(i for i, name in enumerate(producer.input) if name in inits)
    else:
        positions = tuple(i for i in _SCALE_INPUTS.get(producer.op_type, ()) if i < len(producer.input) and producer.input[i])
    if not positions or any(producer.input[i] not in inits or tuple(inits[producer.input[i]].dims) != inverse.shape for i in positions):
        return None, None
    node = onnx.NodeProto()
    node.CopyFrom(producer)
    for i in positions:
        value = numpy_helper.to_array(inits[producer.input[i]])
        node.input[i] = f"{producer.input[i]}_awq_{x}"
        graph.initializer.append(numpy_helper.from_array((value.astype(np.float32) * inverse).astype(value.dtype), node.input[i]))
    return index, node


def _int4_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, x: str, weight: Int4Weight, target: MatMulTarget,
                 form: str, accuracy_level: int) -> list[onnx.NodeProto]:
    import ml_dtypes

    name, k, n = target.weight, target.shape[0], target.shape[1]
    scale_type = helper.tensor_dtype_to_np_dtype(target.dtype)
    if form == "dq":  # q [K, N] int4, scales [blocks, N] -> W [K, N] -> MatMul
        graph.initializer.append(numpy_helper.from_array(weight.values.astype(ml_dtypes.int4), f"{name}_int4"))
        graph.initializer.append(numpy_helper.from_array(weight.scales.astype(scale_type), f"{name}_int4_scale"))
        dq = helper.make_node("DequantizeLinear", [f"{name}_int4", f"{name}_int4_scale"], [f"{name}_dequantized"],
                              name=f"{node.name or name}_dq", axis=0, block_size=weight.block_size)
        matmul = helper.make_node("MatMul", [x, f"{name}_dequantized"], list(node.output), name=node.name)
        matmul.metadata_props.extend(node.metadata_props)
        return [dq, matmul]
    packed, scales = pack_matmulnbits(weight)  # [N, blocks, B/2] uint8, [N * blocks]
    graph.initializer.append(numpy_helper.from_array(packed, f"{name}_nbits"))
    graph.initializer.append(numpy_helper.from_array(scales.astype(scale_type), f"{name}_nbits_scale"))
    fused = helper.make_node("MatMulNBits", [x, f"{name}_nbits", f"{name}_nbits_scale"], list(node.output), name=node.name,
                             domain=ORT_DOMAIN, K=k, N=n, bits=4, block_size=weight.block_size, accuracy_level=accuracy_level)
    fused.metadata_props.extend(node.metadata_props)
    return [fused]


def _set_opsets(model: onnx.ModelProto, form: str) -> None:
    """dq: default-domain opset >= 21 (the ops between 20 and 21 only gained the int4/uint4 types); nbits: +com.microsoft 1."""
    if form == "dq":
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx") and entry.version < INT4_OPSET:
                entry.version = INT4_OPSET
    elif not any(entry.domain == ORT_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))


def int4_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Block-quantized DequantizeLinear and MatMulNBits nodes of a graph (what the variant settings record)."""
    counts = {"DequantizeLinear": 0, "MatMulNBits": 0}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
