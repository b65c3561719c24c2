"""Evaluation records: one JSON object per line of a JSONL file (numpy-free, no torch).

`{"image": "<path relative to the jsonl, or absolute>", "question": "...", "answer": "..."}`, with optional
`"answers": [...]` (any of them counts as correct) and `"category": "..."` (the per-template breakdown): the
record format lmms-eval's `dataset_path: json` tasks read. A record about several images gives
`"images": ["a.jpg", "b.jpg"]` instead of `"image"` (LLaVA-NeXT, Qwen2.5-VL: one prompt holds them all, in order). Every bad record is a ConfigError naming the file
and its line (`questions.jsonl line 7: ...`); blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunert.errors import ConfigError


@dataclass(frozen=True)
class EvalRecord:
    line: int  # 1-based line of the jsonl
    image: Path  # resolved: relative paths are read from the jsonl's directory ("images": the first)
    question: str
    answers: tuple[str, ...]  # "answer" first, then "answers"; any one matches
    category: str | None = None
    source: str = ""  # the jsonl as given, for messages
    more_images: tuple[Path, ...] = ()  # "images": the ones after the first, resolved like `image`

    @property
    def images(self) -> tuple[Path, ...]:
        """Every image of the record, in order (one for an "image" record)."""
        return (self.image, *self.more_images)

    @property
    def where(self) -> str:
        """`questions.jsonl line 7`: how errors name this record."""
        return f"{self.source} line {self.line}"


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: got {limit}, expected >= 1 (records read from the start of --data)")


def load_records(path: str | os.PathLike[str], limit: int | None = None) -> list[EvalRecord]:
    """The first `limit` records of the JSONL file `path` (all when None), each checked (parse_record)."""
    check_limit(limit)
    path = Path(path)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"--data '{path}': {why}; expected a JSONL file of image/question/answer records")
    records: list[EvalRecord] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            where = f"{path} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if text.strip():
                records.append(parse_record(text, number, path))
    if not records:
        raise ConfigError(f"--data '{path}': holds no records; expected one JSON object per line")
    return records


def parse_record(text: str, line: int, path: Path) -> EvalRecord:
    where = f"{path} line {line}"
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise ConfigError(f"{where}: not valid JSON ({reason}); expected one JSON object per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got a JSON {type(data).__name__}, expected an object with image, question and answer")
    images, question = _images(data, where), _string(data, "question", where)
    answers = _answers(data, where)
    category = data.get("category")
    if category is not None and not isinstance(category, str):
        raise ConfigError(f"{where}: field 'category' is {_kind(category)}, expected a string (or no field)")
    resolved = [_image_file(image, path, where) for image in images]
    return EvalRecord(line, resolved[0], question, answers, category, str(path), tuple(resolved[1:]))


def _images(data: dict[str, Any], where: str) -> list[str]:
    """"image" (a non-empty string), or "images" (a non-empty list of them): the record's image paths, in order."""
    if "images" not in data:
        return [_string(data, "image", where)]
    if "image" in data:
        raise ConfigError(f"{where}: fields 'image' and 'images' both given, expected one of them ('images' for several)")
    listed = data["images"]
    if not isinstance(listed, list) or not listed or not all(isinstance(i, str) and i.strip() for i in listed):
        raise ConfigError(f"{where}: field 'images' is {_kind(listed)}, expected a non-empty list of non-empty strings (image paths)")
    return listed


def _image_file(image: str, path: Path, where: str) -> Path:
    """An image path of the record, resolved against the jsonl's directory; a ConfigError unless it is a file."""
    resolved = Path(image).expanduser()
    resolved = resolved if resolved.is_absolute() else path.parent / resolved
    if not resolved.is_file():
        why = "is not a regular file" if resolved.exists() else "no such file"
        raise ConfigError(f"{where}: image '{image}' ({resolved}): {why}; relative paths are read from the jsonl's directory")
    return resolved


def _string(data: dict[str, Any], name: str, where: str) -> str:
    if name not in data:
        raise ConfigError(f"{where}: missing field '{name}' (a non-empty string)")
    value = data[name]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: field '{name}' is {_kind(value)}, expected a non-empty string")
    return value


def _answers(data: dict[str, Any], where: str) -> tuple[str, ...]:
    """"answer" (a string) and/or "answers" (a non-empty list of strings), in that order, without repeats."""
    if "answer" not in data and "answers" not in data:
        raise ConfigError(f"{where}: missing field 'answer' (a string; or 'answers', a list of strings)")
    found = [_string(data, "answer", where)] if "answer" in data else []
    if "answers" in data:
        listed = data["answers"]
        if not isinstance(listed, list) or not listed or not all(isinstance(a, str) and a.strip() for a in listed):
            raise ConfigError(f"{where}: field 'answers' is {_kind(listed)}, expected a non-empty list of non-empty strings")
        found += listed
    return tuple(dict.fromkeys(found))


def _kind(value: Any) -> str:
    """How a message names a bad value: `an empty string`, `a number (3)`, `null`, `a list [...]`."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:40]!r}"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list {json.dumps(value)[:40]}"
    return "an object"
