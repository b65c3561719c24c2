"""Prompt handling on the host (numpy + tokenizers): the prompt's content words, embedded with the
LLM's own input-embedding table, for ResPrune's text relevance.

Content words: the prompt's tokens grouped by word (the tokenizer's word ids); a word is dropped if
any of its tokens is special (BOS, the image placeholder, ...), or if it is punctuation / a number-free
symbol run, or a stop word. Each remaining word's embedding is the mean of its word pieces' rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
    nor not now of off on once only or other our ours ourselves out over own please same she should so some
    such than that the their theirs them themselves then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you your yours
    yourself yourselves picture image photo show shown tell describe""".split()
)


def content_word_groups(tokenizer, prompt: str, special_ids: set[int]) -> list[list[int]]:
    """Token ids of each content word of `prompt`, in order."""
    encoding = tokenizer.encode(prompt, add_special_tokens=False)
    groups: dict[int, list[int]] = {}
    spans: dict[int, list[int]] = {}
    dropped: set[int] = set()
    for token_id, word_id, (start, end) in zip(encoding.ids, encoding.word_ids, encoding.offsets):
        if word_id is None or token_id in special_ids:
            if word_id is not None:
                dropped.add(word_id)
            continue
        groups.setdefault(word_id, []).append(token_id)
        span = spans.setdefault(word_id, [start, end])
        span[1] = max(span[1], end)
    words = []
    for word_id, ids in groups.items():
        text = prompt[spans[word_id][0] : spans[word_id][1]].strip().lower()
        if word_id in dropped or not any(ch.isalnum() for ch in text) or text.strip("'\".,!?;:") in STOP_WORDS:
            continue
        words.append(ids)
    return words


def text_relevance_inputs(
    groups_per_prompt: Sequence[list[list[int]]], table: np.ndarray, max_words: int
) -> tuple[np.ndarray, np.ndarray]:
    """Word embeddings padded to a batch: text_embeds [B, M, D] float32, text_mask [B, M] int64 (M >= 1).

    A prompt with no content words gets one masked row: the selection graph then uses r = 1.
    """
    batch, hidden = len(groups_per_prompt), table.shape[1]
    width = max(1, min(max_words, max((len(g) for g in groups_per_prompt), default=0)))
    embeds = np.zeros((batch, width, hidden), np.float32)  # [B, M, D]
    mask = np.zeros((batch, width), np.int64)  # [B, M]
    for row, groups in enumerate(groups_per_prompt):
        for col, ids in enumerate(groups[:width]):
            embeds[row, col] = np.asarray(table[ids], np.float32).mean(axis=0)
            mask[row, col] = 1
    return embeds, mask
