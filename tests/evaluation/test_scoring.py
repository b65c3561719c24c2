"""VQA-style normalisation, exact match and the 95% Wilson interval (prunert.evaluation.scoring)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from prunert.evaluation.scoring import Z95, exact_match, normalize_answer, wilson_interval


@pytest.mark.parametrize(
    "text, normal",
    [
        ("Two.", "2"),
        ("two", "2"),
        ("2", "2"),
        ("  RED ", "red"),
        ("The red circle!", "red circle"),
        ("a square", "square"),
        ("an apple", "apple"),
        ("Yes, it is.", "yes it is"),
        ("twenty", "20"),
        ("zero", "0"),
        ("1.5", "1.5"),
        ("1,000", "1000"),
        ("don't", "dont"),
        ("red-green", "red green"),
        ("theory", "theory"),  # an article only as a whole word
        ("\tblue\n", "blue"),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


@pytest.mark.parametrize(
    "prediction, answers, correct",
    [
        ("Two.", ("2",), True),
        ("3", ("three",), True),
        ("The Circle", ("circle",), True),
        ("circles", ("circle",), False),
        ("red circle", ("red",), False),  # exact match, not containment
        ("blue", ("red", "blue"), True),  # any of several answers
        ("", ("no",), False),
    ],
)
def test_exact_match(prediction: str, answers: tuple[str, ...], correct: bool) -> None:
    assert exact_match(prediction, answers) is correct


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    z = norm.ppf(0.975)
    p = k / n
    root = math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return ((p + z**2 / (2 * n) - z * root) / (1 + z**2 / n), (p + z**2 / (2 * n) + z * root) / (1 + z**2 / n))


def test_wilson_matches_the_hand_computed_interval() -> None:
    assert Z95 == pytest.approx(norm.ppf(0.975), abs=1e-12)
    assert wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)  # the textbook 7/10 value
    for k, n in ((0, 8), (8, 8), (3, 8), (512, 1000), (1, 1)):
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)


def test_wilson_edges() -> None:
    lo, hi = wilson_interval(0, 8)
    assert lo == 0.0 and 0 < hi < 1
    lo, hi = wilson_interval(8, 8)
    assert 0 < lo < 1 and hi == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
