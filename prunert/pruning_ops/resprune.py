"""ResPrune as a torch op that exports to a static ONNX graph.

Greedy residual-energy selection (a weighted column-pivoted QR) with a fixed number of steps K: the greedy
pivoted Cholesky it shares with CDPruner and the tiled op (common.greedy_order; reference.greedy_order in
float64). Two forms of the same greedy (common.kernel_rows; cfg.gram_max_n, config.GRAM_MAX_N, picks one per
export by the largest N the graph accepts): the Gram form builds X X^T [N, N] once, O(N^2 d); the rows form
computes each step's row X x_j from the tokens, O(K N d) in all, and never holds an N x N tensor. The K steps run in one ONNX Loop (76 top-level nodes, 116 with the Loop body, whatever K) whose
carried shapes are constant and which has no scan outputs, as TensorRT's parser requires. Measured on 2 CPU
cores, N=576, d=1024, K=64 in ONNX Runtime: Loop 10.7 ms / 48 nodes / 4 s export; unrolled 6.9 ms / 2,194
nodes / 24 s export. The loop wins on export time and graph size at ~1% of the vision graph's time. (The tie
rule and range guard added 5 nodes and no measurable time: 13.6 vs 13.9 ms best-of-20 on a shared machine;
the bad-number rules and the text range guard ~20 nodes and none either: 57.6 vs 55.5 ms best of 40 at load 10.)

What ORT, torch and prunert.pruning_ops.reference guarantee (methods.md, ResPrune "Agreement"; an earlier
version of this docstring claimed agreement on every input, which clustered inputs disprove):
  * the same index SETS on every input whose greedy run has no fp32-ambiguous step, and on exact ties
    (duplicates, zeros, low rank, small integers, extreme scales, non-finite tokens and text), which the rules
    below settle the same way everywhere (tests/pruning_ops/test_resprune.py, test_resprune_nonfinite.py);
  * otherwise, every pick the float64 reference makes before its first ambiguous step is in every backend's set
    (reference.resprune_stable_prefix). A step is ambiguous when residual energies off by k * 2^-23 of their
    initial value (k steps of fp32 energy downdates) could change its pick: two scores at the edge of the tie
    band, or an energy at its tau floor. After it the sets may differ. Tightly clustered tokens at d=1024 do
    this: 5 of 48 clustered runs differ between ORT and the reference (normalize, alpha=2, K=64; the issue
    measured 226 of 6,480 between ORT and torch), every difference after such a step.
What the agreement takes, beyond methods.md's tau rule:
  * ties are "within TIE_RTOL of the best score", not bit equality, and go to the lowest index;
  * normalize=True uses energies of exactly 1 (fp32 sums of d squares are off by ~sqrt(d) ulp);
  * a relevance spread below RELEVANCE_SPAN_ATOL is flat (r = 1), not min-max-normalised rounding noise;
  * samples whose largest |token entry| is outside [2^-32, 2^32] are rescaled (fp32 overflow / underflow), and
    so is every text row whose largest |entry| is (cosines are scale-free, so text needs its own guard);
  * a token with a NaN or +-inf entry is a zero token, a text row with one is masked (reference module docstring);
  * norms are guarded only at 0, and masked text rows never reach r (NaN padding is harmless).
"""

from __future__ import annotations

import torch

from prunert.config import ResPruneConfig
from prunert.pruning_ops.common import TINY as _TINY
from prunert.pruning_ops.common import finite_rows, gather_tokens, greedy_order, kept_to_indices, kernel_rows
from prunert.pruning_ops.reference import RELEVANCE_SPAN_ATOL

# fp32 range guard: a sample whose largest |token entry| (a text row whose largest |entry|) lies outside
# [2^-32, 2^32] is rescaled by 1/peak before selection (selection is scale-invariant), so energies and Gram
# entries neither overflow to inf (then NaN) nor underflow to 0. Inside the range nothing is rescaled, so
# inputs whose fp32 arithmetic is exact (small integers: exact ties) stay exact.
_PEAK_HI = 2.0**32
_PEAK_LO = 2.0**-32


