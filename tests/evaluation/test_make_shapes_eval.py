"""bench/make_shapes_eval.py: a thin wrapper over prunert.shapes.dataset.write_eval_set that prints the jsonl path."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunert.evaluation import load_records

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "make_shapes_eval.py"


@pytest.fixture(scope="module")
def script(load_module):
    return load_module("prunert_bench_make_shapes_eval", SCRIPT)


def test_writes_a_set_prunert_eval_reads(script, capsys, tmp_path: Path) -> None:
    from prunert.shapes.dataset import write_eval_set

    assert script.main(["--out", str(tmp_path / "set"), "--count", "4", "--seed", "5"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "set" / "questions.jsonl"
    assert [r.question for r in load_records(path)] == [r.question for r in load_records(write_eval_set(tmp_path / "same", 4, 5))]
    assert script.main(["--out", str(tmp_path / "set"), "--count", "2", "--seed", "5", "--overwrite"]) == 0
    assert len(load_records(path)) == 2


@pytest.mark.parametrize("flags, needle", [
    (["--count", "0"], "--count: got 0"),
    (["--seed", "-1"], "--seed: got -1"),  # numpy's SeedSequence ValueError traceback otherwise
])
def test_bad_numbers_are_one_error_line(script, capsys, error_line, tmp_path: Path, flags: list[str], needle: str) -> None:
    assert script.main(["--out", str(tmp_path / "set"), *flags]) == 2
    error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "set").exists()


def test_an_existing_set_needs_overwrite(script, capsys, error_line, tmp_path: Path) -> None:
    assert script.main(["--out", str(tmp_path / "set"), "--count", "1"]) == 0
    capsys.readouterr()
    assert script.main(["--out", str(tmp_path / "set"), "--count", "1"]) == 2
    error_line(capsys.readouterr().err, "already exists", "--overwrite")
