"""The int4 numbers of one decoder graph (Int4Plan: RTN, AWQ or GPTQ), carried over to the graph's other form, and
written out (`prunert quantize`). prunert.calibration.weight_only holds the int4 primitives and the rewrite.

The standard decoder is planned from its own calibration feeds. The fused decoder (FUSED_DECODER: fused QKV weights,
the same matrices concatenated along N) takes the standard plan through `transfer_plan`:
its matmul groups pair with the standard ones in graph order, and each fused weight column takes the int4 numbers
and block scales of its identical column in the pair (every algorithm here quantizes each output column on its
own), so both forms hold the very same int4 numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from prunert.calibration.weight_only import (Int4Weight, MatMulTarget, int4_counts, matmul_targets, quantize_blockwise, rewrite,
                                             weight_array)
from prunert.errors import ExportError


@dataclass(frozen=True)
class Int4Plan:
    groups: tuple[tuple[MatMulTarget, ...], ...]  # targets by shared activation, in graph order
    quantized: dict[str, Int4Weight]  # weight initializer -> its int4 numbers
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # activation -> AWQ s [K] (weights scaled by s, X by 1/s)
    alphas: dict[str, float] = field(default_factory=dict)
    algo: str = "rtn"  # what ran
    error_ratio: float | None = None  # AWQ / RTN summed output error on the sampled rows
    column_keys: tuple[tuple[bytes, ...], ...] = ()  # per group, a digest of each float weight column (transfer_plan)

    @property
    def targets(self) -> list[MatMulTarget]:
        return sorted((t for group in self.groups for t in group), key=lambda t: t.node)


@dataclass(frozen=True)
class Int4Summary:
    graph: str  # output file name
    form: str  # "dq" (TensorRT) or "nbits" (ONNX Runtime)
    algo: str
    quantized_matmuls: int
    kept_float_matmuls: int  # MatMuls with a float initializer weight left as they are (lm_head at --lm-head fp32)
    awq_alphas: dict[str, float]
    error_ratio: float | None  # AWQ / GPTQ summed output error over RTN's on the sampled rows
    nodes: dict[str, int]  # int4_counts
    external_data: str | None
    size_bytes: int


def _groups(targets: list[MatMulTarget]) -> tuple[tuple[MatMulTarget, ...], ...]:
    groups: dict[str, list[MatMulTarget]] = {}
    for target in targets:
        groups.setdefault(target.activation, []).append(target)
    return tuple(tuple(group) for group in groups.values())


def _targets(structure: onnx.ModelProto, config, vocab_size: int, where: str) -> list[MatMulTarget]:
    targets = matmul_targets(structure, (vocab_size,) if config.lm_head == "fp32" else ())
    if not targets:
        raise ExportError(f"{where}: no MatMul with a 2-D float initializer weight to quantize to int4")
    return targets


def plan_int4(src: Path, model: onnx.ModelProto, config, vocab_size: int, feeds: list[dict[str, np.ndarray]], log) -> Int4Plan:
    """The int4 numbers of the graph at `src` (`model`: it with its weights): RTN, or AWQ / GPTQ from the feeds."""
    structure = onnx.load(str(src), load_external_data=False)
    groups = _groups(_targets(structure, config, vocab_size, Path(src).name))
    plan = _plan(src, structure, model, groups, config, feeds, log)
    keys = tuple(tuple(key for t in group for key in _column_keys(weight_array(model, t.weight))) for group in groups)
    return replace(plan, column_keys=keys)


def _column_keys(weight: np.ndarray) -> list[bytes]:
    """A digest of each column of weight [K, N] (float32 bytes)."""
    return [hashlib.blake2b(column.tobytes(), digest_size=16).digest() for column in np.ascontiguousarray(weight.T)]


def _plan(src: Path, structure: onnx.ModelProto, model: onnx.ModelProto, groups, config, feeds, log) -> Int4Plan:
    from prunert.calibration.awq import activation_stats, search_scales
    from prunert.calibration.gptq import gptq_quantize

    if config.algo == "rtn" or not feeds:
        quantized = {t.weight: quantize_blockwise(weight_array(model, t.weight), config.block_size) for g in groups for t in g}
        return Int4Plan(groups, quantized)
    external = any(init.data_location == TensorProto.EXTERNAL for init in structure.graph.initializer)
    log(f"{config.algo.upper()}: activation statistics of {len(groups)} matmul inputs on {len(feeds)} feeds")
    stats = activation_stats(structure, str(Path(src).parent) if external else None, {g[0].activation: g[0].dtype for g in groups}, feeds, config.sample_rows)
    if config.algo == "gptq":
        quantized, errors = {}, [0.0, 0.0]
        for group in groups:
            rows = stats[group[0].activation].rows  # [R, K]
            for t in group:
                weight = weight_array(model, t.weight)
                quantized[t.weight] = gptq_quantize(weight, rows, config.block_size, config.gptq_damp)
                errors[0] += float(np.square(rows @ (weight - quantize_blockwise(weight, config.block_size).dequantize())).sum())
                errors[1] += float(np.square(rows @ (weight - quantized[t.weight].dequantize())).sum())
        return Int4Plan(groups, quantized, algo="gptq", error_ratio=errors[1] / errors[0] if errors[0] > 0 else None)
    quantized, scales, alphas, errors = {}, {}, {}, [0.0, 0.0]
    for group in groups:
        activation = group[0].activation
        choice, ints = search_scales(stats[activation], [weight_array(model, t.weight) for t in group], config.block_size, config.awq_grid)
        quantized.update({t.weight: q for t, q in zip(group, ints)})
        alphas[activation], errors[0], errors[1] = choice.alpha, errors[0] + choice.rtn_error, errors[1] + choice.error
        if choice.alpha > 0:
            scales[activation] = 1.0 / choice.inverse_scales
    return Int4Plan(groups, quantized, scales, alphas, "awq", errors[1] / errors[0] if errors[0] > 0 else None)


def transfer_plan(plan: Int4Plan, other_src: Path, other: onnx.ModelProto, config, vocab_size: int) -> Int4Plan | None:
    """`plan` for the graph `other` holding the same matrices in other groupings (fused QKV): groups paired in
    order; each of `other`'s weight columns takes the int4 column and scales of the identical column of its pair
    (plan.column_keys; RTN, AWQ and GPTQ quantize each output column on its own). None where a column has no twin."""
    structure = onnx.load(str(other_src), load_external_data=False)
    groups = _groups(_targets(structure, config, vocab_size, Path(other_src).name))
    if len(groups) != len(plan.groups):
        return None
    quantized, scales, alphas = {}, {}, {}
    for mine, theirs, keys in zip(plan.groups, groups, plan.column_keys):
        values = np.concatenate([plan.quantized[t.weight].values for t in mine], axis=1)  # [K, sum N]
        blocks = np.concatenate([plan.quantized[t.weight].scales for t in mine], axis=1)  # [K/B, sum N]
        column = {key: j for j, key in enumerate(keys)}
        for t in theirs:
            weight = weight_array(other, t.weight)  # [K, N]
            picks = [column.get(key) for key in _column_keys(weight)] if weight.shape[0] == values.shape[0] else [None]
            if None in picks:
                return None
            quantized[t.weight] = Int4Weight(values[:, picks], blocks[:, picks], config.block_size)
        activation = mine[0].activation
        if activation in plan.scales:
            scales[theirs[0].activation] = plan.scales[activation]
        if activation in plan.alphas:
            alphas[theirs[0].activation] = plan.alphas[activation]
    return Int4Plan(groups, quantized, scales, alphas, plan.algo, plan.error_ratio)


def write_int4(model: onnx.ModelProto, plan: Int4Plan, form: str, dst: Path, config, external: bool,
               feed: dict[str, np.ndarray] | None = None) -> Int4Summary:
    """`model` with the plan's int4 weights in `form`, saved at dst (external data like the source), run once on `feed`."""
    from prunert.calibration.quantize import _check_runs, _save
    from prunert.staged_dir import _umask

    inverse = {activation: (1.0 / s).astype(np.float32) for activation, s in plan.scales.items()}
    written = rewrite(model, plan.quantized, inverse, plan.targets, form, config.accuracy_level)
    dst = Path(dst)
    _save(written, dst, external)
    for path in dst.parent.glob(dst.name + "*"):  # onnx writes external data 0600: give it a plain file's mode
        path.chmod(0o666 & ~_umask())
    if feed is not None:
        _check_runs(dst, config.precision, feed)
    inits = {init.name for init in model.graph.initializer}
    floats = sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits) - len(plan.targets)
    return Int4Summary(
        graph=dst.name, form=form, algo=plan.algo, quantized_matmuls=len(plan.targets), kept_float_matmuls=floats,
        awq_alphas=dict(plan.alphas), error_ratio=plan.error_ratio, nodes=int4_counts(written),
        external_data=dst.name + ".data" if external else None,
        size_bytes=sum(p.stat().st_size for p in dst.parent.glob(dst.name + "*")),
    )
