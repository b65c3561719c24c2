"""DivPrune: max-min diversity selection on the projector outputs, distance 1 - cosine.

Definition (one image, tokens x_0 .. x_{N-1}):
  * d(i, j) = 1 - cos(x_i, x_j), in [0, 2]. cos with a zero vector is 0 (so a zero token is at distance 1
    from every token, another zero token included); duplicates and positive multiples are at distance 0.
  * pick 1: the token with the largest nearest-neighbour distance min_{j != i} d(i, j) (with N = 1 the only
    token);
  * picks 2 .. K: the token, among those not yet kept, with the largest min_{s in kept} d(i, s).
    (The published DivPrune code does the same: the second-smallest distance of each column at step 1,
    then column minima over the kept rows; tests/pruning_ops/test_divprune.py checks the equivalence.)
  * ties: scores within DIST_ATOL = 1e-5 (absolute, in distance units) of the best remaining score tie,
    and the lowest index among them wins. Absolute, not relative: the fp32 error of 1 - cos is absolute
    (the rounding of a dot product of unit vectors near 1), at most 5e-7 against float64 in ONNX Runtime
    and torch at D = 1024 and 4096 (measured on N = 576 Gaussian, correlated and duplicated tokens), so
    DIST_ATOL is 20x that. A relative rule would fail where it matters most: duplicates come out at
    0..5e-7 instead of 0, and once every remaining token duplicates a kept one (letterbox padding) the
    best score is that noise. Then (best ~ 0) the rest go in index order. The tolerance is kept small
    because projector outputs are strongly correlated: their distances can all lie within ~0.02, so
    candidate gaps of ~1e-5 are common and a wider band would often override the max-min order.
Exactly K distinct tokens are kept for every input (kept tokens score -inf, K <= N).

Numerics: each row is first divided by its largest |entry| (cosine is invariant to it), so norms lie in
[1, sqrt(D)] and neither overflow nor underflow in fp32 whatever the token scale; zero rows stay zero.

Graph: unit rows, the cosine Gram [B, N, N] once, then one ONNX Loop of K steps (carried: step, min
distance [B, N], kept mask [B, N]: constant shapes, no scan outputs) whose body picks by the tie rule
(ArgMax of a 0/1 mask returns the first 1 on every backend) and updates the min distance with the picked
row of the distance matrix (GatherElements); kept_to_indices turns the mask into ascending indices (TopK
sorted=1). The module imports torch only inside the op, so the reference loads without torch.

No O(K N d) form (the one ResPrune and CDPruner have, common.kernel_rows): pick 1 is defined by every token's
nearest-neighbour distance, all N^2 pairs; with those distances computed, the Gram is already paid for, and the
K steps only read rows of it (GatherElements, O(N) each).

Measured on this 2-core CPU, ONNX Runtime 1 thread, N=576, D=1024, K=64 (best of 30): Loop + GatherElements
8.7 ms / 42 nodes / 3.4 s export; Loop + one-hot mat-mul row 9.8 ms / 41 nodes; unrolled 8.6 ms / 1,040
nodes / 12.9 s export (one-hot: 10.1 ms / 977 nodes). The Gram matrix (N^2 D) dominates, ~7-8 ms; the loop
is the chosen form: same speed as unrolled, 25x fewer nodes, 4x faster export, K-independent graph size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from prunert.config import DivPruneConfig

if TYPE_CHECKING:
    import torch

DIST_ATOL = 1e-5  # distances within this (absolute) of the best remaining one tie; lowest index wins
_FAR = 4.0  # above any distance (<= 2): the diagonal in nearest-neighbour distances


def divprune_select(tokens: torch.Tensor, budget: int) -> torch.Tensor:
    """tokens [B, N, D] (any float) -> kept indices [B, K] int64 ascending (max-min diversity, 1 - cosine)."""
    import torch
    from torch._higher_order_ops import while_loop

    from prunert.pruning_ops.common import check_budget, kept_to_indices

    x = tokens.float()  # [B, N, D]
    n = int(x.shape[1])
    check_budget(budget, n, "divprune")
    tiny = float(torch.finfo(torch.float32).tiny)
    x = x / x.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)  # row peak 1 (zero rows: 0)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(tiny)  # [B, N, D]; zero rows stay zero -> cos 0
    dist = (1.0 - unit @ unit.transpose(1, 2)).clamp_min(0.0)  # [B, N, N] in [0, 2]
    positions = torch.arange(n, device=x.device)  # [N]
    diagonal = positions[:, None] == positions[None, :]  # [N, N]
    nearest = torch.where(diagonal, _FAR, dist).amin(dim=-1)  # [B, N] nearest-neighbour distance

    def keep_going(step, mindist, kept):
        return step < budget

    def greedy_step(step, mindist, kept):
        score = torch.where(kept > 0, float("-inf"), mindist)  # [B, N]
        best = score.amax(dim=-1, keepdim=True)  # [B, 1]
        tied = (score >= best - DIST_ATOL).to(mindist.dtype)  # [B, N]
        pick = tied.argmax(dim=-1, keepdim=True)  # [B, 1] lowest tied index
        onehot = (positions[None, :] == pick).to(mindist.dtype)  # [B, N]
        row = dist.gather(1, pick[:, :, None].expand(-1, 1, n))[:, 0, :]  # [B, N]  d(pick, .) (GatherElements)
        mindist = torch.where(step == 0, row, torch.minimum(mindist, row))  # after pick 1: distance to kept set
        return step + 1, mindist, kept + onehot

    state = (torch.zeros((), dtype=torch.int64), nearest, torch.zeros_like(nearest))
    _, _, kept = while_loop(keep_going, greedy_step, state)
    return kept_to_indices(kept > 0, budget)


def divprune_op(inputs: dict[str, torch.Tensor], budget: int, cfg: DivPruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry: inputs {"tokens" [B, N, D], ...} -> kept tokens [B, K, D], kept indices [B, K] ascending."""
    from prunert.pruning_ops.common import gather_tokens

    kept = divprune_select(inputs["tokens"], budget)  # [B, K]
    return gather_tokens(inputs["tokens"], kept), kept  # [B, K, D], [B, K]


