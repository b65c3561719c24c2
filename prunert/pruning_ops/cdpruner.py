"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs", arXiv 2506.10967) as a static-budget op: greedy MAP inference of a DPP over the visual tokens.

Definition (one image; tokens x_i [N, D], budget K, 1 <= K <= N):
  * r_i:     the same LLM-space relevance as ResPrune's: max (or mean) cosine of x_i to the prompt's content-word
             embeddings, min-max normalised to [epsilon, 1]; no content words, or a spread below
             RELEVANCE_SPAN_ATOL -> r = 1 (prunert.pruning_ops.resprune.text_relevance with alpha = 1; the NumPy
             side reference.text_relevance). The paper computes r from CLIP text features of the instruction;
             prunert has no CLIP text tower in the graph and uses LLM-space relevance instead, as ResPrune does.
  * kernel:  L = diag(r) G^ diag(r), G^_ij = cos(x_i, x_j) (a zero token has a zero row; G^_ii = 1 exactly
             otherwise, 0 for a zero token).
  * greedy:  K fixed steps of the fast incremental-Cholesky greedy MAP of Chen, Zhang & Zhou (NeurIPS 2018):
               d2_i = L_ii;  c = 0 [N, K]
               step k:  j = argmax d2 over unpicked tokens;  e = (L[j, :] - c @ c[j]) / sqrt(d2_j);
                        c[:, k] = e;  d2 = max(d2 - e^2, 0)
             d2_i is token i's marginal gain det(L_{S+i}) / det(L_S) = r_i^2 ||u_i - P_S u_i||^2 (u = x / |x|).
  * numerics (the ResPrune rules, methods.md "Numerics"): a gain below tau * L_ii (its own initial gain) counts
             as exactly 0 (rank exhausted: duplicates, zero tokens, low rank), gains within TIE_RTOL
             (relative) of the best tie and go to the lowest index, so once every gain is 0 the remaining picks
             are the lowest unpicked indices. Picked tokens are masked explicitly. The loop is ResPrune's
             (common.greedy_order; reference.greedy_order) with the kernel as Gram matrix and no weight.
  * bad numbers: ResPrune's rule (reference module docstring): a token with a NaN or +-inf entry is a zero
             token, a text row with one is not a content word.
  * output:  kept_indices ascending, kept_tokens = tokens[kept_indices] bit for bit.

With these definitions CDPruner's picks equal ResPrune's with normalize=True, alpha=2 (same epsilon, relevance,
tau): ResPrune scores r_i^2 * residual energy of u_i, which is d2_i. The two are computed differently (kernel
vs Gram + weight) and are tested against each other (tests/pruning_ops/test_cdpruner.py).

Graph: the K steps in one ONNX Loop (torch._higher_order_ops.while_loop) with constant carried shapes and no
scan outputs; picks through one-hot mat-muls; one TopK (sorted, k = K) in kept_to_indices; no NonZero. The kernel
in one of two forms (common.kernel_rows; cfg.gram_max_n, config.GRAM_MAX_N): L [N, N] built once, O(N^2 d), or
each step's column L[:, j] = r * (U u_j) * r_j from the unit tokens U, O(K N d) in all; the same definition. 82
top-level nodes, 121 with the Loop body, whatever K (59 / 97 before the bad-number rules); ~3-5 s export; ONNX Runtime, 2 CPU cores, N=576, D=1024,
K=64: 18.5 ms best of 10 on a shared machine (ResPrune normalize=True, alpha=2 measured the same in the same
run: the N x N kernel and the loop dominate both).

Known limit, shared with ResPrune's relevance: min-max normalisation divides by the relevance span. A span just
above RELEVANCE_SPAN_ATOL (say 1e-3) turns fp32 cosine rounding (~1e-7) into ~1e-4 relative differences of r,
the size of TIE_RTOL, so tokens whose cosines to the text agree to rounding (e.g. collinear tokens that are not
exact fp32 multiples of each other) can make backends pick differently. Real prompts give spans of 0.1 or more.

This module imports torch only inside the op: cdpruner_reference runs on NumPy alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunert.config import TRT_MAX_TOPK, CDPrunerConfig, ResPruneConfig
from prunert.errors import ConfigError
from prunert.pruning_ops import reference


def _check(budget: int, n: int, cfg: CDPrunerConfig) -> None:
    if not 0 < cfg.epsilon <= 1:
        raise ConfigError(f"cdpruner epsilon: got {cfg.epsilon}, expected 0 < epsilon <= 1")
    if cfg.relevance not in ("max", "mean"):
        raise ConfigError(f"cdpruner relevance: got {cfg.relevance!r}, expected 'max' or 'mean'")
    if not 0 <= cfg.tau < 1:
        raise ConfigError(f"cdpruner tau: got {cfg.tau}, expected 0 <= tau < 1")
    if not 0 < budget <= n:
        raise ConfigError(f"cdpruner budget: got {budget}, expected 1 <= budget <= {n} (the number of tokens)")
    if budget > TRT_MAX_TOPK:  # kept_to_indices runs TopK with k = K
        raise ConfigError(f"cdpruner budget: got {budget}, expected <= {TRT_MAX_TOPK} (TensorRT's TopK limit)")


