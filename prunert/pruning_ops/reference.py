"""Plain NumPy references for the pruning ops: readable loops, float64, one sample at a time.

These define what the exported graphs must compute; tests compare kept-index *sets* against them.
NumPy only: the runtime may import this module.
"""

from __future__ import annotations

import numpy as np

from prunert.config import ResPruneConfig

# Scores within this relative distance of the best one count as tied, and ties go to the lowest index.
# Exact ties (duplicated rows, L2-normalised energies of 1, collinear tokens with equal relevance) reach
# every backend with a few ulps of noise that differs between them (BLAS blocking, reduction order, fp32
# vs fp64), so "equal" has to mean "equal up to rounding" for ORT, torch and NumPy to keep the same set.
# fp32 noise after K <= a few hundred steps is <~1e-5 relative; 1e-4 leaves a margin and changes no
# pick that a quality metric could see. Shared with the torch op (prunert.pruning_ops.resprune).
TIE_RTOL = 1e-4

# Relevance whose spread over the tokens (max r - min r, in cosine units) is below this counts as flat:
# r = 1. Text orthogonal to every token, or content words that cancel under "mean", give cosines that are
# 0 up to rounding (~1e-8 in fp64, up to ~1e-5 in fp32 at d = 4096); min-max normalising that noise to
# [epsilon, 1] would turn it into backend-dependent weights. Real spreads are orders of magnitude larger.
RELEVANCE_SPAN_ATOL = 1e-4


def pick_first_best(score: np.ndarray) -> int:
    """Index of the lowest-index score within TIE_RTOL (relative) of the maximum. score >= 0 or -inf."""
    best = score.max()
    return int(np.argmax(score >= best * (1.0 - TIE_RTOL)))


def _safe_norm(v: np.ndarray) -> np.ndarray:
    """Row norms [.., 1], with 1 in place of 0 so that zero rows stay zero after division."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(norm > 0, norm, 1.0)


def text_relevance(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, cfg: ResPruneConfig) -> np.ndarray:
    """Relevance weight w = r^alpha of each token, r = min-max normalised cosine to the text.

    tokens [N, D], text [M, D], text_mask [M] (nonzero = content word) -> w [N]
    """
    tokens = np.asarray(tokens, np.float64)
    text = np.asarray(text, np.float64)[np.asarray(text_mask) != 0]
    n = tokens.shape[0]
    if text.shape[0] == 0:
        return np.ones(n)
    tok_unit = tokens / _safe_norm(tokens)
    txt_unit = text / _safe_norm(text)
    cos = tok_unit @ txt_unit.T  # [N, M]
    r = cos.max(axis=1) if cfg.relevance == "max" else cos.mean(axis=1)
    span = r.max() - r.min()
    if span <= RELEVANCE_SPAN_ATOL:  # flat (or flat up to rounding): no relevance signal
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
        x = x / _safe_norm(x)
    residual = x.copy()
    energy = (residual * residual).sum(axis=1)
    floor = cfg.tau * energy  # per-token: energy below its own floor counts as spanned
    kept = np.zeros(n, bool)
    for _ in range(budget):
        effective = np.where(energy < floor, 0.0, energy)
        score = np.where(kept, -np.inf, weight * effective)
        j = pick_first_best(score)  # ties (within TIE_RTOL) go to the lower index
        kept[j] = True
        if effective[j] <= 0:
            continue  # nothing left to span: later picks are by index order only
        q = residual[j] / np.sqrt(effective[j])
        c = residual @ q
        residual -= np.outer(c, q)
        energy = np.maximum(energy - c * c, 0.0)
    return np.flatnonzero(kept)


def resprune_reference(inputs: dict[str, np.ndarray], budget: int, cfg: ResPruneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens", "text", "text_mask"} -> (kept indices [K] ascending, tokens [K, D])."""
    kept = resprune(inputs["tokens"], inputs["text"], inputs["text_mask"], budget, cfg)
    return kept, np.asarray(inputs["tokens"])[kept]
