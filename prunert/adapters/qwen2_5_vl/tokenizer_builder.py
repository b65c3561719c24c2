"""A small byte-level BPE tokenizer with Qwen2.5-VL's special tokens, trained locally.

Same recipe and corpus as the LLaVA builder (`prunert.adapters.llava.tokenizer_builder`, whose
BPE training and filler padding are reused), with Qwen's conventions: no BOS is prepended,
`<|endoftext|>` pads, `<|im_end|>` ends a turn, and the vision tokens are added special tokens.
Ids are fixed: the special tokens first, in SPECIAL_TOKENS order, then bytes, merges and fillers.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from prunert.adapters.llava.tokenizer_builder import (
    FILLER_TEMPLATE,
    _pad_with_fillers,
    _special,
    num_trained_tokens,
    train_bpe,
)
from prunert.adapters.qwen2_5_vl import ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START
from prunert.errors import ConfigError

VISION_PAD = "<|vision_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

__all__ = ["SPECIAL_TOKENS", "FILLER_TEMPLATE", "build_tokenizer", "num_trained_tokens"]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A deterministic byte-level BPE tokenizer with exactly `vocab_size` ids and Qwen's special tokens."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"tokenizer vocab_size: got {vocab_size}, expected >= {MIN_VOCAB_SIZE}")
    tokenizer = train_bpe(vocab_size, SPECIAL_TOKENS)
    tokenizer = _pad_with_fillers(tokenizer, vocab_size)
    tokenizer.add_special_tokens([_special(token) for token in SPECIAL_TOKENS])
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"tokenizer layout: {token!r} has id {tokenizer.token_to_id(token)}, expected {expected_id}")
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer layout: {tokenizer.get_vocab_size(with_added_tokens=True)} ids, expected {vocab_size}")
    return tokenizer
