"""`synthetic:llava-shapes`: the shapes of the LLaVA-1.5 model trained on the shapes scenes, its tokenizer and prompts.

168/14 CLIP tower (144 visual tokens, read at the last layer, [CLS] dropped), a 2-layer MLP projector and a
3-layer Llama decoder. The tokenizer is the synthetic byte-level BPE, also trained on the shapes questions so
that every answer word is one token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunert.adapters.llava import LLAVA_PROMPT_TEMPLATE
from prunert.adapters.llava.synthetic import PRESETS
from prunert.shapes.scenes import ANSWERS, COLOR_NAMES, SHAPES

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PRESET_NAME = "llava-shapes"
PRESET = PRESETS[PRESET_NAME]
TOKENIZER_REPEATS = 20  # how often the shapes vocabulary is seen by BPE training (beats the corpus's words)


def all_questions() -> list[str]:
    """Every question the four templates can ask."""
    return ([f"What color is the {s}?" for s in SHAPES] + [f"What shape is the {c} object?" for c in COLOR_NAMES]
            + [f"Is there a {c} {s}?" for c in COLOR_NAMES for s in SHAPES] + ["How many objects are there?"])


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt of a question, `<image>` first, as `prunert run` / `prunert eval` build it."""
    return LLAVA_PROMPT_TEMPLATE.format(prompt=f"<image>\n{question}")


def tokenizer_lines() -> tuple[str, ...]:
    lines = [f"{prompt(q)} {a}" for q in all_questions() for a in ANSWERS]
    return tuple(lines) * TOKENIZER_REPEATS


def build_shapes_tokenizer() -> Tokenizer:
    from prunert.adapters.llava.tokenizer_builder import build_tokenizer

    tokenizer = build_tokenizer(PRESET.vocab_size, tokenizer_lines())
    for answer in ANSWERS:
        ids = tokenizer.encode(f" {answer}", add_special_tokens=False).ids
        if len(ids) != 1:
            raise RuntimeError(f"shapes tokenizer: answer {answer!r} is {len(ids)} tokens, expected 1")
    return tokenizer

