"""Random baseline: a seeded uniform random subset of K of the N tokens, the same for every image.

Definition: keys = np.random.default_rng(cfg.seed).random(N) (float64, one per raster index); keep the K
tokens with the largest keys (an exact float64 tie, probability ~N^2 / 2^54, goes to the lower index);
return them ascending. Every K-subset is equally likely over seeds, and the subset for budget K is contained
in the subset for any larger budget with the same seed and N.

The subset depends only on (seed, N, K), so it is computed with NumPy when the op is traced and baked into
the graph as one constant [K] int64, expanded to the batch: no TopK on backend floats, hence nothing for
ONNX Runtime, TensorRT, torch and the NumPy reference to disagree on. (Baking the N keys and running TopK in
the graph would select exactly the same constant set with two more nodes.) 6 nodes, 0.08 ms in ONNX Runtime
(1 thread, N=576, D=1024, K=64). The seed is recorded in the manifest (method params). The module imports torch only inside the op, so the reference loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from prunert.config import RandomConfig

if TYPE_CHECKING:
    import torch


def random_keys(seed: int, n: int) -> np.ndarray:
    """The N float64 keys of raster indices 0 .. N-1 for this seed."""
    return np.random.default_rng(seed).random(n)


def random_indices(seed: int, n: int, budget: int) -> list[int]:
    """K ascending kept indices: the K largest keys (lexsort: key descending, then index ascending)."""
    if not 0 < budget <= n:
        raise ValueError(f"random: budget {budget} not in [1, {n}] (N = {n} tokens)")
    keys = random_keys(seed, n)
    order = np.lexsort((np.arange(n), -keys))  # primary: -key; secondary: index
    return sorted(int(j) for j in order[:budget])


def random_op(inputs: dict[str, torch.Tensor], budget: int, cfg: RandomConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry: inputs {"tokens" [B, N, D], ...} -> kept tokens [B, K, D], kept indices [B, K] ascending."""
    from prunert.pruning_ops.common import check_budget, select_fixed

    tokens = inputs["tokens"]  # [B, N, D]
    n = tokens.shape[1]
    if isinstance(n, int):  # N static: the K indices are graph constants
        check_budget(budget, n, "random", topk=False)
        return select_fixed(tokens, random_indices(cfg.seed, n, budget))  # [B, K, D], [B, K] int64: no data-dependent op
    return _symbolic_random(tokens, n, budget, cfg.seed)


SYMBOLIC_MAX_TOKENS = 1 << 15  # longest N a graph with a symbolic N may see (Qwen2.5-VL's default max: 16384)


def random_priority(seed: int, n: int) -> np.ndarray:
    """Raster index -> its place in the key order (largest key first, ties to the lower index): int64 [N], a
    permutation of 0..N-1. The keys of N tokens are the first N of any longer run (one generator stream), so
    the priorities of a longer run order every prefix exactly as that prefix's own keys do."""
    order = np.lexsort((np.arange(n), -random_keys(seed, n)))  # raster indices, best first
    priority = np.empty(n, np.int64)
    priority[order] = np.arange(n)
    return priority


def _symbolic_random(tokens: torch.Tensor, n, budget: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N a symbolic dim (one graph over a range of N, Qwen2.5-VL): the priorities of SYMBOLIC_MAX_TOKENS keys
    as a constant (exact in float32, < 2^24), the first N of them, TopK of the K smallest (K <= 3840), sorted
    ascending. The same set as random_indices(seed, N, K) for every N; export fails if N's range exceeds it."""
    import torch

    from prunert.pruning_ops.common import check_budget

    check_budget(budget, SYMBOLIC_MAX_TOKENS, "random")  # K <= 3840 for the TopKs
    torch._check(n <= SYMBOLIC_MAX_TOKENS)
    priority = torch.tensor(random_priority(seed, SYMBOLIC_MAX_TOKENS), dtype=torch.float32, device=tokens.device)
    first = torch.topk(-priority[:n], budget).indices  # [K] the K smallest priorities among N (TensorRT: sorted)
    row = torch.topk(first.to(torch.float32), budget, largest=False, sorted=True).indices  # positions, ascending
    row = first.index_select(0, row)  # [K] int64 ascending
    return tokens.index_select(1, row), row.expand(tokens.shape[0], budget)  # [B, K, D], [B, K]


def random_reference(inputs: dict[str, np.ndarray], budget: int, cfg: RandomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens" [N, D], ...} -> (kept indices [K] ascending, kept tokens [K, D])."""
    tokens = np.asarray(inputs["tokens"])  # [N, D]
    n = tokens.shape[0]
    if not 0 < budget <= n:
        raise ValueError(f"random: budget {budget} not in [1, {n}]")
    keys = random_keys(cfg.seed, n)
    # threshold form: the K-th largest key; keys above it, then ties at it by lowest index
    kth = np.sort(keys)[::-1][budget - 1]
    above = np.flatnonzero(keys > kth)
    at = np.flatnonzero(keys == kth)[: budget - len(above)]
    kept = np.sort(np.concatenate([above, at])).astype(np.int64)
    return kept, tokens[kept]
