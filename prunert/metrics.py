"""How close two runs are: the one set of comparisons parity (prunert.parity), precision validation
(prunert.export.precision) and calibration drift (prunert.calibration.drift) report. NumPy only, so the
runtime may use it.

cosine(a, b)              of the flattened arrays, in float64, scale-free (each side is divided by its
                          largest |entry| first, so no norm under- or overflows). Defined on zero vectors:
                          two vectors without a nonzero entry (empty ones included) are identical, 1.0; a
                          zero vector against a nonzero one shares no direction, 0.0. A non-finite entry
                          gives nan (a comparison that cannot pass any bound).
token_cosines(a, b)       cosine per token row: [K, D] x [K, D] -> [K], with the same zero rule.
max_abs_diff(a, b)        max |a - b| in float64; 0.0 for empty arrays.
kept_overlap(ref, other)  |set(ref) & set(other)| / |set(ref)|: the share of the reference's kept indices
                          the other side kept too; an empty reference: 1.0 if the other is empty, else 0.0.
common_rows(a, b)         row positions in a and in b of the indices both kept (ordered by index), so that
                          tokens are compared where both sides kept the same original token: one swapped
                          pick shifts every later row of a [K, D] output.
matched_token_cosine(...) mean token cosine over the indices both kept; None when they share none.
kl_divergence(p, q)       KL(softmax p || softmax q) of two logit vectors, in nats.
"""

from __future__ import annotations

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"compared arrays differ in shape: {a.shape} vs {b.shape}")
    return a, b


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., D] x [..., D] -> [...] cosine of each last-axis vector (module docstring: the zero rule)."""
    a, b = _pair(a, b)
    scale_a = np.abs(a).max(axis=-1, keepdims=True, initial=0.0)  # [..., 1]
    scale_b = np.abs(b).max(axis=-1, keepdims=True, initial=0.0)
    zero_a, zero_b = scale_a[..., 0] == 0, scale_b[..., 0] == 0  # [...]
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = a / np.where(scale_a == 0, 1.0, scale_a), b / np.where(scale_b == 0, 1.0, scale_b)
        value = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    value = np.clip(value, -1.0, 1.0)  # rounding may leave |cos| a hair above 1; nan stays nan
    return np.where(zero_a | zero_b, (zero_a & zero_b).astype(np.float64), value)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the flattened arrays (module docstring: zero vectors, non-finite entries)."""
    a, b = _pair(a, b)
    return float(token_cosines(a.ravel(), b.ravel()))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    return float(np.abs(a - b).max(initial=0.0))


def kept_overlap(reference: np.ndarray, other: np.ndarray) -> float:
    ref, got = set(np.asarray(reference).ravel().tolist()), set(np.asarray(other).ravel().tolist())
    if not ref:
        return float(not got)
    return len(ref & got) / len(ref)


def common_rows(kept_a: np.ndarray, kept_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K_a], [K_b] original indices -> (rows of a, rows of b) holding the indices both kept, by index."""
    _, rows_a, rows_b = np.intersect1d(np.asarray(kept_a), np.asarray(kept_b), return_indices=True)
    return rows_a, rows_b


def matched_token_cosine(kept_a: np.ndarray, tokens_a: np.ndarray, kept_b: np.ndarray, tokens_b: np.ndarray) -> float | None:
    """kept [K_a] / [K_b], tokens [K_a, D] / [K_b, D] -> mean cosine of the tokens both kept; None if none."""
    rows_a, rows_b = common_rows(kept_a, kept_b)
    if not len(rows_a):
        return None
    return float(token_cosines(np.asarray(tokens_a)[rows_a], np.asarray(tokens_b)[rows_b]).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """KL(softmax(reference) || softmax(other)) of logits [V], in nats (>= 0 up to rounding)."""
    log_p, log_q = _log_softmax(np.asarray(reference, np.float64)), _log_softmax(np.asarray(other, np.float64))
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))
