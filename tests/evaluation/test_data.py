"""JSONL records (prunert.evaluation.data.load_records): the format, --limit, and every bad record named by its line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prunert.errors import ConfigError
from prunert.evaluation import EvalRecord, load_records


def test_a_shapes_set_loads(shapes_set: Path) -> None:
    records = load_records(shapes_set)
    lines = shapes_set.read_text().splitlines()
    assert [r.line for r in records] == list(range(1, len(lines) + 1))
    for record, line in zip(records, lines):
        data = json.loads(line)
        assert record == EvalRecord(record.line, shapes_set.parent / data["image"], data["question"], (data["answer"],),
                                    data["category"], str(shapes_set))
        assert record.image.is_file()
    assert [r.category for r in records[:4]] == ["color_of_shape", "shape_of_color", "exists", "count"]


def test_limit_reads_the_first_records(shapes_set: Path) -> None:
    assert [r.line for r in load_records(shapes_set, limit=3)] == [1, 2, 3]
    assert len(load_records(shapes_set, limit=1000)) == len(shapes_set.read_text().splitlines())


def _jsonl(tmp_path: Path, *lines: str) -> Path:
    (tmp_path / "img.png").write_bytes(b"")  # existence is all load_records checks; the runtime decodes it
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"image": "img.png", "question": "What color is the circle?", "answer": "red"})


def test_answers_category_absolute_paths_and_blank_lines(tmp_path: Path) -> None:
    absolute = str(tmp_path / "img.png")
    path = _jsonl(tmp_path, "", json.dumps({"image": absolute, "question": "q?", "answer": "two", "answers": ["2", "two", "a pair"]}),
                  "   ", json.dumps({"image": "img.png", "question": "q2?", "answers": ["yes"], "category": "exists"}))
    first, second = load_records(path)
    assert (first.line, first.image, first.answers, first.category) == (2, tmp_path / "img.png", ("two", "2", "a pair"), None)
    assert (second.line, second.answers, second.category) == (4, ("yes",), "exists")
    assert second.where == f"{path} line 4"


def test_relative_images_are_read_from_the_jsonl_directory(tmp_path: Path, monkeypatch) -> None:
    path = _jsonl(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path.parent)  # not the jsonl's directory
    assert load_records(path)[0].image == tmp_path / "img.png"


BAD_RECORDS = [
    # (line 2's text, what the one-line message must name)
    ("{not json", "not valid JSON"),
    ('["image", "question"]', "got a JSON list, expected an object"),
    (json.dumps({"question": "q?", "answer": "red"}), "missing field 'image'"),
    (json.dumps({"image": "img.png", "answer": "red"}), "missing field 'question'"),
    (json.dumps({"image": "img.png", "question": "q?"}), "missing field 'answer'"),
    (json.dumps({"image": "img.png", "question": 7, "answer": "red"}), "field 'question' is a number (7), expected a non-empty string"),
    (json.dumps({"image": "img.png", "question": "", "answer": "red"}), "field 'question' is an empty string"),
    (json.dumps({"image": None, "question": "q?", "answer": "red"}), "field 'image' is null"),
    (json.dumps({"image": "img.png", "question": "q?", "answer": ["red"]}), "field 'answer' is a list"),
    (json.dumps({"image": "img.png", "question": "q?", "answers": "red"}), "field 'answers' is the string 'red', expected a non-empty list"),
    (json.dumps({"image": "img.png", "question": "q?", "answers": []}), "field 'answers' is an empty list"),
    (json.dumps({"image": "img.png", "question": "q?", "answers": ["red", 2]}), "field 'answers' is a list"),
    (json.dumps({"image": "img.png", "question": "q?", "answer": "red", "category": 3}), "field 'category' is a number (3)"),
    (json.dumps({"image": "missing.png", "question": "q?", "answer": "red"}), "image 'missing.png'"),
    (json.dumps({"image": ".", "question": "q?", "answer": "red"}), "is not a regular file"),
]


@pytest.mark.parametrize("line, needle", BAD_RECORDS)
def test_a_bad_record_names_its_line(tmp_path: Path, line: str, needle: str) -> None:
    path = _jsonl(tmp_path, GOOD, line, GOOD)
    with pytest.raises(ConfigError) as caught:
        load_records(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 2: "), message
    assert needle in message and "\n" not in message


def test_a_missing_image_names_the_resolved_path(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, json.dumps({"image": "images/9.png", "question": "q?", "answer": "red"}))
    with pytest.raises(ConfigError, match=r"line 1: image 'images/9.png' \(.*/images/9.png\): no such file"):
        load_records(path)


def test_non_utf8_is_named_by_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, GOOD)
    path.write_bytes(path.read_bytes() + b'{"image": "\xff"}\n')
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        load_records(path)


def test_a_bad_line_after_the_limit_is_not_read(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, GOOD, "{not json")
    assert len(load_records(path, limit=1)) == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "questions.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match="holds no records"):
        load_records(path)


def test_a_missing_or_directory_data_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data '.*nope.jsonl': no such file"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="is a directory"):
        load_records(tmp_path)


@pytest.mark.parametrize("limit", [0, -1])
def test_a_bad_limit_is_refused(shapes_set: Path, limit: int) -> None:
    with pytest.raises(ConfigError, match=f"--limit: got {limit}, expected >= 1"):
        load_records(shapes_set, limit=limit)


def test_records_move_with_their_directory(tmp_path: Path, shapes_set: Path) -> None:
    """A set copied elsewhere still loads: relative image paths follow the jsonl."""
    copy = tmp_path / "moved"
    shutil.copytree(shapes_set.parent, copy)
    assert all(r.image.parent.parent == copy for r in load_records(copy / shapes_set.name))
