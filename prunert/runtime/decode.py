"""The one decode loop: a generator of steps over a DecoderSession. VLMPipeline.decode (generate, parity,
calibration) and the benchmarks step through it instead of each keeping its own loop.

Step 0 chooses from the prefill's last logits (no decoder call). Every later step first runs the session on
the previous step's tokens, the attention mask one column longer and the positions one further, then chooses
again: n steps make n - 1 decoder calls. EOS handling lives here: a row that chose an EOS id is finished, gets
`pad` from then on (its embedding still goes through the batch), and the loop ends once every row is finished
or after `steps` steps. Sampling is the caller's `choose` (prunert.runtime.sampling.next_tokens, or `greedy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

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


def greedy(logits: np.ndarray) -> np.ndarray:
    """logits [B, V] -> the highest-scoring id per row [B] (ties to the lower id)."""
    return logits.argmax(axis=-1)


def table_embedder(table: Any, dtype: Any = np.float32) -> Embedder:
    """Token ids [B] -> their rows of the LLM's input-embedding table, [B, 1, D] in `dtype` (the decoder graph's
    declared inputs_embeds type: VLMPipeline.embeds_dtype)."""
    return lambda tokens: np.asarray(table[tokens], dtype)[:, None]


def decode_steps(
    session: DecoderSession,
    logits: np.ndarray,
    mask: np.ndarray,
    positions: np.ndarray,
    embed: Embedder,
    choose: Chooser = greedy,
    steps: int = 1,
    eos: Iterable[int] = (),
    pad: int = 0,
) -> Iterator[Step]:
    """session: holds the prefill's KV cache. logits [B, V]: the prefill's last position. mask [B, L]: the prefill's.
    positions: the first decode step's position ids ([B, 1]; M-RoPE [3, B, 1]: the host's next_position_ids).
    Yields at most `steps` steps (the caller caps them by the artifact's max_sequence); eos empty: no row finishes
    early (benchmarks time a fixed number of decoder calls)."""
    batch = mask.shape[0]
    eos_ids = np.asarray(sorted(set(eos)), np.int64)
    done = np.zeros(batch, bool)  # [B]
    tokens = np.zeros(batch, np.int64)
    for index in range(steps):
        if index:
            mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)  # [B, L + index]
            logits = session.run(embed(tokens), mask, positions)[:, -1]  # [B, V]
            positions = positions + 1
        active = ~done
        tokens = np.where(done, pad, choose(logits)).astype(np.int64)  # [B]
        done = done | (active & np.isin(tokens, eos_ids))
        yield Step(index, tokens, logits, active, active & (done | (index == steps - 1)))
        if done.all():
            return
