"""`prunert eval` from the command line: the table, the category breakdown, --out JSON in the order given, the
model note, no torch without --reference, and every bad input as one `prunert: error:` line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prunert import cli
from prunert.evaluation import EvalConfig, evaluate_artifact, load_records
from prunert.evaluation.report import OUT_KEYS


@pytest.fixture(scope="module")
def graded_set(tiny_unpruned: Path, shapes_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes set with the unpruned artifact's own answers as the expected ones: it scores 100%."""
    result = evaluate_artifact(tiny_unpruned, load_records(shapes_set), EvalConfig(), progress=False)
    path = tmp_path_factory.mktemp("graded") / "questions.jsonl"
    rows = [json.loads(line) for line in shapes_set.read_text().splitlines()]
    for row, prediction in zip(rows, result.predictions):
        row["image"] = str(shapes_set.parent / row["image"])
        row["answers"] = [prediction.prediction, "zzz"]
        del row["answer"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_prints_the_table_and_writes_the_json_in_order(prunert_main, tiny_artifact: Path, tiny_unpruned: Path, graded_set: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    code, stdout, err = prunert_main("eval", tiny_artifact, tiny_unpruned, "--data", graded_set, "--batch", "5", "--out", out)
    assert code == 0, err
    pruned = evaluate_artifact(tiny_artifact, load_records(graded_set), EvalConfig(batch=5), progress=False)
    lines = stdout.splitlines()
    assert lines[0].split()[:4] == ["artifact", "method", "K", "precision"]
    first, second = lines[1].split(), lines[2].split()
    assert first[:5] == [str(tiny_artifact), "resprune", "16", "fp32", f"{100 * pruned.accuracy:.1f}%"]
    assert first[8] == f"{pruned.accuracy:.3f}"  # relative to the unpruned artifact, which scores 100%
    assert second[:6] == [str(tiny_unpruned), "none", "100", "fp32", "100.0%", "(8/8)"] and second[8] == "1.000"
    assert "accuracy by category" in lines
    at = lines.index("accuracy by category")
    assert [line.split()[0] for line in lines[at + 2 : at + 6]] == ["color_of_shape", "shape_of_color", "exists", "count"]
    assert cli.SYNTHETIC_NOTE in lines and lines[-1] == f"results: {out}"
    data = json.loads(out.read_text())
    assert list(data) == ["artifacts"]
    assert [e["artifact"] for e in data["artifacts"]] == [str(tiny_artifact), str(tiny_unpruned)]
    assert data["artifacts"][0] == json.loads(json.dumps(pruned.to_json())) | {k: data["artifacts"][0][k] for k in ("ttft_s", "decode_tok_s")}
    code, _, err = prunert_main("eval", tiny_unpruned, tiny_artifact, "--data", graded_set, "--out", out)  # replaces its own file
    assert code == 0, err
    assert [e["artifact"] for e in json.loads(out.read_text())["artifacts"]] == [str(tiny_unpruned), str(tiny_artifact)]


def test_eval_needs_no_torch(python_without, tiny_artifact: Path, shapes_set: Path) -> None:
    done = python_without(
        """
        import sys
        from prunert.cli import main
        code = main(["eval", sys.argv[1], "--data", sys.argv[2], "--limit", "2"])
        assert_no_heavy_modules()
        sys.exit(code)
        """,
        tiny_artifact, shapes_set,
    )
    assert done.returncode == 0, done.stderr
    assert "resprune" in done.stdout


def _bad_jsonl(tmp_path: Path, shapes_set: Path, line: str) -> Path:
    rows = shapes_set.read_text().splitlines()
    rows = [json.dumps({**json.loads(r), "image": str(shapes_set.parent / json.loads(r)["image"])}) for r in rows]
    rows[6] = line
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("line, needle", [
    ('{"image": "x.png", "question": ', "line 7: not valid JSON"),
    (json.dumps({"image": "nowhere.png", "question": "q?", "answer": "red"}), "line 7: image 'nowhere.png'"),
    (json.dumps({"image": "nowhere.png", "answer": "red"}), "line 7: missing field 'question'"),
    (json.dumps({"image": "nowhere.png", "question": "q?", "answers": [1]}), "line 7: field 'answers'"),
])
def test_a_bad_record_is_one_error_line(prunert_main, error_line, tiny_artifact: Path, shapes_set: Path, tmp_path: Path, line: str,
                                        needle: str) -> None:
    path = _bad_jsonl(tmp_path, shapes_set, line)
    out = tmp_path / "results.json"
    code, stdout, err = prunert_main("eval", tiny_artifact, "--data", path, "--out", out)
    assert code == 2
    error_line(err, f"{path} {needle}")
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--limit", "0"], "--limit: got 0, expected >= 1"),
    (["--batch", "0"], "--batch: got 0"),
    (["--batch", "-4"], "--batch: got -4"),
    (["--threads", "-1"], "--threads: got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: got 0"),
    (["--backend", "gpu"], "--backend 'gpu': unknown"),
    (["--precision", "fp16"], "no fp16 graphs"),
    (["--model", "synthetic:llava-tiny"], "--model: applies to --reference hf only"),
])
def test_bad_flags_are_one_error_line(prunert_main, error_line, tiny_artifact: Path, shapes_set: Path, flags: list[str], needle: str) -> None:
    code, stdout, err = prunert_main("eval", tiny_artifact, "--data", shapes_set, *flags)
    assert code == 2
    error_line(err, needle)
    assert stdout == ""


