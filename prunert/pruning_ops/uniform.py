"""Uniform baseline: K evenly spaced raster indices, the same for every image.

Definition: kept index i (i = 0 .. K-1) is the token at the centre of the i-th of K equal slices of the
raster order 0 .. N-1:

    idx_i = floor((i + 0.5) * N / K) = ((2i + 1) * N) // (2K)     (integer arithmetic, exact)

For K <= N the indices are strictly ascending (consecutive ones differ by N/K >= 1 before flooring, so by
>= 1 after) and lie in [0, N-1] (idx_{K-1} = floor(N - N/(2K)) < N). K = N keeps every token; K = 1 keeps
the middle one (N // 2). The indices ignore the token values, so degenerate inputs change nothing.

The exported graph holds the K indices as one constant, expanded to the batch, plus the token gather
(GatherElements): no TopK, no loop, no data-dependent shape (where N is a symbolic dim, Qwen2.5-VL's
one graph over a range of N, the same integer formula is computed from the shape at run time); 6 nodes, 0.08 ms in ONNX Runtime (1 thread,
N=576, D=1024, K=64: the gather itself). The module imports torch only inside the op, so the NumPy
reference loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from prunert.config import UniformConfig

if TYPE_CHECKING:
    import torch


def uniform_indices(n: int, budget: int) -> list[int]:
    """The K ascending kept indices of N tokens: floor((i + 0.5) * N / K), i = 0 .. K-1."""
    if not 0 < budget <= n:
        raise ValueError(f"uniform: budget {budget} not in [1, {n}] (N = {n} tokens)")
    return [((2 * i + 1) * n) // (2 * budget) for i in range(budget)]


def uniform_op(inputs: dict[str, torch.Tensor], budget: int, cfg: UniformConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry: inputs {"tokens" [B, N, D], ...} -> kept tokens [B, K, D], kept indices [B, K] ascending."""
    from prunert.pruning_ops.common import check_budget, select_fixed

    tokens = inputs["tokens"]  # [B, N, D]
    n = tokens.shape[1]
    if isinstance(n, int):  # N static: the K indices are graph constants
        check_budget(budget, n, "uniform", topk=False)
        return select_fixed(tokens, uniform_indices(n, budget))  # [B, K, D], [B, K] int64: no data-dependent op
    return _symbolic_uniform(tokens, n, budget)


def _symbolic_uniform(tokens: torch.Tensor, n, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same formula when N is a symbolic dim (one graph over a range of N, Qwen2.5-VL): ((2i + 1) N) // (2K)
    from the shape at run time (Shape, Mul, Div on int64; non-negative, so truncation = floor). The exporting
    adapter guarantees K <= N over the range (its fit_budget)."""
    import torch

    slots = torch.arange(budget, device=tokens.device)  # [K]
    row = ((2 * slots + 1) * n) // (2 * budget)  # [K] int64
    return tokens.index_select(1, row), row.expand(tokens.shape[0], budget)  # [B, K, D], [B, K]


def uniform_reference(inputs: dict[str, np.ndarray], budget: int, cfg: UniformConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens" [N, D], ...} -> (kept indices [K] ascending, kept tokens [K, D])."""
    tokens = np.asarray(inputs["tokens"])  # [N, D]
    n = tokens.shape[0]
    if not 0 < budget <= n:
        raise ValueError(f"uniform: budget {budget} not in [1, {n}]")
    # written with floats, independently of uniform_indices' integer form
    kept = np.array([int(np.floor((i + 0.5) * n / budget)) for i in range(budget)], dtype=np.int64)
    return kept, tokens[kept]
