"""evaluate_artifact on the tiny exported artifacts (random weights: the answers are garbage, so these test the
plumbing, scoring and errors; exact accuracies are computed from the predictions the artifact gives)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from prunert.errors import ConfigError, ImageError, PromptError
from prunert.evaluation import EvalConfig, evaluate_artifact, load_records, question_prompt
from prunert.evaluation.runner import Progress
from prunert.evaluation.scoring import exact_match


def _write(path: Path, shapes_set: Path, rows: list[dict]) -> Path:
    """A jsonl beside the shapes set's images (relative paths keep working)."""
    for row in rows:
        row["image"] = str(shapes_set.parent / row["image"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(shapes_set: Path) -> list[dict]:
    return [json.loads(line) for line in shapes_set.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_result(tiny_artifact: Path, shapes_set: Path):
    return evaluate_artifact(tiny_artifact, load_records(shapes_set), EvalConfig(batch=3), progress=False)


def test_one_prediction_per_record_in_order(tiny_result, shapes_set: Path, tiny_settings: dict) -> None:
    records = load_records(shapes_set)
    assert [p.line for p in tiny_result.predictions] == [r.line for r in records]
    assert [p.question for p in tiny_result.predictions] == [r.question for r in records]
    assert [p.answer for p in tiny_result.predictions] == [r.answers[0] for r in records]
    assert all(p.correct == exact_match(p.prediction, r.answers) for p, r in zip(tiny_result.predictions, records))
    assert (tiny_result.method, tiny_result.budget, tiny_result.precision, tiny_result.unpruned) == ("resprune", tiny_settings["budget"], "fp32", False)
    assert tiny_result.ttft_s > 0 and tiny_result.decode_tok_s > 0
    assert tiny_result.source.synthetic


def test_the_prompt_is_the_runs_prompt(tiny_pipeline, tiny_result, shapes_set: Path) -> None:
    """Each record answers as `prunert run --prompt "<image>\\n<question>"` (the family's template applied by the runtime)."""
    from prunert.config import GenerationConfig

    record = load_records(shapes_set)[0]
    prompt = question_prompt(tiny_pipeline.manifest.text.placeholder, record.question)
    assert prompt == f"<image>\n{record.question}"
    alone = tiny_pipeline.generate([record.image], [prompt], GenerationConfig(max_new_tokens=EvalConfig().max_new_tokens))[0]
    assert alone.text == tiny_result.predictions[0].prediction


def test_accuracy_is_exact_over_the_predictions(tiny_artifact: Path, tiny_result, shapes_set: Path, tmp_path: Path) -> None:
    """Records 1, 3, 5, 7 take the artifact's own answers as theirs: accuracy is 4/8, per category 1/2."""
    rows = _rows(shapes_set)
    for row, prediction in zip(rows, tiny_result.predictions):
        row["answer"] = prediction.prediction if prediction.line % 2 else "no such answer"
    records = load_records(_write(tmp_path / "q.jsonl", shapes_set, rows))
    result = evaluate_artifact(tiny_artifact, records, EvalConfig(batch=8), progress=False)
    assert [p.correct for p in result.predictions] == [True, False] * 4
    assert result.accuracy == 0.5
    assert {name: (c["n"], c["accuracy"]) for name, c in result.by_category.items()} == {
        "color_of_shape": (2, 1.0), "shape_of_color": (2, 0.0), "exists": (2, 1.0), "count": (2, 0.0)}


def test_a_batch_above_max_batch_is_chunked(tiny_artifact: Path, shapes_set: Path, tmp_path: Path) -> None:
    """--batch 1000 on an artifact of max_batch 8: batches of 8 and 3, the same answers as one record at a time."""
    rows = _rows(shapes_set)
    records = load_records(_write(tmp_path / "q.jsonl", shapes_set, rows + rows[:3]))
    big = evaluate_artifact(tiny_artifact, records, EvalConfig(batch=1000), progress=False)
    single = evaluate_artifact(tiny_artifact, records, EvalConfig(batch=1), progress=False)
    assert [p.prediction for p in big.predictions] == [p.prediction for p in single.predictions]
    assert len(big.predictions) == 11


def test_threads_reach_the_pipeline(monkeypatch, tiny_artifact: Path, shapes_set: Path) -> None:
    import prunert.runtime as runtime
    from prunert.config import GraphPrecisions, RuntimeConfig

    seen = {}

    class Spy(runtime.VLMPipeline):
        def __init__(self, artifact, backend="onnxruntime", precision="fp32", runtime=RuntimeConfig()):
            seen.update(backend=backend, runtime=runtime, precision=precision)
            super().__init__(artifact, backend=backend, precision=precision, runtime=runtime)

    monkeypatch.setattr(runtime, "VLMPipeline", Spy)
    result = evaluate_artifact(tiny_artifact, load_records(shapes_set, limit=1), EvalConfig(runtime=RuntimeConfig(threads=1)), progress=False)
    assert seen == {"backend": "onnxruntime", "runtime": RuntimeConfig(threads=1), "precision": GraphPrecisions()}
    assert result.to_json()["runtime"] == {"threads": 1, "spinning": False, "huge_pages": True}  # recorded in --out


def _no_generate(monkeypatch) -> None:
    from prunert.runtime.pipeline import VLMPipeline

    def fail(*args, **kwargs):
        raise AssertionError("generate ran before every prompt was checked")

    monkeypatch.setattr(VLMPipeline, "generate", fail)


@pytest.mark.parametrize("question, needle", [
    ("What color is " + "the very big circle " * 12 + "?", "tokens, expected at most 48"),
    ("<image> What color is the circle?", "contains the image placeholder '<image>' 2 times"),
])
def test_a_bad_question_names_its_line_before_any_batch(monkeypatch, tiny_artifact: Path, shapes_set: Path, tmp_path: Path,
                                                        question: str, needle: str) -> None:
    rows = _rows(shapes_set)
    rows[5]["question"] = question
    path = _write(tmp_path / "q.jsonl", shapes_set, rows)
    _no_generate(monkeypatch)
    with pytest.raises(PromptError) as caught:
        evaluate_artifact(tiny_artifact, load_records(path), EvalConfig(), progress=False)
    assert str(caught.value).startswith(f"{path} line 6: question: ") and needle in str(caught.value)


def test_an_unreadable_image_names_its_line(tiny_artifact: Path, shapes_set: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_text("not a png")
    rows = _rows(shapes_set)[:3]
    path = _write(tmp_path / "q.jsonl", shapes_set, rows)
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "broken.png"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ImageError) as caught:
        evaluate_artifact(tiny_artifact, load_records(path), EvalConfig(), progress=False)
    assert str(caught.value).startswith(f"{path} line 2: image '") and "broken.png" in str(caught.value)


def test_no_records_is_refused(tiny_artifact: Path) -> None:
    with pytest.raises(ConfigError, match="records: got none"):
        evaluate_artifact(tiny_artifact, [], EvalConfig(), progress=False)


@pytest.mark.parametrize("bad, needle", [
    ({"batch": 0}, "--batch: got 0"),
    ({"batch": 100_000}, "--batch: got 100000"),
    ({"max_new_tokens": 0}, "--max-new-tokens: got 0"),
    ({"backend": "cuda"}, "--backend 'cuda': unknown"),
    ({"precision": "fp64"}, "fp64"),
])
def test_eval_config_limits(bad: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        EvalConfig(**bad)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_on_a_terminal_only() -> None:
    terminal = _Terminal()
    bar = Progress("eval art", 4, stream=terminal, width=4)
    bar.advance(3)
    bar.advance(3)  # never past the total
    bar.close()
    bar.close()  # once
    frames = terminal.getvalue().split("\r")[1:]
    assert [f.split(" [")[0] for f in frames] == ["eval art 0/4", "eval art 3/4", "eval art 4/4"]
    assert "[###.]" in frames[1] and "[####]" in frames[2] and terminal.getvalue().endswith("\n")
    assert terminal.getvalue().count("\n") == 1
    quiet, disabled = io.StringIO(), _Terminal()
    Progress("eval art", 4, stream=quiet).advance(4)
    Progress("eval art", 4, enabled=False, stream=disabled).advance(4)
    assert quiet.getvalue() == "" and disabled.getvalue() == ""
