"""AWQ (activation-aware weight quantization) scales for int4 weight-only matmuls.

For each activation X [.., K] read by quantized matmuls (q/k/v share theirs, gate/up theirs):
  1. m = mean |x| per input channel over the calibration rows (the fp32 graph run on the calibration feeds);
  2. for alpha in {0, 1/grid, .., (grid-1)/grid}: s = m^alpha / sqrt(max * min), each W_i [K, N] becomes
     Q(diag(s) W_i) (block-wise int4 RTN) and X becomes X / s; keep the alpha whose summed output error
     sum_i ||X W_i - (X / s) Q(diag(s) W_i)||^2 over sampled rows is smallest (alpha 0 is plain RTN, so AWQ
     never does worse than RTN on those rows);
  3. the weights are stored scaled; 1/s goes into the norm weight producing X where exact, else a Mul on X
     before its matmuls (weight_only.rewrite).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from prunert.calibration.weight_only import Int4Weight, quantize_blockwise


@dataclass(frozen=True)
class ActivationStats:
    mean_abs: np.ndarray  # [K] mean |x| per input channel over every calibration row
    rows: np.ndarray  # [R, K] sampled rows for the error search


@dataclass(frozen=True)
class ScaleChoice:
    alpha: float
    inverse_scales: np.ndarray  # [K] 1 / s, multiplied into X
    rtn_error: float  # summed squared output error at alpha 0
    error: float  # at the chosen alpha


def activation_stats(model: onnx.ModelProto, external_dir: str | None, activations: dict[str, int],
                     feeds: list[dict[str, np.ndarray]], rows: int, seed: int = 0) -> dict[str, ActivationStats]:
    """Run the float graph (`model` loaded without external data; its weights files in external_dir) on the feeds
    with `activations` (name -> element type) as extra outputs: their mean |x| per channel and up to `rows` sampled
    rows each (float32)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {out.name for out in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, kind, None) for name, kind in activations.items() if name not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if external_dir:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_dir)
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    per_feed = max(1, -(-rows // max(len(feeds), 1)))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in activations}
    for feed in feeds:
        values = session.run(list(activations), {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip(activations, values):
            flat = np.asarray(value, np.float32).reshape(-1, value.shape[-1])  # [rows, K]
            sums[name] = sums.get(name, 0) + np.abs(flat).sum(axis=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
            pick = rng.choice(flat.shape[0], size=min(per_feed, flat.shape[0]), replace=False)
            samples[name].append(flat[np.sort(pick)])
    return {name: ActivationStats(sums[name] / counts[name], np.concatenate(samples[name])[:rows]) for name in activations}


def search_scales(stats: ActivationStats, weights: list[np.ndarray], block_size: int, grid: int) -> tuple[ScaleChoice, list[Int4Weight]]:
    """The alpha minimising the summed output error of `weights` (all read the same X); -> (choice, their int4 weights)."""
    x = stats.rows  # [R, K]
    reference = [x @ w for w in weights]  # [R, N_i]
    mean = np.maximum(stats.mean_abs, max(float(stats.mean_abs.max()), 1e-12) * 1e-5)  # [K], no zero channel
    best: tuple[float, float, np.ndarray, list[Int4Weight]] | None = None
    rtn_error = 0.0
    for step in range(grid):
        alpha = step / grid
        s = mean**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # [K]
        quantized = [quantize_blockwise(w * s[:, None], block_size) for w in weights]
        xs = x / s
        error = float(sum(np.square(ref - xs @ q.dequantize()).sum() for ref, q in zip(reference, quantized)))
        if step == 0:
            rtn_error = error
        if best is None or error < best[1]:
            best = (alpha, error, s, quantized)
    alpha, error, s, quantized = best  # type: ignore[misc]
    return ScaleChoice(alpha, (1.0 / s).astype(np.float32), rtn_error, error), quantized
