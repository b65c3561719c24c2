"""Plain NumPy references for the pruning ops: readable loops, float64, one sample at a time.

These define what the exported graphs must compute; tests compare kept-index *sets* against them.
NumPy only: the runtime may import this module.

Inputs beyond the fp32 range (methods.md, ResPrune "Bad numbers"), the same rule in every implementation:
  * a visual token with any NaN or +-inf entry is a zero token: energy 0, cosine 0 to every text row, so it is
    never picked while any other token has energy left, and is kept only as index-order filler;
  * a text row with any NaN or +-inf entry is not a content word (as if its mask were 0).
"""

from __future__ import annotations

from typing import Callable

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


def finite_tokens(tokens: np.ndarray) -> np.ndarray:
    """tokens [N, D] -> float64 [N, D], every row holding a NaN or +-inf entry replaced by zeros."""
    x = np.asarray(tokens, np.float64)
    return np.where(np.isfinite(x).all(axis=-1, keepdims=True), x, 0.0)


def min_max(r: np.ndarray, cfg: ResPruneConfig) -> np.ndarray:
    """Raw relevance r [N] -> r in [epsilon, 1]: min-max, with epsilon as cfg.epsilon_floor says ("affine":
    epsilon + (1 - epsilon) * minmax; "clip": max(minmax, epsilon)). A spread within RELEVANCE_SPAN_ATOL: r = 1."""
    span = r.max() - r.min()
    if span <= RELEVANCE_SPAN_ATOL:  # flat (or flat up to rounding): no relevance signal
        return np.ones(len(r))
    unit = (r - r.min()) / span
    return cfg.epsilon + (1.0 - cfg.epsilon) * unit if cfg.epsilon_floor == "affine" else np.maximum(unit, cfg.epsilon)


def text_relevance(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, cfg: ResPruneConfig) -> np.ndarray:
    """Relevance weight w = r^alpha of each token, r = min-max normalised cosine to the text.

    tokens [N, D], text [M, D], text_mask [M] (nonzero = content word; a non-finite row is none) -> w [N]
    """
    tokens = finite_tokens(tokens)
    text = np.asarray(text, np.float64)
    text = text[(np.asarray(text_mask) != 0) & np.isfinite(text).all(axis=-1)]
    n = tokens.shape[0]
    if text.shape[0] == 0:
        return np.ones(n)
    tok_unit = tokens / _safe_norm(tokens)
    txt_unit = text / _safe_norm(text)
    cos = tok_unit @ txt_unit.T  # [N, M]
    r = cos.max(axis=1) if cfg.relevance == "max" else cos.mean(axis=1)
    return min_max(r, cfg) ** cfg.alpha


def greedy_order(
    gram: np.ndarray,
    energy: np.ndarray,
    steps: int,
    tau: float,
    weight: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> list[int]:
    """The greedy pivoted Cholesky of ResPrune, CDPruner and the tiled op (common.greedy_order in float64).

    gram [N, N] (X X^T, or the DPP kernel), energy [N] its diagonal as the method defines it, weight [N] or None,
    candidates [N] bool or None (all) -> the first `steps` picks, in pick order. A residual energy below
    tau * its initial value counts as 0; scores within TIE_RTOL tie, the lowest index wins; no candidate left:
    the lowest unpicked token. on_step(k, residual energies [N], kept [N] bool) runs before each pick.
    """
    n = len(energy)
    energy = np.array(energy, np.float64)
    floor = tau * energy  # per-token: energy below its own floor counts as spanned
    coeffs = np.zeros((n, steps))  # coeffs[i, k] = <x_i, q_k>
    kept = np.zeros(n, bool)
    pool = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool)
    picks = []
    for k in range(steps):
        if on_step is not None:
            on_step(k, energy, kept)
        effective = np.where(energy < floor, 0.0, energy)
        open_ = ~kept & pool
        score = effective if weight is None else weight * effective
        j = pick_first_best(np.where(open_, score, -np.inf)) if open_.any() else int(np.argmax(~kept))
        kept[j] = True
        picks.append(j)
        if effective[j] <= 0:
            continue  # nothing left to span: later picks are by index order only
        column = (gram[:, j] - coeffs[:, :k] @ coeffs[j, :k]) / np.sqrt(effective[j])
        coeffs[:, k] = column
        energy = np.maximum(energy - column * column, 0.0)
    return picks


