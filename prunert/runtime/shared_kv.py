"""The fused decoder's KV cache, written in place (manifest kv_cache "shared-buffer", prunert.export.fused_decoder).

Each past_key_values.{i}.* is one host buffer [rows allocated, kv_heads, capacity, head_dim]; the rows the session
holds are its first `rows` (a contiguous prefix), bound as both the input and the present.{i}.* output, so a step
writes only its own slots and nothing copies the cache. Inside a buffer row the tokens start at slot 0 and the graph
reads each row's length from the mask's count of ones. The host's protocol is the standard graph's (a left-padded
prefill, then one mask column more per step): the prefill's rows are shifted to slot 0 on the way in and their
logits back on the way out, and `padding` [rows] (mask width - the row's own length) maps one layout to the other.
Rows join (merge: a copy of the new rows' own slots) and leave (keep: the survivors moved down) between steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from prunert.errors import InputShapeError
from prunert.runtime.huge_pages import huge_empty
from prunert.runtime.runner import HOST_INPUTS, LOGITS, DecoderSession, OnnxRuntimeRunner, Runner


class SharedBufferKVSession(DecoderSession):
    runner: OnnxRuntimeRunner

    def __init__(self, runner: Runner, num_layers: int):
        super().__init__(runner, num_layers)
        self.capacity = runner.spec.dim_ranges["cache"][2]  # the artifact's max_sequence
        self.buffers: list[np.ndarray] = []  # [allocated, kv_heads, capacity, head_dim] each, in past_key_values order
        self.batch = 0  # rows held: buffers[:, :batch]
        self.length = 0  # the host mask's width T (the longest row's length)
        self.padding = np.zeros(0, np.int64)  # [batch] T - each row's own length (its left padding in the host layout)
        self._bound = -1  # the row count the binding was made for
        self._out: np.ndarray | None = None  # a step's logits buffer (_logits)

    @property
    def rows(self) -> int:
        return self.batch

    def reset(self, batch: int) -> None:
        self._allocate(batch, keep=0)
        self.batch, self.length, self.padding = batch, 0, np.zeros(batch, np.int64)

    def run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        feeds = self.host_feeds(inputs_embeds, attention_mask, position_ids, self.batch, self.length)
        new = inputs_embeds.shape[1]
        if self.length + new > self.capacity:
            raise InputShapeError(f"input 'inputs_embeds': {self.length} cached + {new} new positions exceed the KV cache's "
                                  f"{self.capacity} (the artifact's max_sequence)")
        first = self.length == 0
        if first:  # [B, S, D] and positions [..., B, S]: each row's tokens from slot 0
            self.padding = left_padding(attention_mask)
            feeds[HOST_INPUTS[0]] = shift_rows(inputs_embeds, -self.padding, axis=1)
            feeds[HOST_INPUTS[2]] = shift_rows(position_ids, -self.padding, axis=-1)
        binding = self._binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        out = None if first else self._logits(new)
        if out is None:  # a prefill: ONNX Runtime allocates [B, S, V]
            binding.bind_output(LOGITS)
        else:  # a step writes into a buffer kept for its shape: no allocation, and no wrapping of every bound output
            binding.bind_output(LOGITS, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.runner.session.run_with_iobinding(binding)
        self.length += new
        if out is not None:
            return out.copy()  # [B, S, V]; the buffer is the next step's
        logits = binding.get_outputs()[0].numpy()  # [B, S, V], bound first
        return shift_rows(logits, self.padding, axis=1)  # the host's layout: each row's last token at -1

    def present(self) -> list[np.ndarray]:
        """The cache in the host's left-padded layout, [B, kv_heads, T, head_dim]: zeros where a row is padded."""
        out = []
        for buffer in self.buffers:
            cache = np.zeros(buffer[: self.batch, :, : self.length].shape, buffer.dtype)
            for row, pad in enumerate(self.padding):
                cache[row, :, pad:] = buffer[row, :, : self.length - pad]
            out.append(cache)
        return out

    def merge(self, other: DecoderSession) -> None:
        if not isinstance(other, SharedBufferKVSession):
            raise TypeError(f"merge: a {type(other).__name__} into a shared-buffer session (expected the same graph's session)")
        start, added, width = self.batch, other.batch, max(self.length, other.length)
        self._allocate(start + added, keep=start)
        for mine, theirs in zip(self.buffers, other.buffers):
            mine[start : start + added, :, : other.length] = theirs[:added, :, : other.length]  # [b, H, L, hd]: own slots
        self.padding = np.concatenate([self.padding + width - self.length, other.padding + width - other.length])
        self.batch, self.length = start + added, width

    def keep(self, rows: Sequence[int], trim: int = 0) -> None:
        rows = [int(r) for r in rows]
        if sorted(set(rows)) != rows or (rows and not 0 <= rows[0] <= rows[-1] < self.batch):
            raise ValueError(f"keep: rows {rows}, expected ascending distinct rows of 0..{self.batch - 1}")
        padding = self.padding[rows] - trim if rows else np.zeros(0, np.int64)
        if (padding < 0).any():
            raise ValueError(f"keep: trim {trim} exceeds a kept row's padding {self.padding[rows].min()}")
        for target, source in enumerate(rows):  # ascending: a source is never overwritten before it is read
            if target != source:
                for buffer in self.buffers:
                    buffer[target, :, : self.length] = buffer[source, :, : self.length]
        self.batch, self.length, self.padding = len(rows), self.length - trim, padding

    def _allocate(self, rows: int, keep: int) -> None:
        """Buffers for at least `rows` rows; the first `keep` rows' slots carried over when they grow."""
        if self.buffers and self.buffers[0].shape[0] >= rows:
            return
        specs = [self.runner.spec.input(name) for name in self.past_names]
        size = max(rows, 2 * self.buffers[0].shape[0]) if self.buffers else rows  # a growing batch doubles
        huge = self.runner.runtime.huge_pages
        grown = [huge_empty((size, spec.shape[1], self.capacity, spec.shape[3]), np.dtype(spec.dtype), huge)
                 for spec in specs]  # empty: pages are touched only where written (huge pages where the runtime may)
        for new, old in zip(grown, self.buffers):
            new[:keep, :, : self.length] = old[:keep, :, : self.length]
        self.buffers, self._bound = grown, -1

    def _logits(self, new: int) -> np.ndarray:
        """The logits buffer [rows, new, V] of a step (made again when the rows or the step size change)."""
        spec = next(t for t in self.runner.spec.outputs if t.name == LOGITS)  # [batch, sequence, V]
        shape = (self.batch, new, int(spec.shape[-1]))
        if self._out is None or self._out.shape != shape:
            self._out = np.empty(shape, np.dtype(spec.dtype))
        return self._out

    def _binding(self) -> Any:
        """One IOBinding per row count: each buffer's first `batch` rows bound as past and present (the same memory)."""
        if self._bound != self.batch:
            import onnxruntime as ort

            self._views = [ort.OrtValue.ortvalue_from_numpy(buffer[: self.batch]) for buffer in self.buffers]  # no copy
            self.binding = self.runner.session.io_binding()
            self.binding.bind_output(LOGITS)  # first: run() reads outputs[0]; rebound (unallocated) by each run
            for past, present, view in zip(self.past_names, self.present_names, self._views):
                self.binding.bind_ortvalue_input(past, view)
                self.binding.bind_ortvalue_output(present, view)  # written in place
            self._bound = self.batch
        return self.binding


