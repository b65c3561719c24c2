"""Results, tables and the --out JSON layout (prunert.evaluation.report), on hand-made predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunert.evaluation import ArtifactResult, Prediction
from prunert.evaluation.report import category_table, results_json, results_table, unpruned_baseline, write_results
from prunert.evaluation.scoring import wilson_interval

ENTRY_KEYS = ["artifact", "method", "budget", "precision", "accuracy", "ci95", "by_category", "ttft_s", "decode_tok_s", "predictions"]
PREDICTION_KEYS = ["line", "question", "answer", "prediction", "correct"]


def _result(name: str, method: str, budget: int, hits: list[bool], categories: list[str | None], unpruned: bool = False,
            ttft: float | None = 0.012, tok_s: float | None = 250.0) -> ArtifactResult:
    predictions = tuple(Prediction(i + 1, f"q{i}", "red", "red" if hit else "blue", hit, category)
                        for i, (hit, category) in enumerate(zip(hits, categories)))
    return ArtifactResult(name, method, budget, "fp32", unpruned, predictions, ttft, tok_s)


CATS = ["color", "count", "color", "count", "color", None]


def test_accuracy_interval_and_categories() -> None:
    r = _result("a", "resprune", 16, [True, False, True, True, False, True], CATS)
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.ci95 == wilson_interval(4, 6)
    assert r.by_category == {  # first-appearance order; the record without a category is left out
        "color": {"accuracy": pytest.approx(2 / 3), "n": 3, "ci95": list(wilson_interval(2, 3))},
        "count": {"accuracy": 0.5, "n": 2, "ci95": list(wilson_interval(1, 2))},
    }
    assert list(r.by_category) == ["color", "count"]


def test_the_json_layout_is_the_issues(tmp_path: Path) -> None:
    results = [_result("pruned", "uniform", 16, [True, False] * 3, CATS), _result("full", "none", 100, [True] * 6, CATS, unpruned=True)]
    path = tmp_path / "results.json"
    write_results(path, results)
    data = json.loads(path.read_text())
    assert list(data) == ["artifacts"]
    assert [entry["artifact"] for entry in data["artifacts"]] == ["pruned", "full"]  # the order given
    for entry, result in zip(data["artifacts"], results):
        assert list(entry) == ENTRY_KEYS
        assert entry == {"artifact": result.artifact, "method": result.method, "budget": result.budget, "precision": "fp32",
                         "accuracy": result.accuracy, "ci95": list(result.ci95), "by_category": result.by_category,
                         "ttft_s": 0.012, "decode_tok_s": 250.0, "predictions": entry["predictions"]}
        assert [list(p) for p in entry["predictions"]] == [PREDICTION_KEYS] * 6
        assert entry["predictions"][1] == {"line": 2, "question": "q1", "answer": "red", "prediction": result.predictions[1].prediction,
                                           "correct": result.predictions[1].correct}
    reference = _result("hf:m", "none", 100, [True] * 6, CATS, unpruned=True, ttft=None, tok_s=None)
    with_reference = results_json(results, reference)
    assert list(with_reference) == ["artifacts", "reference"] and list(with_reference["reference"]) == ENTRY_KEYS
    assert with_reference["reference"]["ttft_s"] is None


def test_the_table_has_one_row_per_artifact_and_relative_accuracy() -> None:
    pruned = _result("art/k16", "resprune", 16, [True, True, True, False, False, False], CATS)
    full = _result("art/none", "none", 100, [True, True, True, True, False, False], CATS, unpruned=True)
    reference = _result("hf:m", "none", 100, [True] * 4 + [False] * 2, CATS, unpruned=True, ttft=None, tok_s=None)
    lines = results_table([pruned, full], reference).splitlines()
    assert lines[0].split() == ["artifact", "method", "K", "precision", "accuracy", "95%", "CI", "vs", "unpruned", "TTFT", "ms", "tok/s"]
    lo, hi = wilson_interval(3, 6)
    assert lines[1].split() == ["art/k16", "resprune", "16", "fp32", "50.0%", "(3/6)", f"[{100 * lo:.1f},", f"{100 * hi:.1f}]",
                                "0.750", "12.0", "250.0"]
    assert lines[2].split()[:6] == ["art/none", "none", "100", "fp32", "66.7%", "(4/6)"] and lines[2].split()[-3:] == ["1.000", "12.0", "250.0"]
    assert lines[3].split()[0] == "hf:m" and lines[3].split()[-3:] == ["1.000", "-", "-"]
    assert len(lines) == 4


def test_without_an_unpruned_artifact_there_is_no_relative_accuracy() -> None:
    a, b = _result("a", "resprune", 16, [True] * 6, CATS), _result("b", "uniform", 16, [False] * 6, CATS)
    assert unpruned_baseline([a, b]) is None
    assert all(line.split()[-3] == "-" for line in results_table([a, b]).splitlines()[1:])


def test_the_first_unpruned_artifact_is_the_baseline() -> None:
    a = _result("a", "resprune", 16, [True] * 6, CATS)
    b, c = _result("b", "none", 100, [True, False] * 3, CATS, unpruned=True), _result("c", "none", 100, [False] * 6, CATS, unpruned=True)
    assert unpruned_baseline([a, b, c]) is b
    assert a.relative_to(b) == 2.0 and a.relative_to(c) is None  # a baseline at 0% gives no ratio


def test_the_category_table() -> None:
    a = _result("a", "resprune", 16, [True, False, True, True, False, True], CATS)
    b = _result("b", "none", 100, [False] * 6, CATS, unpruned=True)
    lines = category_table([a, b]).splitlines()
    assert [line.split() for line in lines] == [["category", "n", "#1", "#2"], ["color", "3", "66.7%", "0.0%"],
                                                 ["count", "2", "50.0%", "0.0%"], ["#1:", "a"], ["#2:", "b"]]
    assert category_table([_result("x", "none", 100, [True] * 2, [None, None])]) == ""