def pick_lowest_tied(score: np.ndarray) -> int:
    """Lowest index whose score is within DIST_ATOL of the maximum (kept tokens score -inf)."""
    return int(np.flatnonzero(score >= score.max() - DIST_ATOL)[0])


def cosine_distances(tokens: np.ndarray) -> np.ndarray:
    """tokens [N, D] -> 1 - cosine [N, N], float64, with cos = 0 wherever a token is zero."""
    x = np.asarray(tokens, np.float64)
    norm = np.linalg.norm(x, axis=1)
    unit = x / np.where(norm > 0, norm, 1.0)[:, None]  # zero rows stay zero
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def divprune(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Kept indices (ascending) of one image's tokens [N, D]."""
    n = len(tokens)
    if not 0 < budget <= n:
        raise ValueError(f"divprune: budget {budget} not in [1, {n}]")
    dist = cosine_distances(tokens)
    nearest = np.array([min([dist[i, j] for j in range(n) if j != i], default=np.inf) for i in range(n)])
    kept = [pick_lowest_tied(nearest)]
    while len(kept) < budget:
        to_kept = dist[:, kept].min(axis=1)  # each token's distance to the kept set
        to_kept[kept] = -np.inf
        kept.append(pick_lowest_tied(to_kept))
    return np.array(sorted(kept), dtype=np.int64)


def divprune_reference(inputs: dict[str, np.ndarray], budget: int, cfg: DivPruneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens" [N, D], ...} -> (kept indices [K] ascending, kept tokens [K, D])."""
    kept = divprune(inputs["tokens"], budget)
    return kept, np.asarray(inputs["tokens"])[kept]
