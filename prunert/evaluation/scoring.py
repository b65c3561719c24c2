"""Scoring: VQA-style answer normalisation, exact match, and the 95% Wilson score interval (stdlib only).

Normalisation, after the VQA evaluation script: lower case; periods dropped unless inside a number (1.5) and
commas inside numbers (1,000); apostrophes dropped; any other punctuation a space; the articles a/an/the
dropped; number words (VQA's none/zero..ten, and up to twenty) written as digits. So "Two." == "2" and
"The red circle!" == "red circle". A prediction is correct when its normal form equals any answer's.
"""

from __future__ import annotations

import math
import re

Z95 = 1.959963984540054  # standard normal 0.975 quantile
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
} | {"none": "0"}
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period not between two digits
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")


def normalize_answer(text: str) -> str:
    """The normal form two answers are compared in (module docstring)."""
    text = _NUMBER_COMMA.sub("", _PERIOD.sub("", text.lower())).replace("'", "")
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> bool:
    """The prediction's normal form equals one of the answers'."""
    return normalize_answer(prediction) in {normalize_answer(answer) for answer in answers}


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/total (default 95%); (0, 1) when total is 0."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    scale = 1 + z * z / total
    center = (p + z * z / (2 * total)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (max(0.0, center - half), min(1.0, center + half))
