"""Qwen2.5-VL M-RoPE position ids on the host (numpy only): HF's get_rope_index for images, and its
pruned variant in which every kept visual token keeps its original (t, h, w) position.

rope_index                        Qwen2_5_VLModel.get_rope_index (images only; left padding)
rope_index(..., kept_indices=...) the pruned sequence: K placeholders per image get the kept tokens'
                                  original positions; the text after an image continues exactly as in the
                                  unpruned sequence. Never renumber kept tokens (deploy-facts.md).
rope_deltas / decode_position_ids decode positions: (valid tokens so far) + delta = max position + 1 + step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from prunert.errors import ConfigError, PromptError


def _grids(grid_thw: Any) -> list[tuple[int, int, int]]:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [(int(t), int(h), int(w)) for t, h, w in grid]


def grid_positions(grid_thw: Sequence[int], merge_size: int, start: int) -> np.ndarray:
    """(t, h, w) positions of an image's merged tokens in raster order, offset by `start`: int64 [3, n]."""
    t, h, w = (int(v) for v in grid_thw)
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge_size), np.arange(w // merge_size), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start


def _check_kept(kept: Any, count: int) -> np.ndarray:
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    if kept.size and (kept[0] < 0 or kept[-1] >= count or np.any(np.diff(kept) <= 0)):
        raise ConfigError(f"kept_indices: expected ascending unique indices in [0, {count}), got {kept.tolist()[:8]}...")
    return kept


def sequence_positions(segments: Sequence[Any], merge_size: int) -> tuple[np.ndarray, int]:
    """M-RoPE positions of one unpadded sequence given as an explicit layout: each segment is an int
    (that many text tokens) or (grid_thw, kept) with kept None (all merged tokens) or the ascending
    raster indices of the kept ones. -> (positions int64 [3, L], next_position): text after an image
    starts at the image's start + max(h, w) / merge whether or not tokens were pruned, and
    next_position is where generation continues (HF: max position + 1)."""
    pieces, current, top = [np.zeros((3, 0), np.int64)], 0, -1
    for segment in segments:
        if isinstance(segment, (int, np.integer)):
            pieces.append(np.broadcast_to(np.arange(int(segment), dtype=np.int64) + current, (3, int(segment))))
            current += int(segment)
        else:
            grid, kept = segment
            full = grid_positions(grid, merge_size, current)
            pieces.append(full if kept is None else full[:, _check_kept(kept, full.shape[1])])
            top = max(top, int(full.max()))
            current += max(int(grid[1]), int(grid[2])) // merge_size
    positions = np.concatenate(pieces, axis=1)
    return positions, max(top, int(positions.max(initial=-1))) + 1


def rope_index(input_ids: Any, image_grid_thw: Any, *, image_token_id: int, spatial_merge_size: int = 2,
               attention_mask: Any = None, kept_indices: Sequence[Any] | None = None,
               mm_token_type_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """HF get_rope_index for images: -> (position_ids int64 [3, B, S], rope_deltas int64 [B, 1]).

    Runs of image tokens take the next grid of `image_grid_thw` (images in order over the batch, as
    HF does); padded positions (attention_mask 0) get 0. With `kept_indices` (one ascending array
    per image, raster indices into its merged grid) each run must hold len(kept) placeholders, which
    get the kept tokens' original positions: the pruned sequence. Decode positions are
    (index among valid tokens) + rope_delta on all three axes, i.e. the last prefill position + 1.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    types = (ids == image_token_id).astype(np.int64) if mm_token_type_ids is None else np.asarray(mm_token_type_ids, np.int64)
    if np.any((types != 0) & (types != 1)):
        raise ConfigError("rope_index: only text (0) and image (1) tokens are supported (no video)")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids: Iterator[tuple[int, int, int]] = iter(_grids(image_grid_thw) if image_grid_thw is not None else [])
    kept_iter = iter(kept_indices) if kept_indices is not None else None
    position_ids = np.zeros((3, *ids.shape), dtype=np.int64)
    deltas = []
    for row in range(ids.shape[0]):
        row_types = types[row][mask[row]]
        if row_types.size == 0:  # a fully padded row
            deltas.append(0)
            continue
        starts = np.concatenate([[0], np.flatnonzero(np.diff(row_types)) + 1])
        ends = np.concatenate([starts[1:], [len(row_types)]])
        segments: list[Any] = []
        for start, end in zip(starts.tolist(), ends.tolist()):
            if row_types[start] == 0:
                segments.append(end - start)
                continue
            grid = next(grids, None)
            if grid is None:
                raise PromptError(f"rope_index: row {row} has more image-token runs than image_grid_thw has images")
            kept = None if kept_iter is None else next(kept_iter)
            expected = grid[0] * grid[1] * grid[2] // spatial_merge_size**2 if kept is None else len(np.asarray(kept).reshape(-1))
            if end - start != expected:
                raise PromptError(f"rope_index: row {row} holds {end - start} image tokens for an image of {expected}")
            segments.append((grid, kept))
        positions, next_position = sequence_positions(segments, spatial_merge_size)
        position_ids[:, row, mask[row]] = positions
        deltas.append(next_position - positions.shape[1])
    return position_ids, np.asarray(deltas, dtype=np.int64).reshape(-1, 1)


def pruned_rope_index(input_ids: Any, kept_indices: Sequence[Any], image_grid_thw: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
    """rope_index of a sequence whose image runs hold only the kept tokens (K placeholders each)."""
    return rope_index(input_ids, image_grid_thw, kept_indices=kept_indices, **kwargs)


def decode_position_ids(rope_deltas: np.ndarray, num_valid: Any) -> np.ndarray:
    """Positions of the next token of each row: int64 [3, B, 1] = num_valid tokens so far + delta."""
    step = np.asarray(num_valid, np.int64).reshape(-1, 1) + np.asarray(rope_deltas, np.int64).reshape(-1, 1)
    return np.broadcast_to(step[None], (3, *step.shape)).copy()


def rope_deltas(position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """HF's mrope_position_deltas from prefill positions [3, B, L] and mask [B, L]: max valid position + 1 -
    valid tokens, int64 [B, 1] (what rope_index returns beside the positions)."""
    valid = np.asarray(attention_mask).astype(bool)  # [B, L]
    top = np.where(valid[None], np.asarray(position_ids, np.int64), np.iinfo(np.int64).min).max(axis=(0, 2))  # [B]
    count = valid.sum(axis=1)
    return np.where(count > 0, top + 1 - count, 0).astype(np.int64).reshape(-1, 1)
