"""GPTQ for block-wise int4 weight-only matmuls (Frantar et al. 2022, with group-wise scales, no act-order).

For y = x W with W [K, N]: H = X^T X [K, K] from the sampled calibration rows (damped by `damp` x its mean
diagonal). The rows of W (input channels k) are quantized in order; each row's rounding error, divided by
the Cholesky factor of H^-1, is pushed onto the rows not yet quantized, so they absorb it. A block's scale
(max |w| / 7 over its block_size rows per column) is taken when the block starts, from the updated weights,
so the result is the same int4 layout as RTN's (Int4Weight) and both ONNX forms take it unchanged.
"""

from __future__ import annotations

import numpy as np

from prunert.calibration.weight_only import INT4_HIGH, INT4_LOW, Int4Weight


def gptq_quantize(weight: np.ndarray, rows: np.ndarray, block_size: int, damp: float = 0.01) -> Int4Weight:
    """weight [K, N], rows [R, K] (the activation rows the matmul reads) -> its int4 weights."""
    w = np.array(weight, np.float64)  # [K, N], updated in place as rows are quantized
    k, n = w.shape
    h = rows.astype(np.float64).T @ rows.astype(np.float64)  # [K, K]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U, U upper triangular [K, K]
    values = np.zeros((k, n), np.int8)
    scales = np.zeros((-(-k // block_size), n), np.float32)
    for group, start in enumerate(range(0, k, block_size)):
        end = min(start + block_size, k)
        block = w[start:end].copy()  # [b, N]
        amax = np.abs(block).max(axis=0)
        scale = np.where(amax > 0, amax / INT4_HIGH, 1.0)  # [N]
        scales[group] = scale
        errors = np.zeros_like(block)
        for i in range(end - start):
            q = np.clip(np.rint(block[i] / scale), INT4_LOW, INT4_HIGH)
            values[start + i] = q
            error = (block[i] - q * scale) / upper[start + i, start + i]  # [N]
            block[i + 1 :] -= np.outer(upper[start + i, start + i + 1 : end], error)
            errors[i] = error
        w[end:] -= upper[start:end, end:].T @ errors  # the later blocks absorb this block's error
    return Int4Weight(values, scales, block_size)
