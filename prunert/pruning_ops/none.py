"""The unpruned baseline: keep every visual token (K = N). Used by benchmarks as the reference point."""

from __future__ import annotations

from typing import Any


def keep_all_op(inputs: dict[str, Any], budget: int, cfg: Any) -> tuple[Any, Any]:
    import torch

    tokens = inputs["tokens"]  # [B, N, D]
    batch, n, _ = tokens.shape
    return tokens, torch.arange(n, device=tokens.device).expand(batch, n)  # [B, N, D], [B, N]


def keep_all_reference(inputs: dict[str, Any], budget: int, cfg: Any) -> Any:
    import numpy as np

    tokens = np.asarray(inputs["tokens"])  # [N, D]
    return np.arange(len(tokens)), tokens
