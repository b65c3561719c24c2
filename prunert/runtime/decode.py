"""The one decode loop: DecodeBatch, a running batch of rows over a DecoderSession that rows join and leave
between steps (continuous batching). decode_steps drives it for one prefilled batch (VLMPipeline.decode: generate,
parity, calibration; the benchmarks); the server admits each request after its own vision and prefill.

A row's step 0 chooses from its prefill's last logits when it is admitted (no decoder call). Every step() runs the
session once over the rows held, on their previous tokens, the attention mask one column longer and the positions
one further, then each row chooses again: a row's n steps take n - 1 decoder calls. A row finishes on an EOS id or
after its own `steps`, and leaves the session at once (its KV rows are freed; the mask loses the columns that only
it needed), so the next call runs the rows still going. Choice is per row, with the row's own chooser
(prunert.runtime.sampling.next_tokens with its own generator, or `greedy`): a row's tokens do not depend on its
neighbours. Shapes: n rows held, T the mask's width (the longest row's length), V the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np

from prunert.runtime.runner import DecoderSession

Chooser = Callable[[np.ndarray], np.ndarray]  # logits [B, V] -> token ids [B]
Embedder = Callable[[np.ndarray], np.ndarray]  # token ids [B] -> inputs_embeds [B, 1, D]


@dataclass(frozen=True)
class Step:
    index: int  # 0: chosen from the prefill's logits; step i comes after i decoder calls in all
    tokens: np.ndarray  # [B] int64: each row's token (`pad` for rows finished before this step)
    logits: np.ndarray  # [B, V] the logits they were chosen from
    active: np.ndarray  # [B] bool: rows that got a real token this step
    last: np.ndarray  # [B] bool: active rows whose token is their last (an EOS id, or the final step)


@dataclass(frozen=True)
class RowEvent:
    handle: Hashable  # the caller's name for the row
    index: int  # the row's step: 0 chose from its prefill's logits
    token: int
    logits: np.ndarray  # [V] it was chosen from
    finish: str | None  # "eos", "length" (its steps are used up), or None: more follow


@dataclass
class _Row:
    handle: Hashable
    choose: Chooser
    steps: int  # tokens it may choose in all
    taken: int = 0
    token: int = 0  # the last one chosen: the next call's input


def greedy(logits: np.ndarray) -> np.ndarray:
    """logits [B, V] -> the highest-scoring id per row [B] (ties to the lower id)."""
    return logits.argmax(axis=-1)


def table_embedder(table: Any, dtype: Any = np.float32) -> Embedder:
    """Token ids [B] -> their rows of the LLM's input-embedding table, [B, 1, D] in `dtype` (the decoder graph's
    declared inputs_embeds type: VLMPipeline.embeds_dtype)."""
    return lambda tokens: np.asarray(table[tokens], dtype)[:, None]


class DecodeBatch:
    """Rows decoding together. admit() adds a prefilled batch's rows; step() is one decoder call over every row
    held; cancel() drops a row between steps. Not thread-safe: one thread admits, steps and cancels."""

    def __init__(self, embed: Embedder, eos: Iterable[int] = ()):
        self.embed = embed
        self.eos = frozenset(int(t) for t in eos)
        self.session: DecoderSession | None = None  # holds the rows' KV cache, in self.rows order
        self.rows: list[_Row] = []
        self.mask = np.zeros((0, 0), np.int64)  # [n, T] left-padded, as the session's cache
        self.positions = np.zeros((0, 1), np.int64)  # [n, 1] (M-RoPE [3, n, 1]): each row's next position

    @property
    def handles(self) -> list[Hashable]:
        return [row.handle for row in self.rows]

    def admit(self, session: DecoderSession, logits: np.ndarray, mask: np.ndarray, positions: np.ndarray,
              choose: Chooser | Sequence[Chooser], steps: int | Sequence[int], handles: Sequence[Hashable]) -> list[RowEvent]:
        """session: holds the prefill of b rows (handed over: merged into the batch's, or kept as it while the batch is
        empty); logits [b, V]: their last positions; mask [b, L]: the prefill's; positions: each row's next ([b, 1],
        M-RoPE [3, b, 1]: the host's next_position_ids); choose / steps: one for all, or one per row.
        -> each row's step-0 event (rows that finish on it never join)."""
        count = mask.shape[0]
        chooses = list(choose) if isinstance(choose, Sequence) else [choose] * count
        budgets = list(steps) if isinstance(steps, Sequence) else [steps] * count
        rows = [_Row(handle, c, s) for handle, c, s in zip(handles, chooses, budgets, strict=True)]
        events = [self._choose(row, row_logits) for row, row_logits in zip(rows, logits)]
        stay = [i for i, event in enumerate(events) if event.finish is None]
        if stay:
            mask, positions = _kept(session, mask, positions, stay)
            if not self.rows:  # an empty batch takes the prefill's session as it is
                self.session, self.mask, self.positions = session, mask, positions
            else:
                self.session.merge(session)
                self.mask = _merge_masks(self.mask, mask)
                self.positions = np.concatenate([self.positions, positions], axis=-2)
            self.rows += [rows[i] for i in stay]
        return events

    def step(self) -> list[RowEvent]:
        """One decoder call over the rows held -> one event per row, in their order (finished rows then leave)."""
        if not self.rows:
            return []
        tokens = np.asarray([row.token for row in self.rows], np.int64)  # [n]
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), self.mask.dtype)], axis=1)  # [n, T + 1]
        logits = self.session.run(self.embed(tokens), self.mask, self.positions)[:, -1]  # [n, V]
        self.positions = self.positions + 1
        events = [self._choose(row, row_logits) for row, row_logits in zip(self.rows, logits)]
        self._leave([i for i, event in enumerate(events) if event.finish is not None])
        return events

    def cancel(self, handle: Hashable) -> bool:
        """Drop the row named `handle` now (a client gone): False when no such row is held."""
        where = [i for i, row in enumerate(self.rows) if row.handle == handle]
        self._leave(where)
        return bool(where)

    def _choose(self, row: _Row, logits: np.ndarray) -> RowEvent:
        row.token = int(row.choose(logits[None])[0])  # [1, V] -> [1]
        row.taken += 1
        finish = "eos" if row.token in self.eos else "length" if row.taken >= row.steps else None
        return RowEvent(row.handle, row.taken - 1, row.token, logits, finish)

    def _leave(self, gone: Sequence[int]) -> None:
        if not gone:
            return
        stay = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in stay]
        if not stay:
            self.session, self.mask, self.positions = None, self.mask[:0, :0], self.positions[..., :0, :]
            return
        self.mask, self.positions = _kept(self.session, self.mask, self.positions, stay)


