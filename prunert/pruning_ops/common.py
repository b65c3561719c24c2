"""Shared torch helpers of the selection ops."""

from __future__ import annotations

import torch


def kept_to_indices(kept: torch.Tensor, budget: int) -> torch.Tensor:
    """kept mask [B, N] with exactly `budget` True per row -> indices [B, K] ascending (TopK, sorted)."""
    n = kept.shape[-1]
    rank = torch.arange(n, 0, -1, device=kept.device, dtype=torch.float32)  # earlier index = larger key
    keys = torch.where(kept, rank, torch.zeros_like(rank))
    return torch.topk(keys, budget, dim=-1, largest=True, sorted=True).indices


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], indices [B, K] -> [B, K, D]."""
    return tokens.gather(1, indices[:, :, None].expand(-1, -1, tokens.shape[-1]))
