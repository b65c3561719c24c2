"""`prunert sweep`: every (method, K) exported and evaluated, the unpruned baseline first, sweep.json / sweep.md /
two plots written, a rerun reusing what it exported, and bad input as one `prunert: error:` line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunert.config import ExportConfig
from prunert.evaluation import EvalConfig, load_records
from prunert.evaluation.sweep import MARKER, grid, run_sweep

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, shapes_set: Path, tiny_settings: dict, prunert_cache: Path):
    out = tmp_path_factory.mktemp("sweep") / "run"
    export_cfg = ExportConfig(max_prompt_tokens=tiny_settings["max_prompt_tokens"], max_new_tokens=tiny_settings["max_new_tokens"])
    logs: list[str] = []
    results = run_sweep(tiny_settings["model"], grid(["uniform"], [8, 12]), load_records(shapes_set), out, EvalConfig(),
                        export_cfg, log=logs.append, progress=False)
    return out, results, logs, export_cfg


def test_sweep_writes_the_table_json_and_plots_baseline_first(swept, tiny_settings: dict) -> None:
    out, results, logs, _ = swept
    payload = json.loads((out / "sweep.json").read_text())
    names = [p["name"] for p in payload["points"]]
    assert names == [f"none-k{tiny_settings['num_visual_tokens']}", "uniform-k8", "uniform-k12"]
    assert [p["budget"] for p in payload["points"]] == [tiny_settings["num_visual_tokens"], 8, 12]
    first = payload["points"][0]
    assert first["relative"] is None and set(first) >= {"accuracy", "ci95", "by_category", "ttft_s", "decode_tok_s", "params"}
    assert payload["questions"] == 8
    for point, result in zip(payload["points"], results):
        assert point["accuracy"] == result.result.accuracy
        assert Path(point["artifact"]).is_dir() and Path(point["artifact"]).parent == out / "artifacts"
    table = (out / "sweep.md").read_text()
    assert "| method | K=8 | K=12 |" in table and "| uniform |" in table
    for name in ("accuracy_vs_k.png", "accuracy_vs_ttft.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reuses_the_exported_artifacts(swept, shapes_set: Path, tiny_settings: dict) -> None:
    out, _, _, export_cfg = swept
    manifest = out / "artifacts" / "uniform-k8" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    logs: list[str] = []
    run_sweep(tiny_settings["model"], grid(["uniform"], [8]), load_records(shapes_set, 2), out, EvalConfig(), export_cfg,
              log=logs.append, progress=False)
    assert sum(line.startswith("reusing") for line in logs) == 2 and not any(line.startswith("wrote") for line in logs)
    assert manifest.stat().st_mtime_ns == before


@pytest.mark.parametrize("flags, needle", [
    (["--budgets", "8,,16"], "--budgets"),
    (["--budgets", "eight"], "--budgets"),
    (["--budgets", "0,8"], "--budgets"),
    (["--budgets", "8,8"], "--budgets"),
    (["--methods", "resprune,nope"], "nope"),
    (["--limit", "0"], "--limit"),
])
def test_bad_flags_are_one_line_before_any_export(prunert_main, tmp_path: Path, shapes_set: Path, error_line, flags, needle) -> None:
    out = tmp_path / "sweep"
    code, _, err = prunert_main("sweep", "--model", "synthetic:llava-tiny", "--data", shapes_set, "--out", out, *flags)
    assert code == 2
    assert needle in error_line(err)
    assert not out.exists()


def test_a_budget_the_model_cannot_give_is_refused_before_any_export(prunert_main, tmp_path: Path, shapes_set: Path, error_line) -> None:
    out = tmp_path / "sweep"
    code, _, err = prunert_main("sweep", "--model", "synthetic:llava-tiny", "--methods", "uniform", "--budgets", "8,100",
                      "--data", shapes_set, "--out", out)
    assert code == 2 and "budget" in error_line(err)
    assert not out.exists()


def test_bad_data_is_refused_before_any_export(prunert_main, tmp_path: Path, error_line) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n')
    out = tmp_path / "sweep"
    code, _, err = prunert_main("sweep", "--model", "synthetic:llava-tiny", "--data", data, "--out", out)
    assert code == 2 and "line 1" in error_line(err)
    assert not out.exists()


def test_out_that_is_not_a_sweep_folder_is_never_written(prunert_main, tmp_path: Path, shapes_set: Path, error_line) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = prunert_main("sweep", "--model", "synthetic:llava-tiny", "--methods", "uniform", "--budgets", "8",
                      "--data", shapes_set, "--out", out)
    assert code == 2 and MARKER in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    file_out = tmp_path / "file"
    file_out.write_text("x")
    code, _, err = prunert_main("sweep", "--model", "synthetic:llava-tiny", "--data", shapes_set, "--out", file_out)
    assert code == 2 and "not a directory" in error_line(err) and file_out.read_text() == "x"