def _kept(session: DecoderSession, mask: np.ndarray, positions: np.ndarray, stay: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep rows `stay` of a session and its mask [n, T] / positions [..., n, 1], without the leading columns that are
    padding in every kept row."""
    if len(stay) == mask.shape[0]:
        return mask, positions
    mask = mask[stay]
    trim = int(np.flatnonzero(mask.any(axis=0))[0]) if mask.any() else mask.shape[1]
    session.keep(stay, trim)
    return mask[:, trim:], positions[..., stay, :]


def _merge_masks(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """[n, T] and [b, L] left-padded -> [n + b, max(T, L)] (DecoderSession.merge pads the caches alike)."""
    width = max(mine.shape[1], theirs.shape[1])
    return np.concatenate([np.pad(m, [(0, 0), (width - m.shape[1], 0)]) for m in (mine, theirs)])


def decode_steps(
    session: DecoderSession,
    logits: np.ndarray,
    mask: np.ndarray,
    positions: np.ndarray,
    embed: Embedder,
    choose: Chooser | Sequence[Chooser] = greedy,
    steps: int | Sequence[int] = 1,
    eos: Iterable[int] = (),
    pad: int = 0,
) -> Iterator[Step]:
    """One prefilled batch through a DecodeBatch, as whole-batch steps. session: holds the prefill's KV cache (rows
    leave it as they finish). logits [B, V]: the prefill's last position. mask [B, L]: the prefill's. positions: the
    first decode step's position ids ([B, 1]; M-RoPE [3, B, 1]: the host's next_position_ids). choose / steps: for
    every row, or one per row. Yields at most max(steps) steps (the caller caps them by the artifact's
    max_sequence); eos empty: no row finishes early (benchmarks time a fixed number of decoder calls). A finished
    row's token is `pad` and its logits zeros from then on."""
    batch = mask.shape[0]
    if max(steps if isinstance(steps, Sequence) else [steps]) < 1:
        return
    decoding = DecodeBatch(embed, eos)
    events = decoding.admit(session, logits, mask, positions, choose, steps, range(batch))
    index = 0
    while events:
        tokens, chosen = np.full(batch, pad, np.int64), np.zeros((batch, logits.shape[-1]), logits.dtype)
        active, last = np.zeros(batch, bool), np.zeros(batch, bool)
        for event in events:
            tokens[event.handle], chosen[event.handle], active[event.handle] = event.token, event.logits, True
            last[event.handle] = event.finish is not None
        yield Step(index, tokens, chosen, active, last)
        events, index = decoding.step(), index + 1