def left_padding(mask: np.ndarray) -> np.ndarray:
    """mask [B, S] of a prefill -> each row's count of leading zeros [B]; a row whose zeros are not all leading is an
    InputShapeError (the host pads on the left only)."""
    pad = mask.shape[1] - mask.sum(axis=1)  # [B]
    aligned = np.arange(mask.shape[1])[None] >= pad[:, None]  # [B, S]: the mask a left-padded row has
    wrong = (mask.astype(bool) != aligned).any(axis=1)  # [B]
    if wrong.any():
        raise InputShapeError(f"input 'attention_mask': row {int(np.flatnonzero(wrong)[0])} of the prefill is not left-padded "
                              "(expected zeros, then ones)")
    return pad.astype(np.int64)


def shift_rows(x: np.ndarray, shift: np.ndarray, axis: int) -> np.ndarray:
    """Roll each batch row of x along `axis` by its own shift (> 0: towards the end); the batch axis is the one before
    `axis` ([B, S, ...] with axis 1, or [..., B, S] with axis -1). No shift: x itself."""
    if not shift.any():
        return x
    axis = axis % x.ndim
    index = (np.arange(x.shape[axis])[None] - shift[:, None]) % x.shape[axis]  # [B, S]: the source of each slot
    shape = [1] * x.ndim
    shape[axis - 1], shape[axis] = index.shape
    return np.take_along_axis(x, index.reshape(shape), axis=axis)
