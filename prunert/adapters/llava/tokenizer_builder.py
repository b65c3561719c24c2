"""A small byte-level BPE tokenizer for synthetic LLaVA checkpoints, trained locally.

The tokenizer is trained on a few KB of built-in English (`prunert/data/corpus.txt`), so building
it needs no network and gives the same `tokenizer.json` on every run. Ids of the special tokens
are fixed, like Llama's: `<unk>`=0, `<s>`=1 (BOS), `</s>`=2 (EOS), then `<pad>`=3 and `<image>`=4.
If training stops short of `vocab_size` (a small corpus runs out of merges), filler tokens
`<extra_0>`, `<extra_1>`, ... pad the vocabulary so that every id in [0, vocab_size) exists.
"""

from __future__ import annotations

import json
from importlib import resources

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from prunert.errors import ConfigError

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
# Order defines the ids: the BPE trainer puts special tokens first, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
FILLER_TEMPLATE = "<extra_{}>"
CORPUS_RESOURCE = "corpus.txt"  # in the prunert/data package-data directory
# Byte alphabet (256) + the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def load_corpus() -> list[str]:
    """The built-in training corpus, one sentence or Q/A turn per line (blank lines dropped)."""
    text = resources.files("prunert").joinpath("data", CORPUS_RESOURCE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int, extra_lines: tuple[str, ...] = ()) -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer whose vocabulary has exactly `vocab_size` ids.
    `extra_lines` are trained on after the built-in corpus (a task's own words, so they become whole tokens).

    Encoding prepends BOS (id 1) like Llama's tokenizer; `<image>` is an added special token, so it
    encodes to one id wherever it appears in text. Decoding round-trips plain ASCII text.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"tokenizer vocab_size: got {vocab_size}, expected >= {MIN_VOCAB_SIZE}")
    tokenizer = train_bpe(vocab_size, SPECIAL_TOKENS, UNK_TOKEN, extra_lines)
    tokenizer = _pad_with_fillers(tokenizer, vocab_size)
    tokenizer.add_special_tokens([_special(token) for token in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
    )
    _check_layout(tokenizer, vocab_size)
    return tokenizer


def train_bpe(vocab_size: int, special_tokens: tuple[str, ...], unk_token: str | None = None,
              extra_lines: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE trained on the built-in corpus; specials get ids 0..len(special_tokens)-1. Every
    family's synthetic tokenizer (Qwen2.5-VL's: its own specials, no unk token)."""
    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    # No prefix space: the decoder then gives back exactly the encoded text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # `<image>` lines are BPE-trained as plain text too; harmless, as the added token wins at encode.
    tokenizer.train_from_iterator(load_corpus() + list(extra_lines), trainer=trainer)
    return tokenizer


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)


def _pad_with_fillers(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """Append `<extra_i>` entries to the BPE vocabulary until it has exactly `vocab_size` ids.

    Fillers live in the model vocabulary (no merge produces them), not in the added-token list:
    tens of thousands of added tokens would slow every encode and every `AutoTokenizer` load.
    They decode to their literal text, e.g. `<extra_7>`, so a random model that picks one still
    prints something visible.
    """
    first_id = tokenizer.get_vocab_size(with_added_tokens=True)
    if first_id >= vocab_size:
        return tokenizer
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for offset in range(vocab_size - first_id):
        vocab[FILLER_TEMPLATE.format(offset)] = first_id + offset
    return Tokenizer.from_str(json.dumps(spec))


def num_trained_tokens(tokenizer: Tokenizer) -> int:
    """How many leading ids are real tokens (specials, bytes, merges); the ids after are fillers."""
    first_filler = tokenizer.token_to_id(FILLER_TEMPLATE.format(0))
    return tokenizer.get_vocab_size(with_added_tokens=True) if first_filler is None else first_filler


def _check_layout(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Fail loudly if the id layout is not the documented one (a tokenizers behaviour change)."""
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            got = tokenizer.token_to_id(token)
            raise RuntimeError(f"tokenizer layout: {token!r} has id {got}, expected {expected_id}")
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(
            f"tokenizer layout: vocab has {tokenizer.get_vocab_size(with_added_tokens=True)} ids, expected {vocab_size}"
        )
    ids = sorted(tokenizer.get_vocab(with_added_tokens=True).values())
    if ids != list(range(vocab_size)):
        raise RuntimeError("tokenizer layout: ids are not contiguous from 0")
