"""The decoder's ONNX Runtime form (graph `decoder_fused`), built straight from the checkpoint's tensors.

Per layer, the ops ONNX Runtime fuses for a Llama-like decoder (what its GenAI model builder emits):
    SkipSimplifiedLayerNormalization -> MatMul (fused QKV, + bias) -> GroupQueryAttention (rotary inside for 1-D RoPE)
    -> MatMul (o) -> SkipSimplifiedLayerNormalization -> MatMul (gate), MatMul (up) -> SiLU(gate) * up -> MatMul (down)
Every matmul is `MatMul(X [B, S, K], W [K, N] initializer)`, the pattern weight-only quantization rewrites.

KV cache in place (manifest `kv_cache: "shared-buffer"`): past_key_values.{i}.key/value are buffers
[B, kv_heads, cache, head_dim] allocated once at the capacity the runtime needs (cache <= max_sequence); the
runtime binds the same buffer as present.{i}.* and GroupQueryAttention writes each step's rows into it. Each row's
tokens sit at slots 0 .. length - 1 of its buffer row (no padding inside the cache, as ONNX Runtime GenAI keeps it):
the graph reads from attention_mask [B, total] only its width (total) and each row's count of ones (its length, so
seqlens_k = length - 1 and a step's new rows go to slots length - S ..). The host's left-padded prefill is aligned
to slot 0 by the runtime's session (prunert.runtime.shared_kv.SharedBufferKVSession); RoPE then rotates at the tokens'
own positions and no key is masked by a bias. I/O names are the standard decoder's (prunert.export.graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prunert.config import FUSED_DECODER
from prunert.export.onnx_writer import MSFT, GraphWriter
from prunert.manifest import KV_SHARED_BUFFER, GraphSpec, TensorSpec

if TYPE_CHECKING:
    from prunert.export.adapter import ExportAdapter

FUSED_OPSET = 17  # default-domain ops used here exist at 17; contrib ops are com.microsoft v1


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of the decoder (ExportAdapter.decoder_rope).
    inv_freq: [head_dim / 2] float32; scaling: HF's attention_scaling on cos/sin;
    sections: M-RoPE's frequencies per position stream (Qwen2.5-VL: (t, h, w) counts summing to head_dim / 2),
    empty for 1-D RoPE (the rotation then runs inside GroupQueryAttention)."""

    inv_freq: np.ndarray
    scaling: float = 1.0
    sections: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class _Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    eps: float


def build_fused_decoder(adapter: ExportAdapter, max_sequence: int, path: Path, dtype: str = "float32") -> GraphSpec:
    """Write `path` (+ `path.data`) from the adapter's text backbone and LM head; returns its manifest spec.
    max_sequence: the longest cache (positions and the buffers' capacity). dtype: weights, compute and KV buffers
    ("float32", or "float16" for an fp16 export); inputs_embeds and logits stay float32 like the standard decoder's."""
    backbone, head = adapter.text_backbone(), adapter.lm_head()
    config = backbone.config
    dims = _Dims(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                 backbone.layers[0].self_attn.head_dim, config.hidden_size, int(head.weight.shape[0]), float(config.rms_norm_eps))
    rope = adapter.decoder_rope()
    leading = tuple(adapter.position_ids_leading_dims)
    w = GraphWriter(path, FUSED_DECODER)
    try:
        inputs, outputs = _io(w, dims, leading, dtype)
        prelude = _prelude(w, dims, rope, max_sequence, dtype)
        hidden, residual = ("inputs_embeds" if dtype == "float32" else w.one("Cast", ["inputs_embeds"], to=_onnx_type(dtype))), ""
        for i, layer in enumerate(backbone.layers):
            hidden, residual = _layer(w, i, layer, dims, rope, prelude, hidden, residual, dtype)
        normed = _norm(w, hidden, residual, backbone.norm.weight, dims, dtype, "/model/norm")[0]
        low = dtype != "float32"
        logits = w.op("MatMul", [normed, w.weight("lm_head.weight", _t(head.weight, dtype))], [w.fresh("logits") if low else "logits"],
                      name="/lm_head/MatMul")  # [B, S, V]
        if low:
            w.op("Cast", logits, ["logits"], to=1)  # float32 logits, as the standard decoder's
        w.save(FUSED_OPSET)
    finally:
        w.close()
    cache_range = {"cache": (1, max_sequence, max_sequence)}
    return GraphSpec(file=path.name, inputs=tuple(TensorSpec(*t) for t in inputs), outputs=tuple(TensorSpec(*t) for t in outputs),
                     external_data=w.data_name, dim_ranges=cache_range, kv_cache=KV_SHARED_BUFFER)


