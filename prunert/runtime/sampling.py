"""Next-token choice from logits: greedy, or temperature + top-p (nucleus) sampling."""

from __future__ import annotations

import numpy as np

from prunert.config import GenerationConfig


def next_tokens(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (ties to the lower id)."""
    if config.temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / config.temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # [B, V]
    chosen = np.empty(len(probs), np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, config.top_p) + 1)]  # smallest set with mass >= top_p
        chosen[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return chosen
