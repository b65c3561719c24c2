"""bench/bench_selection.py (issue 14, selection at large N): its NumPy float32 greedy is the ops' definition (the
float64 references' sets on well-separated inputs), and one smoke run (ResPrune, N = 24 and 32, d = 8, one round)
writes the JSON report with both forms, the same set in all three runners, and the crossover summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_module):
    return load_module("prunert_bench_selection", REPO / "bench" / "bench_selection.py")


@pytest.mark.parametrize("method", ["resprune", "cdpruner"])
def test_numpy_greedy_keeps_the_reference_sets(bench, method: str) -> None:
    from prunert import pruning_ops
    from prunert.config import BudgetConfig

    for seed in range(6):
        feeds = bench.inputs(40, 16, seed)
        tokens, text = feeds["tokens"][0], feeds["text"][0]
        want, _ = pruning_ops.select_reference({"tokens": tokens, "text": text, "text_mask": feeds["text_mask"][0]},
                                               BudgetConfig(budget=8, method=method))
        assert bench.numpy_greedy(tokens, text, 8, method).tolist() == want.tolist(), seed


def test_smoke_run_writes_both_forms(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "selection.json"
    code = bench.main(["--n", "32", "--sweep", "24", "--d", "8", "--k", "4", "--methods", "resprune", "--rounds", "1", "--share-n", "",
                       "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(r["method"], r["n"]) for r in report["rows"]] == [("resprune", 24), ("resprune", 32)]
    for row in report["rows"]:
        assert row["same_set"] and set(row["median_ms"]) == {"numpy", "gram", "rows"}
        assert set(row["ratio_vs_numpy"]) == {"gram", "rows"} and len(row["runs_ms"]["rows"]) == 1
    assert set(report["crossover"]["resprune"]) >= {"largest_gram_faster", "smallest_rows_faster"}
    assert report["threads"] == 1 and np.isfinite(report["probe_ms"]["max_over_min"])
    assert "| resprune | 32 |" in capsys.readouterr().out
