"""[CLS]-attention baseline (FasterVLM): keep the K tokens the [CLS] query attends to most.

inputs["cls_attention"] [B, N] is the head-averaged softmax(q_cls k^T / sqrt(d)) row of the feature layer over
the same N tokens as inputs["tokens"] (adapter.vision_features(..., extras=("cls_attention",)): the CLS column
too where the LLM sees the [CLS] row, as with LLaVA's "full" strategy). Scores are used as given; scores of
another number of tokens than `tokens` are a ConfigError. A tower without [CLS] has no such row: the method
does not apply (MethodSpec.needs_cls).

Tie rule (what "top-K" means when scores are equal up to rounding): let t be the K-th largest score and
tol = TIE_RTOL * |t| (TIE_RTOL = 1e-4, shared with ResPrune). Tokens with s > t + tol are kept; tokens with
|s - t| <= tol are tied with the K-th and fill the remaining slots lowest index first; the rest are dropped.
Exactly K tokens are kept for every input (all-equal, all-zero and duplicated scores included): fewer than K
scores exceed t, at least K are >= t. Why a band and not exact ties: the tower runs in ONNX Runtime in the
artifact and in torch in the parity reference, so equal attentions (a flat image, duplicated patches) reach
the op with backend-dependent noise of ~1e-7 relative; an exact-tie rule would keep noise-dependent sets.
Only scores within 1e-4 relative of the K-th one are affected, which no quality metric can see.

Graph (loop-free): TopK(K) for t, masks, TopK(K) on integer-valued keys (2N - i kept for sure, N - i in the
band, 0 otherwise: distinct positive keys, so the kept set is unambiguous), and kept_to_indices' TopK for the
ascending order; all three TopK have sorted=1, k = K. 18 nodes, 0.10 ms in ONNX Runtime (1 thread, N=576,
D=1024, K=64, token gather included). The module imports torch only inside the op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from prunert.config import ClsAttentionConfig
from prunert.pruning_ops.reference import TIE_RTOL

if TYPE_CHECKING:
    import torch


def cls_attention_select(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """scores [B, N] (any float) -> kept indices [B, K] int64 ascending, by the band tie rule above."""
    import torch

    from prunert.pruning_ops.common import check_budget, kept_to_indices

    s = scores.float()  # [B, N]
    n = int(s.shape[-1])
    check_budget(budget, n, "cls_attention")
    kth = torch.topk(s, budget, dim=-1, largest=True, sorted=True).values[:, budget - 1 :]  # [B, 1]
    tol = TIE_RTOL * kth.abs()  # [B, 1]
    sure = (s - kth) > tol  # [B, N]  fewer than K per row
    band = (s - kth).abs() <= tol  # [B, N]  tied with the K-th score; |sure| + |band| >= K
    lower_first = torch.arange(n, 0, -1, device=s.device, dtype=torch.float32)  # [N]  N - i: lower index = larger
    keys = torch.where(sure, lower_first + n, torch.where(band, lower_first, 0.0))  # [B, N] distinct where > 0
    kth_key = torch.topk(keys, budget, dim=-1, largest=True, sorted=True).values[:, budget - 1 :]  # [B, 1] > 0
    return kept_to_indices(keys >= kth_key, budget)  # exactly K per row


def cls_attention_op(inputs: dict[str, torch.Tensor], budget: int, cfg: ClsAttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry: inputs {"tokens" [B, N, D], "cls_attention" [B, N], ...} -> kept tokens [B, K, D], indices [B, K]."""
    from prunert.pruning_ops import check_same_tokens
    from prunert.pruning_ops.common import gather_tokens

    check_same_tokens("cls_attention", {"tokens": int(inputs["tokens"].shape[1]), "cls_attention": int(inputs["cls_attention"].shape[-1])})
    kept = cls_attention_select(inputs["cls_attention"], budget)  # [B, K]
    return gather_tokens(inputs["tokens"], kept), kept  # [B, K, D], [B, K]


def cls_attention_reference(inputs: dict[str, np.ndarray], budget: int, cfg: ClsAttentionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens" [N, D], "cls_attention" [N], ...} -> (kept indices [K] ascending, tokens [K, D])."""
    from prunert.pruning_ops import check_same_tokens

    tokens = np.asarray(inputs["tokens"])
    s = np.asarray(inputs["cls_attention"], np.float64)  # [N]
    n = len(s)
    check_same_tokens("cls_attention", {"tokens": len(tokens), "cls_attention": n})
    if not 0 < budget <= n:
        raise ValueError(f"cls_attention: budget {budget} not in [1, {n}]")
    kth = np.sort(s)[::-1][budget - 1]  # the K-th largest score
    tol = TIE_RTOL * abs(kth)
    sure = np.flatnonzero(s - kth > tol)  # clearly above the K-th: always kept
    band = np.flatnonzero(np.abs(s - kth) <= tol)  # tied with the K-th: lowest indices fill the rest
    kept = np.sort(np.concatenate([sure, band[: budget - len(sure)]])).astype(np.int64)
    return kept, tokens[kept]