def _resprune_inputs(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, budget: int, cfg: ResPruneConfig):
    """-> (gram [N, N], energy [N], weight [N]) of ResPrune's greedy, float64."""
    x = finite_tokens(tokens)
    n = x.shape[0]
    if not 0 < budget <= n:
        raise ValueError(f"budget {budget} not in [1, {n}]")
    weight = text_relevance(x, text, text_mask, cfg)
    if cfg.normalize:
        x = x / _safe_norm(x)
    return x @ x.T, (x * x).sum(axis=1), weight


def resprune(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, budget: int, cfg: ResPruneConfig) -> np.ndarray:
    """Kept indices (ascending) of one image's tokens [N, D]."""
    gram, energy, weight = _resprune_inputs(tokens, text, text_mask, budget, cfg)
    return np.sort(greedy_order(gram, energy, budget, cfg.tau, weight))


# What the fp32 backends can differ by (methods.md, ResPrune "Agreement"): after k steps, a residual energy is
# trusted to within k * 2^-23 of its token's initial energy (measured: every ORT / torch difference on clustered
# d = 1024 inputs lies at a step ambiguous at 0.16 of this).
FP32_DOWNDATE_RTOL = 2.0**-23


def ambiguous_step(energy: np.ndarray, initial: np.ndarray, floor: np.ndarray, weight: np.ndarray, kept: np.ndarray, rho: float) -> bool:
    """Could residual energies off by up to rho * their initial value change this step's pick (tie rule and
    tau floor included)? energy, initial, floor, weight [N], kept [N] bool."""
    def scores(e):
        return np.where(kept, -np.inf, weight * np.where(e < floor, 0.0, e))

    low, high = scores(energy - rho * initial), scores(energy + rho * initial)
    j = pick_first_best(scores(energy))
    index = np.arange(len(energy))
    lower_takes = (index < j) & (high >= (1.0 - TIE_RTOL) * low[j])  # a lower index could enter j's tie band
    higher_takes = (index > j) & (high * (1.0 - TIE_RTOL) > low[j])  # j could fall out of the best's tie band
    return bool(((lower_takes | higher_takes) & ~kept).any())


def resprune_stable_prefix(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, budget: int, cfg: ResPruneConfig) -> tuple[list[int], int]:
    """-> (ResPrune's picks in pick order, s): the first s picks come before the first step that fp32 rounding can
    decide either way (ambiguous_step at rho = k * FP32_DOWNDATE_RTOL after k steps). The guarantee: those s picks
    are in every backend's kept set; s = K means every backend keeps exactly this set."""
    gram, energy, weight = _resprune_inputs(tokens, text, text_mask, budget, cfg)
    initial, floor, first = energy.copy(), cfg.tau * energy, [budget]

    def check(k: int, residual: np.ndarray, kept: np.ndarray) -> None:
        if k < first[0] and ambiguous_step(residual, initial, floor, weight, kept, (k + 1) * FP32_DOWNDATE_RTOL):
            first[0] = k

    return greedy_order(gram, energy, budget, cfg.tau, weight, on_step=check), first[0]


def resprune_reference(inputs: dict[str, np.ndarray], budget: int, cfg: ResPruneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens", "text", "text_mask"} -> (kept indices [K] ascending, tokens [K, D])."""
    kept = resprune(inputs["tokens"], inputs["text"], inputs["text_mask"], budget, cfg)
    return kept, np.asarray(inputs["tokens"])[kept]
