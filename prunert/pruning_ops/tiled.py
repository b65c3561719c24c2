"""Per-tile selection for any-resolution tiles (LLaVA-NeXT): HERO-style tile budgets, then ResPrune (or
uniform / random / none, see the end) inside every tile with that tile's own budget, as ONE static graph;
plus the NumPy reference.

Inputs (batched; T tiles of N tokens, tile 0 = the global thumbnail):
  tokens [B, T, N, D] projector outputs   tile_cls [B, T, Dv] each tile's [CLS] at the feature layer
  tile_mask [B, T]    1 = thumbnail / real tile, 0 = padding tile
  token_mask [B, T, N] 1 = the token survives HF's unpadding   text [B, M, D], text_mask [B, M]
-> kept_tokens [B, K, D], kept_indices [B, K]: flat positions tile * N + index, ascending, i.e. ordered
   by (tile, raster index inside the tile); kept_tokens[b, k] = tokens[b].reshape(T * N, D)[kept_indices[b, k]].

Steps:
 1. valid = token_mask & tile_mask. ResPrune's text relevance r (the cosine pooled over content words,
    min-max normalised to [epsilon, 1]) with the min and max taken over the image's VALID tokens; the
    within-tile weight is r^alpha (resprune.text_relevance, with a token mask).
 2. budgets k_t = tile_budgets(cls, rel, valid counts, K): rel_t = mean r over tile t's valid tokens
    (0 without any). k_t <= valid_t for every tile whenever the image has >= K valid tokens, which is
    always so for K <= N (the thumbnail alone has N). An image with V < K valid tokens (possible only
    for K > N, at extreme aspect ratios) keeps all V and fills the K - V slots the static output still
    has with masked tokens, tile by tile in order 1, 2, ... (`fill_deficit`).
 3. ResPrune on all B*T tiles as one batch for S = min(K, N) steps (the largest possible tile budget),
    recording each token's pick step. Valid tokens always go first; once a tile's valid tokens are all
    kept, its masked tokens follow in index order. Greedy picks are prefix-consistent (the first k
    picks of an S-step run are the k-step run), so tile t keeps the tokens picked at steps < k_t:
    exactly sum_t k_t = K per image, in a graph with one Loop and no data-dependent shapes.
 4. kept_indices: TopK (sorted, K <= 3840) over the [B, T * N] kept mask, as every op.

Other methods inside the tiles (same budgets; the text term of HERO's budgets then uses ResPrune's default
relevance settings): `uniform` keeps, of a tile's V valid tokens, those of valid-rank ((2i + 1) V) // (2 k_t),
the flat op's rule on the valid tokens (`uniform_keep`); `random` keeps the k_t valid tokens whose raster
index comes first in the flat op's seeded key order (`random_priority`, a [N] constant; `priority_order`
ranks by pairwise counts, no sort). Both fill a deficit with masked tokens by index, as ResPrune does.
`none` keeps every slot (K = T * N); the runtime drops the masked ones. Methods that need more than the
tokens inside a tile (cls_attention, visionzip: the tower's attention; divprune, cdpruner: no per-tile
budget rule yet) are refused.

Per tile the numerics are ResPrune's, from the same code (common.greedy_order, resprune.pooled_cosine /
min_max; reference.greedy_order): tau rule, TIE_RTOL ties to the lowest index, fp32 range guard per tile and
per text row, a NaN / inf token a zero token, a NaN / inf text row not a content word. The NumPy reference runs, per tile, a plain k_t-step greedy: the test that the two agree
is also the test of prefix consistency. torch is imported only inside the torch functions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from prunert.config import TRT_MAX_TOPK, BudgetConfig, RandomConfig, ResPruneConfig, TileBudgetConfig, UniformConfig
from prunert.errors import ConfigError
from prunert.pruning_ops.random import random_priority
from prunert.pruning_ops.reference import _safe_norm, finite_tokens, greedy_order, text_relevance
from prunert.pruning_ops.tile_budgets import tile_budgets, tile_budgets_reference

TILED_METHODS = ("resprune", "uniform", "random", "none")  # per-tile rules: step 3 and "Other methods" above


def check_tiled_budget(budget: BudgetConfig, tiles: int, n: int) -> None:
    """ConfigError unless `budget.method` supports per-tile budgets and 1 <= K < T * N, K <= 3840
    (method none: K = T * N, every slot of the static layout; the host drops the masked ones)."""
    if budget.method not in TILED_METHODS:
        raise ConfigError(f"--method {budget.method}: method {budget.method!r} does not support per-tile budgets; expected one of {list(TILED_METHODS)}")
    if budget.keeps_all:
        if budget.budget != tiles * n:
            raise ConfigError(f"budget: got {budget.budget} with --method {budget.method}, expected {tiles * n} ({tiles} tiles x {n} tokens, all of them)")
        return
    if not 0 < budget.budget < tiles * n:
        raise ConfigError(f"budget: got {budget.budget}, expected 1 <= budget < {tiles * n} ({tiles} tiles x {n} tokens)")
    if budget.budget > TRT_MAX_TOPK:
        raise ConfigError(f"budget: got {budget.budget}, expected at most {TRT_MAX_TOPK} (TensorRT's TopK limit)")


# ================================================================================ torch (exported)


def masked_relevance(tokens, valid, text, text_mask, cfg: ResPruneConfig):
    """resprune.text_relevance's r (alpha not applied) with min-max over valid tokens only, and ResPrune's rules
    for bad numbers and text scale (resprune.pooled_cosine, min_max).
    tokens [B, L, D], valid [B, L] bool, text [B, M, D], text_mask [B, M] -> r [B, L] (1 where masked)."""
    import torch

    from prunert.pruning_ops.resprune import finite_tokens, min_max, pooled_cosine, range_guard

    x = range_guard(finite_tokens(tokens), (-1,))  # [B, L, D]: fp32 range guard per token; cosines do not see it
    r = pooled_cosine(x, text.float(), text_mask, cfg)  # [B, L]
    r_min = torch.where(valid, r, float("inf")).amin(dim=-1, keepdim=True)  # [B, 1]
    r_max = torch.where(valid, r, float("-inf")).amax(dim=-1, keepdim=True)
    return torch.where(valid, min_max(r, r_min, r_max, cfg), 1.0)


def resprune_order(tokens, weight, valid, steps: int, cfg: ResPruneConfig):
    """ResPrune's greedy (common.greedy_order) for `steps` steps, returning WHEN each token was picked.
    tokens [R, N, D], weight [R, N] (r^alpha), valid [R, N] bool -> order [R, N] int64: the step at which
    the token was kept, `steps` if never. Valid tokens first; then masked ones by index."""
    from prunert.pruning_ops.common import greedy_order, kernel_rows
    from prunert.pruning_ops.resprune import _unit_rows, finite_tokens, range_guard

    x = range_guard(finite_tokens(tokens), (1, 2))  # [R, N, D]: the range guard, per tile
    if cfg.normalize:
        x = _unit_rows(x)
    energy = (x * x).sum(dim=-1)  # [R, N]
    if cfg.normalize:
        energy = (energy > 0).to(energy.dtype)
    return greedy_order(kernel_rows(x, cfg.gram_max_n), energy, steps, cfg.tau, weight, candidates=valid)  # [R, N]; N per tile


def relevance_config(cfg: Any) -> ResPruneConfig:
    """The settings of the text relevance in the tile budgets: ResPrune's own, else its defaults (uniform and
    random ignore the text inside a tile, but HERO's tile budgets still weigh it)."""
    return cfg if isinstance(cfg, ResPruneConfig) else ResPruneConfig()


