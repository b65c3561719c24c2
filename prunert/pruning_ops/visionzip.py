"""VisionZip (Yang et al., arXiv 2412.04467) as a static-budget op: K_d dominant tokens by [CLS] attention plus
K_c contextual tokens merged by key similarity, K_d + K_c = K.

Definition (one image; N tokens, budget K, 1 <= K <= N):
  1. Split:       K_c = floor(K * contextual_fraction + 1/2), K_d = K - K_c (54+10 at K=64, 108+20 at 128,
                  162+30 at 192 with the default 10/64; K_c = 0 is pure dominant selection, e.g. K <= 3).
  2. Dominant:    the K_d tokens of largest cls_attention; equal attention -> lower index (exact comparison:
                  attention is an input, every backend sees the same fp32 values).
  3. Targets:     the R = N - K_d remaining tokens in ascending raster order; step = max(1, R // K_c); the
                  targets are remaining positions 0, step, 2*step, ..., (K_c-1)*step (VisionZip's code:
                  arange(0, R, step)[:K_c]). R >= K_c always (R = N - K + K_c), so step >= 1 and there are K_c
                  targets; K = N - 1 leaves exactly one source to merge, K = N none.
  4. Assignment:  every other remaining token ("source") goes to the target whose key is most similar by
                  cosine, cos(k_i, k_t) = <k_i, k_t> / (|k_i| |k_t|) (VisionZip's code L2-normalises the keys
                  and takes dot products: the same thing). Keys are patch_keys, optionally averaged over
                  `key_heads` equal slices first (VisionZip's code averages the per-head keys of CLIP: 16
                  heads on ViT-L/14). Ties: cosines within VISIONZIP_TIE_ATOL of the best -> the lowest target.
                  A zero key has cosine 0 to every target: it goes to target 0 (all tied).
  5. Merge:       contextual token of target t = tokens[t] + mean(tokens[s] for s assigned to t), the target
                  itself NOT in the mean, and a target with no sources stays tokens[t] (VisionZip's code:
                  target_hidden + bmm(one_hot^T, hidden_to_merge) / counts.clamp(min=1)). Merged on
                  projector outputs ("tokens"); similarity on keys.
  6. Output:      kept_indices = dominant indices U target indices (disjoint: K distinct), ascending; a merged
                  token's index is its target's raster index. kept_tokens follow that order: tokens[i] bit
                  for bit for dominant i, the merged token for a target.

LLM positions: the runtime splices kept_tokens in kept_indices order at consecutive positions, so a merged
token sits where its target's raster rank puts it among the kept tokens (VisionZip's code instead appends all
contextual tokens after the dominant ones; LLaVA-1.5's 1-D RoPE sees only the order).

Deliberate differences from VisionZip's released code (arXiv 2412.04467, github dvlab-research/VisionZip):
  * merging is on projector outputs, not on the layer -2 hidden states before the projector (the projector is
    an MLP, so mean-then-project != project-then-mean);
  * the [CLS] row is a token only where the LLM sees it: LLaVA-1.5 ("default") drops it before the projector,
    and VisionZip's code counts [CLS] as one of the dominant tokens (53 patches + [CLS] for "54"); here the
    op ranks exactly the N tokens it is given (with LLaVA's "full" strategy the [CLS] row is token 0, scored by
    its own attention column); tokens, cls_attention and patch_keys of different N are a ConfigError;
  * keys are the full concatenated key vectors unless key_heads is set (16 reproduces the head average);
  * tie tolerance on the assignment cosines, so ONNX Runtime, torch and NumPy assign identically.

Graph: no Loop, no NonZero; one TopK (sorted, k = K) in kept_to_indices; dominant ranking by pairwise
comparison (O(N^2) booleans, ~0.3 M at N = 576) instead of TopK, so ties resolve the same way in eager torch
(whose topk does not promise an order on ties) and in ONNX Runtime; positions among the remaining tokens by a
float CumSum (exact below 2^24, axis an initializer); target / source gathers as one-hot mat-muls. 60 nodes
whatever K (fewer with K_c = 0); ~3 s export; ONNX Runtime, 2 CPU cores, N=576, D=Dv=1024, K=64: 3.5 ms
(best of 10 on a shared machine).

This module imports torch only inside the op: visionzip_reference runs on NumPy alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from prunert.config import TRT_MAX_TOPK, VisionZipConfig
from prunert.errors import ConfigError
from prunert.pruning_ops.reference import TIE_RTOL

# Assignment cosines within this ABSOLUTE distance of a source's best one count as tied and go to the lowest
# target slot. Cosines live in [-1, 1], where fp32 rounding (~1e-6 at Dv = 1024) is absolute, not relative;
# the value is ResPrune's TIE_RTOL, with the same reasoning (margin over fp32 noise, invisible to quality).
VISIONZIP_TIE_ATOL = TIE_RTOL


def split_budget(budget: int, cfg: VisionZipConfig) -> tuple[int, int]:
    """K -> (K_d dominant, K_c contextual); K_c = floor(K * contextual_fraction + 1/2)."""
    contextual = min(budget, int(math.floor(budget * cfg.contextual_fraction + 0.5)))
    return budget - contextual, contextual


def _check(budget: int, n: int, dv: int, cfg: VisionZipConfig, counts: dict[str, int]) -> None:
    from prunert.pruning_ops import check_same_tokens

    check_same_tokens("visionzip", counts)  # tokens, cls_attention and patch_keys: the same N tokens
    if not 0 <= cfg.contextual_fraction <= 1:
        raise ConfigError(f"visionzip contextual_fraction: got {cfg.contextual_fraction}, expected 0 <= fraction <= 1")
    if cfg.key_heads < 1 or dv % cfg.key_heads:
        raise ConfigError(f"visionzip key_heads: got {cfg.key_heads}, expected >= 1 and dividing the key width {dv}")
    if not 0 < budget <= n:
        raise ConfigError(f"visionzip budget: got {budget}, expected 1 <= budget <= {n} (the number of tokens)")
    if budget > TRT_MAX_TOPK:  # kept_to_indices runs TopK with k = K
        raise ConfigError(f"visionzip budget: got {budget}, expected <= {TRT_MAX_TOPK} (TensorRT's TopK limit)")


# ----------------------------------------------------------------------------------------- torch op


def visionzip_op(inputs: dict[str, Any], budget: int, cfg: VisionZipConfig) -> tuple[Any, Any]:
    """Registry entry: {"tokens" [B, N, D], "cls_attention" [B, N], "patch_keys" [B, N, Dv], ...}
    -> (kept_tokens [B, K, D], kept_indices [B, K] int64 ascending). Text inputs are ignored."""
    import torch

    from prunert.pruning_ops.common import kept_to_indices

    tokens = inputs["tokens"]  # [B, N, D]
    attention = inputs["cls_attention"].float()  # [B, N]
    keys = inputs["patch_keys"].float()  # [B, N, Dv]
    batch, n, width = tokens.shape
    dv = keys.shape[-1]
    _check(budget, n, dv, cfg, {"tokens": n, "cls_attention": int(attention.shape[-1]), "patch_keys": int(keys.shape[1])})
    n_dominant, n_contextual = split_budget(budget, cfg)
    positions = torch.arange(n, device=tokens.device)  # [N]

    # 1. dominant: rank_i = #{j : a_j > a_i, or a_j == a_i and j < i}; a strict total order, so exactly K_d ranks < K_d
    a_i, a_j = attention[:, :, None], attention[:, None, :]  # [B, N, 1], [B, 1, N]
    ahead = (a_j > a_i) | ((a_j == a_i) & (positions[None, None, :] < positions[None, :, None]))  # [B, N, N]
    dominant = ahead.sum(dim=-1) < n_dominant  # [B, N] bool
    if n_contextual == 0:
        indices = kept_to_indices(dominant, budget)  # [B, K]
        return tokens.gather(1, indices[:, :, None].expand(-1, -1, width)), indices

    # 2. targets: every step-th remaining token (remaining = not dominant, raster order), K_c of them
    step = max(1, (n - n_dominant) // n_contextual)
    remaining = ~dominant  # [B, N]
    rank = torch.cumsum(remaining.float(), dim=-1) - 1.0  # [B, N] position among the remaining (exact in fp32)
    slots = torch.arange(n_contextual, device=tokens.device)  # [K_c]
    target_onehot = (remaining[:, :, None] & (rank[:, :, None] == (slots * step).float())).float()  # [B, N, K_c]
    is_target = target_onehot.sum(dim=-1) > 0  # [B, N], K_c per row
    source = remaining & ~is_target  # [B, N]

    # 3. assignment by key cosine; ties within VISIONZIP_TIE_ATOL -> lowest slot (argmax of a 0/1 mask = first 1)
    if cfg.key_heads > 1:
        keys = keys.unflatten(-1, (cfg.key_heads, dv // cfg.key_heads)).mean(dim=-2)  # [B, N, Dv/h]
    unit = _unit_rows(keys)  # [B, N, Dk]
    target_keys = target_onehot.transpose(1, 2) @ unit  # [B, K_c, Dk]
    cosine = unit @ target_keys.transpose(1, 2)  # [B, N, K_c]
    best = cosine.amax(dim=-1, keepdim=True)  # [B, N, 1]
    slot = (cosine >= best - VISIONZIP_TIE_ATOL).to(torch.float32).argmax(dim=-1, keepdim=True)  # [B, N, 1]
    assign = ((slot == slots) & source[:, :, None]).float()  # [B, N, K_c]

    # 4. merge: target + mean of its sources (target not in the mean; no sources -> the target alone)
    x = tokens.float()  # [B, N, D]
    counts = assign.sum(dim=1)[:, :, None]  # [B, K_c, 1]
    mean = (assign.transpose(1, 2) @ x) / counts.clamp_min(1.0)  # [B, K_c, D]
    merged = torch.where(is_target[:, :, None], x + target_onehot @ mean, x).to(tokens.dtype)  # [B, N, D]

    indices = kept_to_indices(dominant | is_target, budget)  # [B, K] ascending
    return merged.gather(1, indices[:, :, None].expand(-1, -1, width)), indices  # [B, K, D], [B, K]


def _unit_rows(v: Any) -> Any:
    """Rows scaled to unit L2 norm, overflow- and underflow-free: divide by the row's max |entry| first, so the
    norm is in [1, sqrt(width)]. Zero rows stay zero."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    v = v / v.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)
    norm = v.norm(dim=-1, keepdim=True)
    return v / torch.where(norm > 0, norm, 1.0)


