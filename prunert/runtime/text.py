"""Prompt handling on the host (numpy + tokenizers): the prompt's content words, embedded with the
LLM's own input-embedding table, for ResPrune's text relevance.

Content words: the prompt's tokens grouped by word (the tokenizer's word ids); a word is dropped if
any of its tokens is special (BOS, the image placeholder, ...), or if it is punctuation / a number-free
symbol run, or a stop word. Each remaining word's embedding is the mean of its word pieces' rows.

Special tokens typed in a prompt (`</s>`, `<s>`, `<pad>`, `<|im_end|>`) are text, as a chat server encodes user
content: only the template's own special tokens and the prompt's image placeholders (one per image) are special
(`encode_prompt`; parity's Hugging Face reference applies the same `plain_text_runs`).
A rendered chat template (`ChatPrompt`, prunert.runtime.chat) is encoded the same way: the messages' own text is
user text, everything else (role markers, the image placeholder the template put there) is the template's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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


Span = tuple[int, int]  # [start, end) characters of the formatted prompt


def user_spans(template: str, prompt: str, placeholder: str) -> tuple[str, Span, tuple[Span, ...]]:
    """template.format(prompt=prompt), the prompt's span in it, and the spans of the prompt's placeholders, in
    order (one per image; () if it has none)."""
    head = template.format(prompt="\0").split("\0")[0]
    keeps, at = [], prompt.find(placeholder) if placeholder else -1
    while at >= 0:
        keeps.append((len(head) + at, len(head) + at + len(placeholder)))
        at = prompt.find(placeholder, at + len(placeholder))
    return template.format(prompt=prompt), (len(head), len(head) + len(prompt)), tuple(keeps)


class ChatPrompt(str):
    """A rendered chat template (prunert.runtime.chat.ChatFormat.render): the prompt text itself, plus what its
    encoding needs. Pass it on unchanged: a str made from it (slicing, concatenation, .strip()) is a plain prompt
    again, which tokenize wraps in the manifest's prompt_template.

    user_spans:          [start, end) of each message text in it (typed special tokens there are text).
    query:               the user messages' text, joined by newlines: the content words of text relevance.
    add_special_tokens:  whether the tokenizer adds its own BOS (False where the template wrote it, as HF's
                         apply_chat_template(tokenize=True) does).
    images:              the messages' image parts (the template put one placeholder for each).
    """

    user_spans: tuple[Span, ...]
    query: str
    add_special_tokens: bool
    images: int

    def __new__(cls, text: str = "", user_spans: Sequence[Span] = (), query: str = "", add_special_tokens: bool = True,
                images: int = 1) -> "ChatPrompt":
        prompt = super().__new__(cls, text)
        prompt.user_spans, prompt.query, prompt.add_special_tokens = tuple(user_spans), query, add_special_tokens
        prompt.images = int(images)
        return prompt


def plain_text_runs(offsets: Sequence[Span], special: Sequence[bool], user: Span, keeps: Sequence[Span], length: int
                    ) -> list[int | Span] | None:
    """How to re-encode a prompt whose user text holds special tokens other than its placeholders.

    offsets, special: the text tokens of the formatted prompt (post-processor tokens left out) as the tokenizer
    found them with special-token parsing on, and which are special tokens. A special token is legitimate if it
    is the template's (outside `user`) or a placeholder's (inside one of `keeps`, user_spans'). None: every one is,
    the encoding stands. Else the runs that replace it, in order: the index of each legitimate special token, and
    between them (start, end) spans of the text to encode with special-token parsing off.
    """
    return text_runs(offsets, special, (user,), keeps, length)


def text_runs(offsets: Sequence[Span], special: Sequence[bool], users: Sequence[Span], keeps: Sequence[Span], length: int
              ) -> list[int | Span] | None:
    """plain_text_runs with several user spans (a chat's message texts): a special token inside any is typed text."""

    def legitimate(span: Span) -> bool:
        outside = all(span[1] <= user[0] or span[0] >= user[1] for user in users)
        return outside or any(keep[0] <= span[0] <= span[1] <= keep[1] for keep in keeps)

    if all(legitimate(span) for span, is_special in zip(offsets, special) if is_special):
        return None
    runs: list[int | Span] = []
    start = 0
    for index, (span, is_special) in enumerate(zip(offsets, special)):
        if is_special and legitimate(span):
            runs += [(start, span[0])] if span[0] > start else []
            runs.append(index)
            start = span[1]
    return runs + ([(start, length)] if length > start else [])


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: ids, and per token its word (None for special tokens) and character span."""

    ids: list[int]
    word_ids: list[Any]
    offsets: list[Span]


def encode_prompt(tokenizer: Any, prompt: str, placeholder: str, special_ids: set[int], template: str = "{prompt}",
                  add_special_tokens: bool = True) -> PromptTokens:
    """`template` formatted with `prompt`, tokenized (a `tokenizers.Tokenizer`) with the template's own special
    tokens and the prompt's `placeholder`s (one per image) as special tokens, and the rest of the prompt as plain text
    (plain_text_runs). A prompt without typed special tokens encodes exactly as tokenizer.encode(text).
    A ChatPrompt is already rendered: `template` is not applied, its user_spans are the user text and its
    add_special_tokens (ANDed with the argument) says whether the tokenizer adds BOS/EOS."""
    if isinstance(prompt, ChatPrompt):
        text, users, keeps = str(prompt), prompt.user_spans, ()  # its placeholders are the template's, outside users
        add_special_tokens = add_special_tokens and prompt.add_special_tokens
    else:
        text, user, keeps = user_spans(template, prompt, placeholder)
        users = (user,)
    encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids, words, offsets = encoding.ids, encoding.word_ids, encoding.offsets
    body = [i for i, sequence in enumerate(encoding.sequence_ids) if sequence is not None]  # BOS/EOS of the post-processor: None
    runs = text_runs([offsets[i] for i in body], [ids[i] in special_ids for i in body], users, keeps, len(text))
    if runs is None:
        return PromptTokens(list(ids), list(words), list(offsets))
    first, last = (body[0], body[-1] + 1) if body else (len(ids), len(ids))
    out = PromptTokens(list(ids[:first]), [None] * first, list(offsets[:first]))
    for number, run in enumerate(runs):
        if isinstance(run, int):
            out.ids.append(ids[body[run]]), out.word_ids.append(None), out.offsets.append(offsets[body[run]])
            continue
        piece = _encode_plain(tokenizer, text[run[0]:run[1]])
        out.ids.extend(piece.ids)
        out.word_ids.extend(None if word is None else (number, word) for word in piece.word_ids)
        out.offsets.extend((run[0] + a, run[0] + b) for a, b in piece.offsets)
    out.ids.extend(ids[last:]), out.word_ids.extend([None] * (len(ids) - last)), out.offsets.extend(offsets[last:])
    return out


def _encode_plain(tokenizer: Any, text: str) -> Any:
    """text with special-token parsing off (tokenizers' encode_special_tokens), no BOS/EOS."""
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode(text, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = False


def content_word_groups(tokenizer, prompt: str, special_ids: set[int], placeholder: str) -> list[list[int]]:
    """Token ids of each content word of `prompt`, in order. Special tokens typed in the prompt are text, as in
    encode_prompt (`Stop</s>dog` keeps `dog`); the artifact's `placeholder`s stay special and are no words.
    A ChatPrompt's words are those of its query (the user messages' text), not of the template around them."""
    prompt = prompt.query if isinstance(prompt, ChatPrompt) else prompt
    encoding = encode_prompt(tokenizer, prompt, placeholder, special_ids, add_special_tokens=False)
    groups: dict[Any, list[int]] = {}
    spans: dict[Any, list[int]] = {}
    dropped: set[Any] = set()
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