def priority_order(priority, valid):
    """priority [R, N] int64 (distinct per row, in [0, N)), valid [R, N] bool -> order [R, N] int64: a token's
    place when valid tokens come first by priority, then masked ones by index (pairwise count, no sort)."""
    import torch

    n = priority.shape[-1]
    key = torch.where(valid, priority, n + torch.arange(n, device=priority.device))  # [R, N], distinct
    return (key[:, None, :] < key[:, :, None]).to(torch.int64).sum(dim=-1)  # [R, N]: how many come before


def uniform_keep(valid, budgets):
    """valid [R, N] bool, budgets [R, 1] int64 -> keep [R, N] bool: the uniform op's rule on the tile's V valid
    tokens, i.e. the valid tokens of valid-rank ((2i + 1) V) // (2 k) for i < k; for k > V (deficit) every
    valid token plus the first k - V masked ones by index."""
    import torch

    n = valid.shape[-1]
    count = valid.to(torch.int64).sum(dim=-1, keepdim=True)  # [R, 1] V
    k = torch.minimum(budgets, count)  # [R, 1]
    slot = torch.arange(n, device=valid.device)[None, :]  # [1, N] i
    target = torch.where(slot < k, ((2 * slot + 1) * count) // (2 * k).clamp_min(1), -1)  # [R, N] valid ranks kept
    # ranks by a float CumSum (TensorRT's CumSum is float-only; exact up to 2^24 tokens)
    rank = valid.to(torch.float32).cumsum(dim=-1).to(torch.int64) - 1  # [R, N] rank among the valid tokens
    hit = (target[:, None, :] == rank[:, :, None]).to(torch.int64).amax(dim=-1) > 0  # [R, N]
    masked_rank = (~valid).to(torch.float32).cumsum(dim=-1).to(torch.int64) - 1
    return (valid & hit) | (~valid & (masked_rank < budgets - count))


def fill_deficit(budgets, n: int):
    """budgets [B, T] int64 from tile_budgets -> the same, with a thumbnail share above N (an image with
    fewer valid tokens than K) moved into tiles 1, 2, ... up to N each, in tile order."""
    import torch

    excess = (budgets[:, :1] - n).clamp_min(0)  # [B, 1]
    room = n - budgets[:, 1:]  # [B, T-1]
    t = room.shape[-1]
    earlier = (torch.arange(t)[None, :] < torch.arange(t)[:, None]).to(torch.int64)  # [T-1, T-1]: j before i
    before = (earlier[None] * room[:, None, :]).sum(dim=-1)  # [B, T-1] room of the earlier tiles
    add = torch.minimum(room, (excess - before).clamp_min(0))
    return torch.cat([budgets[:, :1] - excess, budgets[:, 1:] + add], dim=-1)  # [B, T]


def tiled_select(inputs: dict[str, Any], budget: BudgetConfig, tiles: TileBudgetConfig) -> tuple[Any, Any]:
    """Torch: the module docstring's steps 1-4. -> kept_tokens [B, K, D], kept_indices [B, K] int64."""
    import torch

    from prunert.pruning_ops.common import gather_tokens, kept_to_indices

    tokens = inputs["tokens"]  # [B, T, N, D]
    batch, t, n, d = tokens.shape
    k, cfg = budget.budget, budget.params
    check_tiled_budget(budget, t, n)
    if budget.keeps_all:  # the unpruned baseline: every slot, in (tile, index) order
        return tokens.reshape(-1, t * n, d), torch.arange(t * n, device=tokens.device).expand(batch, t * n)  # [B, T*N, D], [B, T*N]
    valid = (inputs["token_mask"] != 0) & (inputs["tile_mask"] != 0)[:, :, None]  # [B, T, N]
    flat = tokens.reshape(-1, t * n, d)  # [B, T*N, D]
    rel_cfg = relevance_config(cfg)
    r = masked_relevance(flat, valid.reshape(-1, t * n), inputs["text"], inputs["text_mask"], rel_cfg)  # [B, T*N]
    r = r.reshape(-1, t, n)  # [B, T, N]
    count = valid.to(torch.int64).sum(dim=-1)  # [B, T]
    rel = torch.where(valid, r, 0.0).sum(dim=-1) / count.clamp_min(1).to(r.dtype)  # [B, T] mean over valid
    budgets = fill_deficit(tile_budgets(inputs["tile_cls"], rel, count, k, tiles), n).reshape(-1, 1)  # [B*T, 1]
    rows = valid.reshape(-1, n)  # [B*T, N]
    if budget.method == "resprune":
        weight = torch.ones_like(r) if cfg.alpha == 0 else (r if cfg.alpha == 1 else r.pow(cfg.alpha))
        order = resprune_order(tokens.reshape(-1, n, d), weight.reshape(-1, n), rows, min(k, n), cfg)  # [B*T, N]
        keep = order < budgets  # the first k_t picks of each tile
    elif budget.method == "random":
        priority = torch.tensor(random_priority(cfg.seed, n), device=tokens.device)  # [N] graph constant (the flat op's order)
        keep = priority_order(priority.expand(rows.shape[0], n), rows) < budgets
    else:  # uniform
        keep = uniform_keep(rows, budgets)
    kept = kept_to_indices(keep.reshape(-1, t * n), k)  # [B, K] ascending flat positions
    return gather_tokens(flat, kept), kept  # [B, K, D], [B, K]


# ================================================================================ NumPy reference


def resprune_order_reference(tokens: np.ndarray, weight: np.ndarray, valid: np.ndarray, steps: int, cfg: ResPruneConfig) -> list[int]:
    """One tile: tokens [N, D], weight [N], valid [N] -> the first `steps` picks, in pick order
    (reference.resprune's loop, valid tokens first, then masked ones by index)."""
    x = finite_tokens(tokens)
    if cfg.normalize:
        x = x / _safe_norm(x)
    return greedy_order(x @ x.T, (x * x).sum(axis=1), steps, cfg.tau, weight, candidates=np.asarray(valid, bool))


def fill_deficit_reference(budgets: np.ndarray, n: int) -> np.ndarray:
    budgets = np.array(budgets, np.int64)
    excess = max(int(budgets[0]) - n, 0)
    budgets[0] -= excess
    for t in range(1, len(budgets)):
        take = min(n - int(budgets[t]), excess)
        budgets[t] += take
        excess -= take
    return budgets


def _relevance_reference(inputs: dict[str, np.ndarray], cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """-> valid [T, N] bool, r [T, N] (min-max over the valid tokens; 1 where masked)."""
    cfg = relevance_config(cfg)
    tokens = np.asarray(inputs["tokens"], np.float64)
    valid = (np.asarray(inputs["token_mask"]) != 0) & (np.asarray(inputs["tile_mask"]) != 0)[:, None]
    r = np.ones(valid.shape)
    r[valid] = text_relevance(tokens[valid], inputs["text"], inputs["text_mask"], replace(cfg, alpha=1.0))
    return valid, r


def tiled_budgets_reference(inputs: dict[str, np.ndarray], budget: int, cfg: Any, tiles: TileBudgetConfig) -> np.ndarray:
    """One sample -> per-tile budgets [T] int64 (steps 1-2)."""
    valid, r = _relevance_reference(inputs, cfg)
    count = valid.sum(axis=1)
    rel = np.array([r[t][valid[t]].mean() if count[t] else 0.0 for t in range(len(count))])
    return fill_deficit_reference(tile_budgets_reference(np.asarray(inputs["tile_cls"]), rel, count, budget, tiles), valid.shape[1])


def tiled_reference(
    inputs: dict[str, np.ndarray], budget: int, cfg: Any, tiles: TileBudgetConfig, budgets: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One sample {"tokens" [T, N, D], "tile_cls" [T, Dv], "tile_mask" [T], "token_mask" [T, N], "text" [M, D],
    "text_mask" [M]} -> (kept flat indices [K] ascending, kept tokens [K, D]). cfg: the method's config
    (ResPruneConfig, UniformConfig, RandomConfig), None for method none (all T * N). `budgets` [T] overrides
    steps 1-2 (tests pass the op's own where fp32 and fp64 round a floor(share * K) apart)."""
    tokens = np.asarray(inputs["tokens"])
    t, n, d = tokens.shape
    if cfg is None:  # method none: every slot
        return np.arange(t * n), tokens.reshape(t * n, d)
    valid, r = _relevance_reference(inputs, cfg)
    if budgets is None:
        budgets = tiled_budgets_reference(inputs, budget, cfg, tiles)
    kept = []
    for tile in range(t):
        if budgets[tile] > 0:  # the method on this tile alone, with its budget
            if isinstance(cfg, ResPruneConfig):  # a plain k_t-step greedy run
                picks = resprune_order_reference(tokens[tile], r[tile] ** cfg.alpha, valid[tile], int(budgets[tile]), cfg)
            else:
                picks = _plain_tile_reference(cfg, valid[tile], int(budgets[tile]))
            kept += [tile * n + j for j in picks]
    kept = np.array(sorted(kept), np.int64)
    return kept, tokens.reshape(t * n, d)[kept]


def _plain_tile_reference(cfg: UniformConfig | RandomConfig, valid: np.ndarray, budget: int) -> list[int]:
    """uniform / random on one tile: the flat op's own reference on the tile's V valid tokens (k <= V), else all
    valid ones and the first k - V masked ones by index."""
    from prunert.pruning_ops.random import random_keys
    from prunert.pruning_ops.uniform import uniform_reference

    positions, masked = np.flatnonzero(valid), np.flatnonzero(~valid)
    if budget > len(positions):
        return [*positions.tolist(), *masked[: budget - len(positions)].tolist()]
    if isinstance(cfg, UniformConfig):
        chosen, _ = uniform_reference({"tokens": np.zeros((len(positions), 1))}, budget, cfg)
        return positions[chosen].tolist()
    keys = random_keys(cfg.seed, len(valid))[positions]  # the raster keys of the valid tokens
    return positions[np.lexsort((positions, -keys))[:budget]].tolist()
