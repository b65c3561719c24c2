"""Shared torch helpers of the selection ops."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch._higher_order_ops import while_loop

from prunert.config import TRT_MAX_TOPK
from prunert.pruning_ops.reference import TIE_RTOL

TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal fp32


def kept_to_indices(kept: torch.Tensor, budget: int) -> torch.Tensor:
    """kept mask [B, N] with exactly `budget` True per row -> indices [B, K] ascending (TopK, sorted)."""
    n = kept.shape[-1]
    rank = torch.arange(n, 0, -1, device=kept.device, dtype=torch.float32)  # earlier index = larger key
    keys = torch.where(kept, rank, torch.zeros_like(rank))
    return torch.topk(keys, budget, dim=-1, largest=True, sorted=True).indices


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], indices [B, K] -> [B, K, D]."""
    return tokens.gather(1, indices[:, :, None].expand(-1, -1, tokens.shape[-1]))


def check_budget(budget: int, n: int, method: str, topk: bool = True) -> None:
    """Trace-time guard shared by the baseline ops: 1 <= K <= N, and K <= TRT_MAX_TOPK (TensorRT's TopK limit) for
    ops that TopK over K."""
    if not 0 < budget <= n:
        raise ValueError(f"{method}: budget {budget} not in [1, {n}] (N = {n} tokens)")
    if topk and budget > TRT_MAX_TOPK:
        raise ValueError(f"{method}: budget {budget} > {TRT_MAX_TOPK}, TensorRT's TopK limit")