def test_every_artifact_is_checked_before_the_first_runs(prunert_main, error_line, monkeypatch, tiny_artifact: Path, shapes_set: Path,
                                                         tmp_path: Path) -> None:
    import prunert.evaluation.command as command

    monkeypatch.setattr(command, "evaluate_artifact", lambda *a, **k: pytest.fail("an artifact ran before all were checked"))
    for missing, needle in ((tmp_path / "nope", "not a directory"), (shapes_set.parent, "no manifest.json")):
        code, _, err = prunert_main("eval", tiny_artifact, missing, "--data", shapes_set)
        assert code == 2
        error_line(err, f"artifact '{missing}'", needle)


def test_missing_data_is_one_error_line(prunert_main, error_line, tiny_artifact: Path, tmp_path: Path) -> None:
    code, _, err = prunert_main("eval", tiny_artifact, "--data", tmp_path / "questions.jsonl")
    assert code == 2
    error_line(err, f"--data '{tmp_path / 'questions.jsonl'}': no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = prunert_main("eval", tiny_artifact, "--data", empty)
    assert code == 2
    error_line(err, "holds no records")


def test_out_never_replaces_what_eval_did_not_write(prunert_main, error_line, monkeypatch, tiny_artifact: Path, shapes_set: Path,
                                                    tmp_path: Path) -> None:
    import prunert.evaluation.command as command

    monkeypatch.setattr(command, "evaluate_artifact", lambda *a, **k: pytest.fail("ran before --out was checked"))
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, needle in ((notes, "a file that is not a `prunert eval` results file"), (folder, "a directory"),
                        (tmp_path / "no" / "r.json", "its directory does not exist")):
        code, _, err = prunert_main("eval", tiny_artifact, "--data", shapes_set, "--out", out)
        assert code == 2
        error_line(err, f"--out '{out}'", needle)
    assert notes.read_text() == '{"mine": 1}' and folder.is_dir() and not any(folder.iterdir())
    assert OUT_KEYS == {"artifacts"}


def test_reference_needs_one_checkpoint(prunert_main, error_line, monkeypatch, tiny_artifact: Path, shapes_set: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["revision"] = "0123456789abcdef"  # exported from other weights
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = prunert_main("eval", tiny_artifact, other, "--data", shapes_set, "--reference", "hf")
    assert code == 2
    error_line(err, "--reference hf: the artifacts come from 2 checkpoints", "0123456789abcdef")
