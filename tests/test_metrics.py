"""prunert.metrics: the one set of comparisons parity, precision validation and calibration drift report, and
those three now agree, a zero vector included (parity said 0.0 where drift and precision said 1.0)."""

from __future__ import annotations

import numpy as np
import pytest

from prunert import metrics
from prunert.calibration.drift import sample_drift
from prunert.export.precision import _same_index_cosine
from prunert.parity.report import ParityReport


def test_cosine_of_zero_vectors_is_defined() -> None:
    zero, other = np.zeros(4), np.array([0.0, 2.0, 0.0, 1.0])
    assert metrics.cosine(zero, zero) == 1.0  # identical: nothing differs
    assert metrics.cosine(zero, other) == 0.0 and metrics.cosine(other, zero) == 0.0  # no shared direction
    assert metrics.cosine(np.zeros(0), np.zeros(0)) == 1.0  # empty: a zero vector too
    per_token = metrics.token_cosines(np.stack([zero, zero, other]), np.stack([zero, other, other]))
    assert per_token[:2].tolist() == [1.0, 0.0] and per_token[2] == pytest.approx(1.0, abs=1e-15)


def test_cosine_is_scale_free_and_bounded() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(64)
    for scale in (1e-300, 1e-160, 1.0, 1e160, 1e300):  # the norms of these under- or overflow float64
        assert metrics.cosine(a * scale, a * scale) == pytest.approx(1.0, abs=1e-15)
        assert metrics.cosine(a * scale, -a) == pytest.approx(-1.0, abs=1e-15)
    assert -1.0 <= metrics.cosine(a, a + 1e-9) <= 1.0
    assert np.isnan(metrics.cosine(np.array([np.nan, 1.0]), np.ones(2)))
    assert np.isnan(metrics.cosine(np.array([np.inf, 1.0]), np.ones(2)))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.cosine(np.ones(3), np.ones(4))


def test_max_abs_overlap_rows_and_kl() -> None:
    assert metrics.max_abs_diff(np.array([1.0, -2.0]), np.array([1.5, 1.0])) == 3.0
    assert metrics.max_abs_diff(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    assert metrics.kept_overlap(np.array([1, 4, 7, 9]), np.array([9, 2, 4, 8])) == 0.5
    assert metrics.kept_overlap(np.array([], int), np.array([], int)) == 1.0 and metrics.kept_overlap(np.array([], int), np.array([3])) == 0.0
    rows_a, rows_b = metrics.common_rows(np.array([1, 4, 7, 9]), np.array([9, 2, 4, 8]))  # either side in any order
    assert rows_a.tolist() == [1, 3] and rows_b.tolist() == [2, 0]
    logits = np.array([1.0, 2.0, 3.0])
    assert metrics.kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-15)
    assert metrics.kl_divergence(logits, logits + 5.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-free
    assert metrics.kl_divergence(logits, logits[::-1]) > 0


def test_matched_token_cosine_compares_the_same_original_tokens() -> None:
    tokens = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # tokens of original indices 2, 5, 8
    assert metrics.matched_token_cosine(np.array([2, 5, 8]), tokens, np.array([5, 8]), tokens[1:]) == pytest.approx(1.0, abs=1e-15)
    shifted = metrics.matched_token_cosine(np.array([2, 5, 8]), tokens, np.array([3, 5, 8]), np.array([[9.0, -9.0], *tokens[1:]]))
    assert shifted == pytest.approx(1.0, abs=1e-15)  # 3 replaced 2: the rest still match row for row by index, not by position
    assert metrics.matched_token_cosine(np.array([2]), tokens[:1], np.array([3]), tokens[:1]) is None


def _drift(tokens_a: np.ndarray, tokens_b: np.ndarray, logits_a: np.ndarray, logits_b: np.ndarray):
    kept = np.arange(len(tokens_a))
    return sample_drift("img", "p", (kept, tokens_a, logits_a, [1], None), (kept, tokens_b, logits_b, [1], None), logits_b)


@pytest.mark.parametrize("zero_side", ["both", "one"])
def test_parity_drift_and_precision_agree_on_zero_vectors(zero_side: str) -> None:
    """All-zero visual tokens (e.g. a dead vision tower): the same cosine from parity's report, drift's sample and
    precision validation's same-index cosine. Before, parity reported 0.0 (FAIL) for two zero vectors, drift 1.0."""
    zero = np.zeros((1, 3, 4), np.float32)
    other = zero if zero_side == "both" else np.ones((1, 3, 4), np.float32)
    expected = 1.0 if zero_side == "both" else 0.0
    report = ParityReport("a", "s", True, "onnxruntime", "fp32", {}, "i", "p")
    report.add_cosine("kept tokens", zero, other, 0.99)
    report.add_cosine("prefill logits", zero[0, 0], other[0, 0], 0.99)
    assert [c.value for c in report.checks] == [expected, expected]
    assert report.passed == (zero_side == "both")
    drift = _drift(zero[0], other[0], zero[0, 0], other[0, 0])
    assert drift.token_cosine == expected and drift.logits_cosine == expected
    kept = np.arange(3)[None]
    assert _same_index_cosine(zero, other, kept, kept) == expected


def test_parity_and_drift_agree_on_ordinary_tokens() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 5, 8)).astype(np.float32)
    b = a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
    report = ParityReport("a", "s", True, "onnxruntime", "fp32", {}, "i", "p")
    report.add_cosine("prefill logits", a[0, 0], b[0, 0], 0.0)
    report.add_max_abs("prefill logits", a[0, 0], b[0, 0], None)
    drift = _drift(a[0], b[0], a[0, 0].astype(np.float64), b[0, 0].astype(np.float64))
    assert drift.logits_cosine == pytest.approx(report.checks[0].value, rel=1e-5)  # drift rounds to 6 digits
    assert report.checks[1].value == metrics.max_abs_diff(a[0, 0], b[0, 0])
    assert drift.token_cosine == pytest.approx(float(metrics.token_cosines(a[0], b[0]).mean()), rel=1e-5)
    kept = np.arange(5)[None]
    assert _same_index_cosine(a, b, kept, kept) == pytest.approx(drift.token_cosine, rel=1e-5)


def test_metrics_and_the_decode_loop_need_neither_torch_nor_transformers(python_without) -> None:
    result = python_without(
        """
        import numpy as np
        from prunert import metrics
        from prunert.runtime import decode
        assert metrics.cosine(np.zeros(3), np.zeros(3)) == 1.0 and decode.greedy(np.eye(3)).tolist() == [0, 1, 2]
        assert_no_heavy_modules()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
