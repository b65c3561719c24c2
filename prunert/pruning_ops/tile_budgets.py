"""HERO-style per-tile budgets for any-resolution tiles (LLaVA-NeXT): split a fixed total K of one
image over its global thumbnail and its tiles, as a static graph, plus the NumPy reference.

    thumbnail  k_0 = min(round(thumbnail_share * K), valid_0)                       (a fixed share)
    tiles      importance_i = (1 - text_weight) * softmax_i(cos(CLS_i, CLS_0) / temperature)
                              + text_weight * rel_i / sum_j rel_j                   (valid tiles i >= 1)
               rel_i = mean text relevance of tile i's valid tokens (in [epsilon, 1], ResPrune's r)
               k_i = min(floor(importance_i * (K - k_0)), valid_i)
    remainder  one more token each to the tiles with the largest importance that have room, then (only
               where caps bind) fill the rest in importance order; the thumbnail takes what tiles cannot.

Ranks are pairwise comparisons over the T tiles (no sort), so the graph is a few dozen plain nodes.
Budgets are integers that sum to exactly K and never exceed a tile's valid tokens, provided the image
has at least K valid tokens (the export checks K <= the smallest possible valid count). Ties in
importance go to the lower tile index. Shapes: cls [B, T, Dv] (tile 0 = thumbnail), relevance [B, T]
(mean over valid tokens), valid [B, T] valid-token counts (0 for padding tiles) -> budgets [B, T] int64.
"""

from __future__ import annotations

import numpy as np

from prunert.config import TileBudgetConfig  # noqa: F401  (defined, with its defaults, in prunert.config)


# ---- torch (exports to a static graph: sorts over T tiles, no loop) ----------------------------
def tile_budgets(cls, relevance, valid, budget: int, cfg: TileBudgetConfig):
    """cls [B, T, Dv], relevance [B, T], valid [B, T] int64 -> budgets [B, T] int64 summing to `budget`."""
    import torch

    valid = valid.to(torch.int64)
    tiles = valid[:, 1:] > 0  # [B, T-1] real tiles
    thumb = torch.clamp(torch.full_like(valid[:, :1], round(cfg.thumbnail_share * budget)), max=valid[:, :1])  # [B, 1]
    local = budget - thumb  # [B, 1] tokens for the tiles
    unit = cls.float() / cls.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, T, Dv]
    saliency = (unit[:, 1:] * unit[:, :1]).sum(dim=-1) / cfg.temperature  # [B, T-1]
    saliency = torch.softmax(saliency.masked_fill(~tiles, float("-inf")), dim=-1)
    saliency = torch.where(tiles, saliency, 0.0)  # no tiles at all: softmax of all -inf is NaN
    rel = torch.where(tiles, relevance[:, 1:].float(), 0.0)
    rel = rel / rel.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    share = (1.0 - cfg.text_weight) * saliency + cfg.text_weight * rel  # [B, T-1]
    cap = valid[:, 1:]
    base = torch.minimum(torch.floor(share * local.float()).to(torch.int64), cap)  # [B, T-1]
    # ahead[b, i, j]: tile j comes before tile i in importance order (larger share; ties: lower index).
    # Pairwise over T tiles instead of a sort: exact, static, and exportable (ONNX has no stable sort).
    index = torch.arange(share.shape[-1], device=share.device)
    ahead = (share[:, None, :] > share[:, :, None]) | ((share[:, None, :] == share[:, :, None]) & (index[None, :] < index[:, None])[None])
    ahead = ahead.to(torch.int64)  # [B, T-1, T-1]
    remainder = local - base.sum(dim=-1, keepdim=True)  # [B, 1]
    has_room = ((cap - base) > 0).to(torch.int64)  # [B, T-1]
    rooms_ahead = (ahead * has_room[:, None, :]).sum(dim=-1)  # tiles with room ranked above each tile
    base = base + has_room * (rooms_ahead < remainder).to(torch.int64)  # +1 to the top `remainder` with room
    room = cap - base
    remainder = local - base.sum(dim=-1, keepdim=True)
    before = (ahead * room[:, None, :]).sum(dim=-1)  # room of the tiles ranked above: fill in importance order
    base = base + torch.minimum(room, (remainder - before).clamp_min(0))
    thumb = budget - base.sum(dim=-1, keepdim=True)  # what the tiles could not take stays with the thumbnail
    return torch.cat([thumb, base], dim=-1)  # [B, T]


# ---- NumPy reference: the same rules, written plainly per sample -------------------------------
def tile_budgets_reference(cls: np.ndarray, relevance: np.ndarray, valid: np.ndarray, budget: int, cfg: TileBudgetConfig) -> np.ndarray:
    """One sample: cls [T, Dv], relevance [T], valid [T] -> budgets [T] int64."""
    valid = np.asarray(valid, np.int64)
    t = len(valid)
    budgets = np.zeros(t, np.int64)
    thumb = min(int(round(cfg.thumbnail_share * budget)), int(valid[0]))
    local = budget - thumb
    tiles = [i for i in range(1, t) if valid[i] > 0]
    if tiles:
        unit = cls.astype(np.float64) / np.maximum(np.linalg.norm(cls.astype(np.float64), axis=-1, keepdims=True), 1e-12)
        logits = np.array([unit[i] @ unit[0] for i in tiles]) / cfg.temperature
        saliency = np.exp(logits - logits.max())
        saliency /= saliency.sum()
        rel = np.array([float(relevance[i]) for i in tiles])
        rel = rel / max(rel.sum(), 1e-12)
        share = dict(zip(tiles, (1 - cfg.text_weight) * saliency + cfg.text_weight * rel))
        for i in tiles:
            budgets[i] = min(int(np.floor(share[i] * local)), int(valid[i]))
        ranked = sorted(tiles, key=lambda i: (-share[i], i))
        remainder = local - budgets.sum()
        for i in [i for i in ranked if budgets[i] < valid[i]][: max(remainder, 0)]:
            budgets[i] += 1
        remainder = local - budgets.sum()
        for i in ranked:
            take = min(int(valid[i] - budgets[i]), max(int(remainder), 0))
            budgets[i] += take
            remainder -= take
    budgets[0] = budget - budgets[1:].sum()
    return budgets