def select_fixed(tokens: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-independent selection: tokens [B, N, D], indices (K ascending ints) -> ([B, K, D], [B, K]).

    Gathers with the [K] constant along dim 1 (ONNX Gather), so the graph carries K integers rather
    than an index tensor expanded to [B, K, D] that the exporter would fold into a K x D constant."""
    row = torch.tensor(indices, dtype=torch.int64, device=tokens.device)  # [K]
    return tokens.index_select(1, row), fixed_indices(tokens, indices)


def fixed_indices(tokens: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The same kept indices for every row: tokens [B, N, D], indices (K ascending ints) -> [B, K] int64.

    Exports as one constant [K] and an Expand to the (dynamic) batch: no data-dependent op at all."""
    row = torch.tensor(indices, dtype=torch.int64, device=tokens.device)  # [K]
    return row[None, :].expand(tokens.shape[0], len(indices))  # [B, K]


# ----------------------------------------------------------------------------------------- greedy selection


def finite_rows(v: torch.Tensor) -> torch.Tensor:
    """v [B, N, D] -> [B, N] bool: the rows whose entries are all finite. |v| < inf is False for NaN and +-inf
    alike (Abs, Less, ReduceMin: ops every backend has, no IsNaN / IsInf)."""
    return (v.abs() < float("inf")).to(v.dtype).amin(dim=-1) > 0


# Row j of the greedy's kernel for every token: (pick [B, 1] int64, onehot [B, N]) -> [B, N, 1] = K[:, j].
KernelRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def largest_n(n: int | torch.SymInt) -> float:
    """The largest N a graph traced at `n` tokens accepts: n itself when static, else the upper bound of the
    symbolic dim (torch.export's Dim max, e.g. Qwen2.5-VL's merged tokens; inf without one). Read from the shape
    environment's value range, which adds no guard: N stays symbolic."""
    if isinstance(n, int):
        return n
    node = n.node
    upper = node.shape_env.bound_sympy(node.expr).upper
    return float(upper) if upper.is_finite else math.inf


def uses_gram(n: int | torch.SymInt, gram_max_n: int) -> bool:
    """The form rule (config.GRAM_MAX_N): the greedy reads rows of an N x N Gram matrix built once, O(N^2 d),
    while the largest N the graph accepts is <= gram_max_n; above it, each step computes the picked token's
    row from the features, O(N d) per step, O(K N d) in all."""
    return largest_n(n) <= gram_max_n


def kernel_rows(features: torch.Tensor, gram_max_n: int, scale: torch.Tensor | None = None) -> KernelRows:
    """The rows of K = diag(s) F F^T diag(s) (s = 1 without `scale`) in the form `uses_gram` picks.
    features [B, N, D], scale [B, N] or None. Gram form: K [B, N, N] once, row j by a one-hot mat-mul (the
    form every op had before the rows form). Rows form: F_j by GatherElements, then F_j F^T as a [B, 1, D] x
    [B, D, N] mat-mul against F^T transposed once before the loop; never an N x N tensor. (The row-vector shape
    matters: ONNX Runtime's MLAS runs M = 1 as a memory-bound GEMV over a plain [D, N] operand, but an [N, D] x
    [D, 1] product as a GEMM with one live column of its 16-wide kernel: ~2x slower than the Gram form at N = 576,
    d = 4096, where the GEMV form is not.)"""
    if uses_gram(features.shape[1], gram_max_n):
        gram = features @ features.transpose(1, 2)  # [B, N, N]
        kernel = gram if scale is None else scale[:, :, None] * gram * scale[:, None, :]

        def gram_row(pick: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
            return (onehot[:, None, :] @ kernel).transpose(1, 2)  # [B, N, 1]

        return gram_row
    d = features.shape[-1]
    transposed = features.transpose(1, 2).contiguous()  # [B, D, N], once

    def feature_row(pick: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        picked = features.gather(1, pick[:, :, None].expand(-1, 1, d))  # [B, 1, D]  F_j
        dots = (picked @ transposed).transpose(1, 2)  # [B, N, 1]  <f_n, f_j>
        if scale is None:
            return dots
        return scale[:, :, None] * dots * scale.gather(1, pick)[:, :, None]  # s_n <f_n, f_j> s_j

    return feature_row


def greedy_order(
    rows: KernelRows,
    energy: torch.Tensor,
    steps: int,
    tau: float,
    weight: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The greedy pivoted Cholesky that ResPrune, CDPruner and the tiled op share, `steps` steps in one ONNX Loop
    with constant carried shapes and no scan outputs.

    rows: the kernel's rows (kernel_rows: ResPrune X X^T, CDPruner the DPP kernel L; from an N x N Gram or from
    the features), energy [B, N] its diagonal as the method defines it (exactly 1 for unit tokens), weight [B, N]
    or None (score = weight * residual energy, or the energy alone), candidates [B, N] bool or None (every token)
    -> order [B, N] int64: the step at which each token was picked, `steps` if never. The rules
    (reference.greedy_order is the same loop in float64):
      * a residual energy below tau * its initial value counts as 0 (spanned: duplicates, zeros, low rank);
      * scores within TIE_RTOL (relative) of the best tie, and the lowest index wins;
      * when no candidate is left, the lowest unpicked token: K distinct picks always.
    Step k stores coeffs[:, :, k] = <x_n, q_k>, every token's coordinate on the k-th orthonormal basis vector, so
    the residual energy drops by coeffs[n, k]^2 without carrying residual vectors [B, N, D]. Picks go through
    one-hot mat-muls (cheap at N <= a few thousand, loop-friendly); only the rows form gathers F_j, its [D] row.
    """
    n = energy.shape[-1]
    floor = tau * energy  # below its own floor a token counts as spanned (rounding noise)
    positions = torch.arange(n, device=energy.device)  # [N]
    step_ids = torch.arange(steps, device=energy.device)  # [S]

    def keep_going(step, energy, order, coeffs):
        return step < steps

    def greedy_step(step, energy, order, coeffs):
        free = order >= steps  # [B, N] not picked yet
        pool = free if candidates is None else free & candidates
        effective = torch.where(energy < floor, 0.0, energy)  # [B, N]
        score = torch.where(pool, effective if weight is None else weight * effective, float("-inf"))
        # Scores within TIE_RTOL of the best are tied (rounding differs between backends); ties go to the
        # lowest index: argmax of a 0/1 mask returns its first 1 on every backend.
        best = score.amax(dim=-1, keepdim=True)  # [B, 1]
        tied = (score >= best * (1.0 - TIE_RTOL)).to(energy.dtype)  # [B, N]; without candidates: >= 0 or -inf
        if candidates is not None:  # none left (all -inf ties everything): the lowest free token
            tied = tied * pool.to(energy.dtype)
            tied = torch.where(tied.amax(dim=-1, keepdim=True) > 0, tied, free.to(energy.dtype))  # float Where (ORT)
        pick = tied.argmax(dim=-1, keepdim=True)  # [B, 1]
        onehot = (positions[None, :] == pick).to(energy.dtype)  # [B, N]
        pick_energy = (effective * onehot).sum(dim=-1, keepdim=True)  # [B, 1]
        pick_coeffs = onehot[:, None, :] @ coeffs  # [B, 1, S]
        inner = rows(pick, onehot) - coeffs @ pick_coeffs.transpose(1, 2)  # [B, N, 1]  <x_n, r_j>
        scale = torch.where(pick_energy > 0, pick_energy.clamp_min(TINY).rsqrt(), 0.0)  # [B, 1]
        column = inner * scale[:, :, None]  # [B, N, 1]  <x_n, q_k>; zero once nothing is left to span
        coeffs = torch.where((step_ids == step)[None, None, :], column, coeffs)  # [B, N, S]
        energy = (energy - column[..., 0] ** 2).clamp_min(0.0)
        order = torch.where(onehot > 0, step, order)  # [B, N]
        return step + 1, energy, order, coeffs

    order = torch.full_like(energy, steps, dtype=torch.int64)  # [B, N]
    state = (torch.zeros((), dtype=torch.int64), energy, order, energy.new_zeros(*energy.shape, steps))
    _, _, order, _ = while_loop(keep_going, greedy_step, state)
    return order