def _io(w: GraphWriter, d: _Dims, leading: tuple[int, ...], dtype: str):
    kv = ("batch", d.kv_heads, "cache", d.head_dim)
    inputs = [("inputs_embeds", "float32", ("batch", "sequence", d.hidden)), ("attention_mask", "int64", ("batch", "total")),
              ("position_ids", "int64", (*leading, "batch", "sequence"))]
    outputs = [("logits", "float32", ("batch", "sequence", d.vocab))]
    for i in range(d.layers):
        for kind in ("key", "value"):
            inputs.append((f"past_key_values.{i}.{kind}", dtype, kv))
            outputs.append((f"present.{i}.{kind}", dtype, kv))
    for name, type_, shape in inputs:
        w.add_input(name, type_, shape)
    for name, type_, shape in outputs:
        w.add_output(name, type_, shape)
    return inputs, outputs


def _prelude(w: GraphWriter, d: _Dims, rope: RopeSpec, max_sequence: int, dtype: str) -> dict[str, str]:
    """Tensors every layer shares: seqlens_k [B] int32 (each row's length - 1), total_sequence_length [] int32 (the
    mask's width), and the rotary inputs (1-D: cos/sin caches [max_sequence, head_dim/2], indexed by GroupQueryAttention
    at each row's slots; M-RoPE: cos/sin [B, S, 1, head_dim/2] for the rotation done before attention)."""
    total64 = w.one("Gather", [w.one("Shape", ["attention_mask"]), w.const(1)], axis=0)  # []
    lengths = w.one("ReduceSum", ["attention_mask", w.const([1])], keepdims=0)  # [B] int64: each row's count of ones
    seqlens = w.one("Cast", [w.one("Sub", [lengths, w.const(1)])], to=6)  # [B] int32
    out = {"seqlens_k": seqlens, "total": w.one("Cast", [total64], to=6)}
    inv_freq = np.asarray(rope.inv_freq, np.float64)
    if not rope.sections:
        angles = np.arange(max_sequence, dtype=np.float64)[:, None] * inv_freq[None]  # [max_sequence, head_dim/2]
        out["cos"] = w.weight("rotary.cos_cache", (np.cos(angles) * rope.scaling).astype(dtype))
        out["sin"] = w.weight("rotary.sin_cache", (np.sin(angles) * rope.scaling).astype(dtype))
        return out
    # M-RoPE: angle[b, s, f] = position[stream(f), b, s] * inv_freq[f]; a one-hot [streams, head_dim/2] weight picks the stream
    streams = np.repeat(np.arange(len(rope.sections)), rope.sections)  # [head_dim/2]
    pick = (np.arange(len(rope.sections))[:, None] == streams[None]) * inv_freq[None].astype(np.float32)
    positions = w.one("Unsqueeze", [w.one("Cast", ["position_ids"], to=1), w.const([-1])])  # [streams, B, S, 1] float32
    picked = w.one("Mul", [positions, w.weight("rotary.mrope_inv_freq", pick.astype(np.float32)[:, None, None])])  # [streams, B, S, hd/2]
    angles = w.one("ReduceSum", [picked, w.const([0])], keepdims=0)  # [B, S, head_dim/2]: one nonzero term per frequency
    for name, op in (("cos", "Cos"), ("sin", "Sin")):
        value = w.one("Mul", [w.one(op, [angles]), w.const(rope.scaling, "float32")])
        out[name] = w.one("Unsqueeze", [w.one("Cast", [value], to=_onnx_type(dtype)), w.const([2])])  # [B, S, 1, head_dim/2]
    return out