def range_guard(v: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """v divided by its largest |entry| over `dims` where that peak lies outside [2^-32, 2^32]; all-zero: 0."""
    peak = v.abs().amax(dim=dims, keepdim=True).clamp_min(_TINY)  # all-zero: 0 / tiny = 0
    return v / torch.where((peak > _PEAK_HI) | (peak < _PEAK_LO), peak, 1.0)  # in range: exactly v


def finite_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D] (any float) -> fp32 [B, N, D], every token with a NaN or +-inf entry a zero token."""
    x = tokens.float()
    return torch.where(finite_rows(x)[..., None], x, 0.0)


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm; zero rows stay zero. Only a zero (or subnormal) norm is clamped:
    a floor like 1e-12 would shrink the cosines of small but nonzero tokens, which the reference keeps."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def min_max(r: torch.Tensor, r_min: torch.Tensor, r_max: torch.Tensor, cfg: ResPruneConfig) -> torch.Tensor:
    """r [B, N], its min / max [B, 1] -> r in [epsilon, 1] (cfg.epsilon_floor: "affine" or "clip");
    a spread within RELEVANCE_SPAN_ATOL is flat: r = 1 (no relevance signal, only rounding)."""
    span = r_max - r_min
    unit = (r - r_min) / span.clamp_min(RELEVANCE_SPAN_ATOL)
    scaled = cfg.epsilon + (1.0 - cfg.epsilon) * unit if cfg.epsilon_floor == "affine" else unit.clamp_min(cfg.epsilon)
    return torch.where(span > RELEVANCE_SPAN_ATOL, scaled, 1.0)


def pooled_cosine(tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, cfg: ResPruneConfig) -> torch.Tensor:
    """tokens [B, N, D] (finite), text [B, M, D], text_mask [B, M] -> raw relevance [B, N]: cosines to the
    content words pooled by cfg.relevance; 1 where a sample has none. Non-finite text rows are not content."""
    valid = (text_mask != 0) & finite_rows(text)  # [B, M]; nonzero = content word, as in the reference
    text = range_guard(torch.where(valid[..., None], text, 0.0), (-1,))  # [B, M, D], each row in fp32 range
    cos = _unit_rows(tokens) @ _unit_rows(text).transpose(1, 2)  # [B, N, M]
    if cfg.relevance == "max":
        r = cos.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=-1)  # [B, N]
    else:
        count = valid.sum(dim=-1, keepdim=True).clamp_min(1).to(cos.dtype)  # [B, 1]
        r = cos.masked_fill(~valid[:, None, :], 0.0).sum(dim=-1) / count  # masked rows never reach r
    return torch.where(valid.any(dim=-1, keepdim=True), r, 1.0)  # [B, N]


def text_relevance(tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, cfg: ResPruneConfig) -> torch.Tensor:
    """tokens [B, N, D] (finite: finite_tokens), text [B, M, D], text_mask [B, M] -> weight r^alpha [B, N]."""
    r = pooled_cosine(tokens, text, text_mask, cfg)
    r = min_max(r, r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True), cfg)
    if cfg.alpha == 0:
        return torch.ones_like(r)
    return r if cfg.alpha == 1 else r.pow(cfg.alpha)


def resprune_select(
    tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, budget: int, cfg: ResPruneConfig
) -> torch.Tensor:
    """tokens [B, N, D] (any float), text [B, M, D], text_mask [B, M] -> kept indices [B, K] ascending, int64.

    Pivoted Cholesky of the weighted Gram matrix (common.greedy_order), K steps in one ONNX Loop; the Gram's rows
    from the N x N matrix or from the tokens, as cfg.gram_max_n says (common.kernel_rows).
    """
    x = range_guard(finite_tokens(tokens), (1, 2))  # [B, N, D]
    weight = text_relevance(x, text.float(), text_mask, cfg)  # [B, N]
    if cfg.normalize:
        x = _unit_rows(x)
    energy = (x * x).sum(dim=-1)  # [B, N]
    if cfg.normalize:  # exactly 1 (0 for zero tokens): fp32 sums give 1 +- ~sqrt(d) ulp, which at d = 1024..4096
        energy = (energy > 0).to(energy.dtype)  # is as large as the score gaps of near-orthogonal unit tokens
    order = greedy_order(kernel_rows(x, cfg.gram_max_n), energy, budget, cfg.tau, weight)  # [B, N]
    return kept_to_indices(order < budget, budget)


def resprune_op(inputs: dict[str, torch.Tensor], budget: int, cfg: ResPruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry: inputs {"tokens" [B, N, D], "text" [B, M, D], "text_mask" [B, M]} -> kept tokens, indices."""
    kept = resprune_select(inputs["tokens"], inputs["text"], inputs["text_mask"], budget, cfg)  # [B, K]
    return gather_tokens(inputs["tokens"], kept), kept
