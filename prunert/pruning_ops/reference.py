"""Plain NumPy references for the pruning ops: readable loops, float64, one sample at a time.

These define what the exported graphs must compute; tests compare kept-index *sets* against them.
NumPy only: the runtime may import this module.
"""

from __future__ import annotations

import numpy as np

from prunert.config import ResPruneConfig


def text_relevance(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, cfg: ResPruneConfig) -> np.ndarray:
    """Relevance weight w = r^alpha of each token, r = min-max normalised cosine to the text.

    tokens [N, D], text [M, D], text_mask [M] (nonzero = content word) -> w [N]
    """
    tokens = np.asarray(tokens, np.float64)
    text = np.asarray(text, np.float64)[np.asarray(text_mask) != 0]
    n = tokens.shape[0]
    if text.shape[0] == 0:
        return np.ones(n)
    tok_unit = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), 1e-12)
    txt_unit = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    cos = tok_unit @ txt_unit.T  # [N, M]
    r = cos.max(axis=1) if cfg.relevance == "max" else cos.mean(axis=1)
    span = r.max() - r.min()
    if span <= 0:
        r = np.ones(n)
    else:
        r = cfg.epsilon + (1.0 - cfg.epsilon) * (r - r.min()) / span
    return r**cfg.alpha


def resprune(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, budget: int, cfg: ResPruneConfig) -> np.ndarray:
    """Kept indices (ascending) of one image's tokens [N, D]."""
    x = np.asarray(tokens, np.float64)
    n = x.shape[0]
    if not 0 < budget <= n:
        raise ValueError(f"budget {budget} not in [1, {n}]")
    weight = text_relevance(x, text, text_mask, cfg)
    if cfg.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    residual = x.copy()
    energy = (residual * residual).sum(axis=1)
    floor = cfg.tau * energy  # per-token: energy below its own floor counts as spanned
    kept = np.zeros(n, bool)
    for _ in range(budget):
        effective = np.where(energy < floor, 0.0, energy)
        score = np.where(kept, -np.inf, weight * effective)
        j = int(np.argmax(score))  # first maximum: ties go to the lower index
        kept[j] = True
        if effective[j] <= 0:
            continue  # nothing left to span: later picks are by index order only
        q = residual[j] / np.sqrt(effective[j])
        c = residual @ q
        residual -= np.outer(c, q)
        energy = np.maximum(energy - c * c, 0.0)
    return np.flatnonzero(kept)