def _layer(w: GraphWriter, i: int, layer: Any, d: _Dims, rope: RopeSpec, pre: dict[str, str], hidden: str, residual: str, dtype: str):
    """One decoder layer. hidden: the previous layer's output delta (or inputs_embeds); residual: the running sum
    ("" at layer 0). Returns (this layer's MLP output, the residual it adds to)."""
    scope = f"/model/layers.{i}"
    attn, mlp = layer.self_attn, layer.mlp
    x, residual = _norm(w, hidden, residual, layer.input_layernorm.weight, d, dtype, f"{scope}/input_layernorm")  # [B, S, D]
    qkv_w = np.concatenate([_t(attn.q_proj.weight, dtype), _t(attn.k_proj.weight, dtype), _t(attn.v_proj.weight, dtype)], axis=1)
    qkv = w.one("MatMul", [x, w.weight(f"layers.{i}.attn.qkv_proj.weight", qkv_w)], name=f"{scope}/attn/qkv_proj/MatMul")
    if attn.q_proj.bias is not None:
        bias = np.concatenate([_np(p.bias, dtype) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
        qkv = w.one("Add", [qkv, w.weight(f"layers.{i}.attn.qkv_proj.bias", bias)])
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    present = [f"present.{i}.key", f"present.{i}.value"]
    common = dict(num_heads=d.heads, kv_num_heads=d.kv_heads)
    if rope.sections:  # M-RoPE: q and k rotated with standard ops from the streams' cos/sin, attention without rotary
        q_size, kv_size = d.heads * d.head_dim, d.kv_heads * d.head_dim
        q, k, v = w.op("Split", [qkv, w.const([q_size, kv_size, kv_size])], 3, axis=-1)  # [B, S, H*hd], [B, S, KV*hd] x 2
        q, k = _rotate(w, q, d.heads, d.head_dim, pre), _rotate(w, k, d.kv_heads, d.head_dim, pre)
        packed = w.one("Concat", [q, k, v], axis=-1)  # [B, S, (H + 2 KV) * hd]: packed, as on the 1-D path
        feeds = [packed, "", "", *past, pre["seqlens_k"], pre["total"]]
    else:  # 1-D RoPE inside attention, on packed QKV, at cache slots: a row's slot j holds its position j
        feeds = [qkv, "", "", *past, pre["seqlens_k"], pre["total"], pre["cos"], pre["sin"]]
        common["do_rotary"] = 1
    attended = w.op("GroupQueryAttention", feeds, [w.fresh("attn"), *present], domain=MSFT, name=f"{scope}/attn/GroupQueryAttention", **common)[0]
    o = w.one("MatMul", [attended, w.weight(f"layers.{i}.attn.o_proj.weight", _t(attn.o_proj.weight, dtype))], name=f"{scope}/attn/o_proj/MatMul")
    x, residual = _norm(w, o, residual, layer.post_attention_layernorm.weight, d, dtype, f"{scope}/post_attention_layernorm")
    # gate and up as two MatMuls (as ORT-GenAI's builder): one fused [D, 2I] MatMul needs a Split that copies [B, S, 2I]
    gate, up = (w.one("MatMul", [x, w.weight(f"layers.{i}.mlp.{name}.weight", _t(proj.weight, dtype))], name=f"{scope}/mlp/{name}/MatMul")
                for name, proj in (("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)))  # [B, S, I] x 2
    act = w.one("Mul", [w.one("Mul", [gate, w.one("Sigmoid", [gate])]), up])  # SiLU(gate) * up
    down = w.one("MatMul", [act, w.weight(f"layers.{i}.mlp.down_proj.weight", _t(mlp.down_proj.weight, dtype))], name=f"{scope}/mlp/down_proj/MatMul")
    return down, residual


def _norm(w: GraphWriter, hidden: str, residual: str, weight: Any, d: _Dims, dtype: str, scope: str) -> tuple[str, str]:
    """RMSNorm of residual + hidden: (normed [B, S, D], the new residual sum). No residual yet: the plain norm of hidden."""
    gamma = w.weight(f"{scope.strip('/').replace('/', '.')}.weight", _np(weight, dtype))
    if not residual:
        return w.one("SimplifiedLayerNormalization", [hidden, gamma], name=f"{scope}/SimplifiedLayerNorm", axis=-1, epsilon=d.eps), hidden
    normed, _, _, total = w.op("SkipSimplifiedLayerNormalization", [hidden, residual, gamma], [w.fresh("normed"), "", "", w.fresh("residual")],
                               domain=MSFT, name=f"{scope}/SkipSimplifiedLayerNorm", epsilon=d.eps)
    return normed, total


def _rotate(w: GraphWriter, x: str, heads: int, head_dim: int, pre: dict[str, str]) -> str:
    """rotate-half rotary with cos/sin [B, S, 1, hd/2] on x [B, S, heads*hd] -> the same shape."""
    split = w.one("Reshape", [x, w.const([0, 0, heads, head_dim])])  # [B, S, heads, hd]
    x1, x2 = w.op("Split", [split, w.const([head_dim // 2, head_dim // 2])], 2, axis=-1)
    cos, sin = pre["cos"], pre["sin"]
    first = w.one("Sub", [w.one("Mul", [x1, cos]), w.one("Mul", [x2, sin])])
    second = w.one("Add", [w.one("Mul", [x2, cos]), w.one("Mul", [x1, sin])])
    return w.one("Reshape", [w.one("Concat", [first, second], axis=-1), w.const([0, 0, heads * head_dim])])


def _np(tensor: Any, dtype: str) -> np.ndarray:
    return tensor.detach().to(dtype=_torch_dtype(dtype)).cpu().numpy()


def _t(weight: Any, dtype: str) -> np.ndarray:
    """A torch Linear weight [out, in] -> [in, out] for MatMul(X, W)."""
    return np.ascontiguousarray(_np(weight, dtype).T)


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[dtype]


def _onnx_type(dtype: str) -> int:
    return {"float32": 1, "float16": 10}[dtype]