def relevance_config(cfg: CDPrunerConfig) -> ResPruneConfig:
    """The ResPrune relevance settings that give CDPruner's r (alpha = 1: r itself, not a power)."""
    return ResPruneConfig(alpha=1.0, relevance=cfg.relevance, epsilon=cfg.epsilon)


# ----------------------------------------------------------------------------------------- torch op


def cdpruner_select(tokens: Any, text: Any, text_mask: Any, budget: int, cfg: CDPrunerConfig) -> Any:
    """tokens [B, N, D] (any float), text [B, M, D], text_mask [B, M] -> kept indices [B, K] ascending, int64."""
    import torch

    from prunert.pruning_ops.common import greedy_order, kept_to_indices, kernel_rows
    from prunert.pruning_ops.resprune import finite_tokens, text_relevance

    x = finite_tokens(tokens)  # [B, N, D] fp32; a token with a NaN / inf entry is a zero token
    _check(budget, x.shape[1], cfg)
    tiny = torch.finfo(torch.float32).tiny
    # Each row divided by its max |entry| (cosines unchanged): norms lie in [1, sqrt(D)], no fp32 overflow or
    # underflow at any token scale. Zero rows stay zero.
    x = x / x.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)  # [B, N, D]
    norm = x.norm(dim=-1, keepdim=True)  # [B, N, 1]
    unit = x / torch.where(norm > 0, norm, 1.0)  # [B, N, D]
    r = text_relevance(x, text.float(), text_mask, relevance_config(cfg))  # [B, N] in [epsilon, 1]
    kernel = kernel_rows(unit, cfg.gram_max_n, scale=r)  # rows of L = diag(r) G^ diag(r): [B, N, N] once, or from unit
    gain = r * r * (norm[..., 0] > 0).to(r.dtype)  # [B, N]  L_ii with G^_ii exactly 1 (0 for zero tokens)
    order = greedy_order(kernel, gain, budget, cfg.tau)  # [B, N]: ResPrune's loop, score = the gain itself
    return kept_to_indices(order < budget, budget)  # [B, K]


def cdpruner_op(inputs: dict[str, Any], budget: int, cfg: CDPrunerConfig) -> tuple[Any, Any]:
    """Registry entry: {"tokens" [B, N, D], "text" [B, M, D], "text_mask" [B, M]} -> (kept_tokens [B, K, D],
    kept_indices [B, K] int64 ascending)."""
    tokens = inputs["tokens"]  # [B, N, D]
    kept = cdpruner_select(tokens, inputs["text"], inputs["text_mask"], budget, cfg)  # [B, K]
    return tokens.gather(1, kept[:, :, None].expand(-1, -1, tokens.shape[-1])), kept  # [B, K, D], [B, K]


# ----------------------------------------------------------------------------------------- NumPy reference


def dpp_kernel(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, cfg: CDPrunerConfig) -> np.ndarray:
    """L = diag(r) G^ diag(r) [N, N] in float64, with G^_ii exactly 1 (0 for zero tokens)."""
    x = reference.finite_tokens(tokens)  # float64; a token with a NaN / inf entry is a zero token
    r = reference.text_relevance(x, text, text_mask, relevance_config(cfg))  # [N]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norm > 0, norm, 1.0)
    gram = unit @ unit.T
    np.fill_diagonal(gram, (norm[:, 0] > 0).astype(np.float64))
    return r[:, None] * gram * r[None, :]


def cdpruner(tokens: np.ndarray, text: np.ndarray, text_mask: np.ndarray, budget: int, cfg: CDPrunerConfig) -> np.ndarray:
    """Kept indices (ascending) of one image's tokens [N, D]: Chen et al.'s fast greedy MAP, float64."""
    _check(budget, len(tokens), cfg)
    kernel = dpp_kernel(tokens, text, text_mask, cfg)
    return np.sort(reference.greedy_order(kernel, np.diag(kernel).copy(), budget, cfg.tau))  # d2_i = L_ii; ResPrune's loop


def cdpruner_reference(inputs: dict[str, np.ndarray], budget: int, cfg: CDPrunerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens" [N, D], "text" [M, D], "text_mask" [M]}
    -> (kept indices [K] ascending, kept tokens [K, D])."""
    kept = cdpruner(inputs["tokens"], inputs["text"], inputs["text_mask"], budget, cfg)
    return kept, np.asarray(inputs["tokens"])[kept]
