"""Qwen2.5-VL window attention as padded windows (numpy + math only): the host's layout and its export bounds.

The window layers of Qwen2.5-VL's tower attend within windows of side x side merged tokens (side = window_size //
merge // patch; Qwen2.5-VL: 112 // 2 // 14 = 4, 64 patches a window), the windows at the right and bottom edge of
the grid cut short. The patches are permuted into window order on the host (host.patch_permutation), so window w
is the contiguous rows cu[w] .. cu[w + 1] (cu = cu_window_seqlens). `window_layout` lays them out as
[windows, window_len] slots, window_len = the longest window, and the graph runs attention per window:
[windows, heads, window_len, window_len] scores, O(P * window_len) work and memory per window layer instead of
the [heads, P, P] of one masked softmax over the whole image (1.7 GB per layer at P = 5,120 patches, 16 heads).

  window_gather  int64 [windows, window_len]  the patch row (window order) of each slot; a padding slot repeats
                                             its window's first row (any real row: it is masked as a key and
                                             dropped as a query)
  window_mask    int64 [windows, window_len]  1 on a real patch, 0 on padding (the graph's key mask)
  window_slots   int64 [patches]              each patch's slot in the flattened layout, w * window_len + j: the
                                             graph gathers the attention output back to [patches, D] with it

`window_dim_ranges` bounds the two new symbolic dims ("windows", "window_len") for every image the pixel range
admits: the manifest records them (GraphSpec.dim_ranges), TensorRT profiles and the runner's input check use them.
"""

from __future__ import annotations

import math

import numpy as np

from prunert.errors import ImageError

WINDOW_INPUT_NAMES = ("window_gather", "window_mask", "window_slots")


def window_layout(cu_window: np.ndarray) -> dict[str, np.ndarray]:
    """cu_window_seqlens (int [windows + 1], patches in window order, no empty window) -> the padded-window inputs."""
    cu = np.asarray(cu_window, np.int64)
    starts, lengths = cu[:-1], np.diff(cu)  # [W], [W]
    if len(lengths) == 0 or lengths.min() < 1:
        raise ImageError(f"window_layout: cu_window_seqlens {cu.tolist()} must hold at least one non-empty window")
    width = int(lengths.max())
    offsets = np.arange(width, dtype=np.int64)  # [L]
    valid = offsets[None, :] < lengths[:, None]  # [W, L]
    gather = np.where(valid, starts[:, None] + offsets[None, :], starts[:, None])  # [W, L]
    return {
        "window_gather": gather.astype(np.int64),
        "window_mask": valid.astype(np.int64),
        "window_slots": np.flatnonzero(valid.reshape(-1)).astype(np.int64),  # [P]: windows are contiguous and in order
    }


def windows_of_grid(rows: int, cols: int, side: int) -> int:
    """Windows of a merged grid rows x cols (each side x side, cut at the right and bottom edge)."""
    return math.ceil(rows / side) * math.ceil(cols / side)


def window_dim_ranges(low: int, opt: int, high: int, side: int, unit: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of "windows" and "window_len" over every merged grid of low..high tokens (opt: a square-ish
    grid of `opt` tokens). unit = merge^2 patches per merged token.

    windows: at least 1; at most the largest ceil(r / side) * ceil(c / side) over grids of r x c <= high tokens (for
    each r, c = high // r is the widest; the count grows with c).
    window_len: the top-left window is the longest, min(r, side) * min(c, side) tokens; over r x c >= low tokens
    that is >= min(low, side) (r < side <= c gives r * side >= side), and at most min(side^2, high)."""
    most = max(windows_of_grid(r, high // r, side) for r in range(1, high + 1))
    rows = max(1, math.isqrt(opt))
    typical = min(most, windows_of_grid(rows, -(-opt // rows), side))
    longest = unit * min(side * side, high)
    return {"windows": (1, typical, most), "window_len": (unit * min(low, side), longest, longest)}