# ----------------------------------------------------------------------------------------- NumPy reference


def visionzip(
    tokens: np.ndarray, cls_attention: np.ndarray, patch_keys: np.ndarray, budget: int, cfg: VisionZipConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One image: tokens [N, D], cls_attention [N], patch_keys [N, Dv] -> (kept indices [K] ascending,
    kept tokens [K, D] float64). Plain loops, float64: the definition in the module docstring."""
    x = np.asarray(tokens, np.float64)
    attention = np.asarray(cls_attention, np.float64)  # exact: fp32 -> fp64 keeps every comparison
    keys = np.asarray(patch_keys, np.float64)
    n, dv = keys.shape
    _check(budget, n, dv, cfg, {"tokens": len(x), "cls_attention": len(attention), "patch_keys": n})
    n_dominant, n_contextual = split_budget(budget, cfg)

    order = sorted(range(n), key=lambda i: (-attention[i], i))  # attention descending, ties -> lower index
    dominant = set(order[:n_dominant])
    remaining = [i for i in range(n) if i not in dominant]  # ascending
    out = {i: x[i] for i in dominant}
    if n_contextual:
        step = max(1, len(remaining) // n_contextual)
        targets = remaining[0 : step * n_contextual : step]
        assert len(targets) == n_contextual
        if cfg.key_heads > 1:
            keys = keys.reshape(n, cfg.key_heads, dv // cfg.key_heads).mean(axis=1)
        norm = np.linalg.norm(keys, axis=1, keepdims=True)
        unit = keys / np.where(norm > 0, norm, 1.0)
        assigned: dict[int, list[int]] = {t: [] for t in targets}
        for i in remaining:
            if i in assigned:
                continue
            cosine = np.array([unit[i] @ unit[t] for t in targets])
            slot = int(np.flatnonzero(cosine >= cosine.max() - VISIONZIP_TIE_ATOL)[0])
            assigned[targets[slot]].append(i)
        for t, sources in assigned.items():
            out[t] = x[t] + (x[sources].mean(axis=0) if sources else 0.0)
    kept = np.array(sorted(out), np.int64)
    return kept, np.stack([out[i] for i in kept])


def visionzip_reference(inputs: dict[str, np.ndarray], budget: int, cfg: VisionZipConfig) -> tuple[np.ndarray, np.ndarray]:
    """Registry entry: one sample's {"tokens" [N, D], "cls_attention" [N], "patch_keys" [N, Dv]}
    -> (kept indices [K] ascending, kept tokens [K, D])."""
    return visionzip(inputs["tokens"], inputs["cls_attention"], inputs["patch_keys"], budget, cfg)
