"""Shared torch helpers of the selection ops."""

from __future__ import annotations

import torch

from prunert.config import TRT_MAX_TOPK


def kept_to_indices(kept: torch.Tensor, budget: int) -> torch.Tensor:
    """kept mask [B, N] with exactly `budget` True per row -> indices [B, K] ascending (TopK, sorted)."""
    n = kept.shape[-1]
    rank = torch.arange(n, 0, -1, device=kept.device, dtype=torch.float32)  # earlier index = larger key
    keys = torch.where(kept, rank, torch.zeros_like(rank))
    return torch.topk(keys, budget, dim=-1, largest=True, sorted=True).indices


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], indices [B, K] -> [B, K, D]."""
    return tokens.gather(1, indices[:, :, None].expand(-1, -1, tokens.shape[-1]))


# TensorRT's TopK limit (prunert.config.TRT_MAX_TOPK); ops that TopK over K check it.
MAX_TOPK = TRT_MAX_TOPK


def check_budget(budget: int, n: int, method: str, topk: bool = True) -> None:
    """Trace-time guard shared by the baseline ops: 1 <= K <= N, and K <= MAX_TOPK for ops that TopK over K."""
    if not 0 < budget <= n:
        raise ValueError(f"{method}: budget {budget} not in [1, {n}] (N = {n} tokens)")
    if topk and budget > MAX_TOPK:
        raise ValueError(f"{method}: budget {budget} > {MAX_TOPK}, TensorRT's TopK limit")


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
