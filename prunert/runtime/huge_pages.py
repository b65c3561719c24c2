"""Transparent huge pages (Linux) for the memory a CPU decode step streams: a session's weights and its KV cache.

A decode step reads every weight once. With 4 KiB pages that is ~250 page walks per MiB, and on a virtual machine each
walk is two-dimensional (guest and host tables); with 2 MiB pages it is one per 2 MiB. Most systems ship THP as
"madvise" (only regions that ask get huge pages), and ONNX Runtime does not ask. So:

- weights: the anonymous memory that grew while a session was opened (ONNX Runtime's prepacked weights; heap growth
  counts only its grown part) is collapsed into huge pages in place with madvise(MADV_COLLAPSE) (Linux 6.1+);
- KV cache: a buffer the runtime allocates is marked MADV_HUGEPAGE before it is touched, so it faults in as huge
  pages as the cache grows (numpy does the same for its large arrays; with huge pages off it is marked NOHUGEPAGE).

Either is a hint: contents never change, and where the kernel refuses (older kernel, THP "never", not Linux) nothing
happens but the report saying so. Only ranges that are already resident are collapsed (`MIN_RESIDENT`), so a sparse
region does not grow in RSS.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20  # bytes: x86-64 and aarch64 (4 KiB base pages) PMD size
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_COLLAPSE = 14, 15, 25  # <asm-generic/mman-common.h>
MIN_RESIDENT = 0.9  # a grown range is collapsed only when this share of it is already resident (its RSS)
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class Range:
    start: int
    end: int


def thp_mode() -> str:
    """The system's THP setting ("always", "madvise", "never"), or "unavailable" (not Linux, no THP)."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unavailable"


def available() -> bool:
    return sys.platform.startswith("linux") and thp_mode() in ("always", "madvise")


def anonymous_ranges() -> dict[int, tuple[int, int]]:
    """start -> (end, resident bytes) of this process's private anonymous mappings and its [heap] (/proc/self/smaps)."""
    out: dict[int, tuple[int, int]] = {}
    current: tuple[int, int] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=6)
            if "-" in head[0] and len(head) >= 5:  # a mapping's header: range perms offset dev inode [path]
                anonymous = len(head) == 5 or head[5].strip() == "[heap]"
                low, high = (int(x, 16) for x in head[0].split("-"))
                current = (low, high) if anonymous and head[1].startswith("rw") else None
            elif current is not None and head[0] == "Rss:":
                out[current[0]] = (current[1], int(head[1]) * 1024)
                current = None
    return out


def grown(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> list[Range]:
    """The resident anonymous memory of `after` that `before` did not have: each mapping of `after` less the ranges
    `before` already had (the kernel merges a new mmap into its neighbour, below or above, and the heap grows at its
    end), kept where its own new residency (RSS after less that of the old ranges inside it) covers MIN_RESIDENT of it."""
    old = sorted((start, end, resident) for start, (end, resident) in before.items())
    out = []
    for start, (end, resident) in sorted(after.items()):
        inside = [(a, b, r) for a, b, r in old if a < end and b > start]
        pieces, cursor = [], start
        for a, b, _ in inside:
            if a > cursor:
                pieces.append(Range(cursor, a))
            cursor = max(cursor, b)
        if cursor < end:
            pieces.append(Range(cursor, end))
        size = sum(r.end - r.start for r in pieces)
        new_resident = resident - sum(r for _, _, r in inside)
        if size and new_resident >= MIN_RESIDENT * size:
            out.extend(r for r in pieces if r.end - r.start >= HUGE_PAGE)
    return out


def _madvise(start: int, end: int, advice: int) -> int:
    """madvise over the huge-page-aligned inside of [start, end); the bytes it covered (0: refused or too small)."""
    low, high = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if high - low < HUGE_PAGE:
        return 0
    return high - low if _libc().madvise(low, high - low, advice) == 0 else 0


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)  # this process's C library
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


class Collapse:
    """Around a session's opening: `with Collapse() as c: open()`, then c.bytes huge-paged (0 where unavailable)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and available()
        self.bytes = 0

    def __enter__(self) -> "Collapse":
        self.before = anonymous_ranges() if self.enabled else {}
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self.enabled and kind is None:
            self.bytes = sum(_madvise(r.start, r.end, MADV_COLLAPSE) for r in grown(self.before, anonymous_ranges()))


def huge_empty(shape: tuple[int, ...], dtype: np.dtype, enabled: bool = True) -> np.ndarray:
    """An uninitialised array on fresh anonymous memory (its own mmap, huge-page aligned, no page touched yet) marked
    MADV_HUGEPAGE (it faults in as huge pages) or, not enabled, MADV_NOHUGEPAGE (numpy marks its own arrays of 4 MiB
    and more, numpy._core.multiarray._set_madvise_hugepage). Not Linux or no THP: np.empty."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not available() or size < HUGE_PAGE:
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled on first touch
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(memory)) % HUGE_PAGE  # to the first huge-page boundary
    array = np.frombuffer(memory, dtype, size // dtype.itemsize, offset).reshape(shape)  # holds `memory` alive
    _madvise(array.ctypes.data, array.ctypes.data + size, MADV_HUGEPAGE if enabled else MADV_NOHUGEPAGE)
    return array
