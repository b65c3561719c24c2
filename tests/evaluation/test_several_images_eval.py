"""`prunert eval` records of several images: JSONL `"images": [...]` (`"image"` keeps working), one prompt holding
them all (question_prompt: a placeholder per image), answered as VLMPipeline answers that prompt; bad "images" fields
are one error naming the line; LLaVA-1.5 refuses such a record before the first batch; the lmms-eval task writer
refuses it (its task reads one image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunert.config import GenerationConfig
from prunert.errors import ConfigError, PromptError
from prunert.evaluation import EvalConfig, evaluate_artifact, load_records, question_prompt

REPO = Path(__file__).resolve().parents[2]
PHOTOS = [REPO / "examples" / "images" / f"{name}.jpg" for name in ("chelsea", "astronaut")]


def _jsonl(tmp_path: Path, *rows: dict) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [{"images": [str(PHOTOS[0]), str(PHOTOS[1])], "question": "Which picture shows the cat?", "answer": "first"},
        {"image": str(PHOTOS[1]), "question": "What is it?", "answer": "astronaut"}]


def test_records_with_images_load_in_order(tmp_path: Path) -> None:
    several, one = load_records(_jsonl(tmp_path, *ROWS))
    assert several.images == tuple(PHOTOS) and several.image == PHOTOS[0]
    assert one.images == (PHOTOS[1],) and one.more_images == ()


def test_two_image_records_answer_as_the_pipeline(next_tiny_artifact: Path, tmp_path: Path) -> None:
    from prunert.runtime import VLMPipeline

    records = load_records(_jsonl(tmp_path, *ROWS))
    result = evaluate_artifact(next_tiny_artifact, records, EvalConfig(batch=2), progress=False)
    pipe = VLMPipeline(next_tiny_artifact)
    config = GenerationConfig(max_new_tokens=EvalConfig().max_new_tokens)
    placeholder = pipe.manifest.text.placeholder
    assert question_prompt(placeholder, ROWS[0]["question"], 2) == f"<image>\n<image>\n{ROWS[0]['question']}"
    for record, prediction in zip(records, result.predictions):
        prompt = question_prompt(placeholder, record.question, len(record.images))
        assert prediction.prediction == pipe.generate([list(record.images)], [prompt], config)[0].text


def test_llava_1_5_refuses_a_two_image_record_before_the_first_batch(tiny_artifact: Path, tmp_path: Path) -> None:
    path = _jsonl(tmp_path, ROWS[1], ROWS[0])
    with pytest.raises(PromptError, match=rf"{path} line 2: question: .*2 images, expected at most 1 per prompt") as caught:
        evaluate_artifact(tiny_artifact, load_records(path), progress=False)
    assert "\n" not in str(caught.value)


BAD = [
    ({"image": str(PHOTOS[0]), "images": [str(PHOTOS[1])], "question": "q?", "answer": "a"}, "fields 'image' and 'images' both given"),
    ({"images": [], "question": "q?", "answer": "a"}, "field 'images' is an empty list, expected a non-empty list"),
    ({"images": str(PHOTOS[0]), "question": "q?", "answer": "a"}, "field 'images' is the string"),
    ({"images": [str(PHOTOS[0]), 3], "question": "q?", "answer": "a"}, "field 'images' is a list"),
    ({"images": [str(PHOTOS[0]), "missing.png"], "question": "q?", "answer": "a"}, "image 'missing.png'"),
]


@pytest.mark.parametrize("row, needle", BAD, ids=[needle[:24] for _, needle in BAD])
def test_a_bad_images_field_names_its_line(tmp_path: Path, row: dict, needle: str) -> None:
    path = _jsonl(tmp_path, ROWS[1], row)
    with pytest.raises(ConfigError) as caught:
        load_records(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 2: ") and needle in message and "\n" not in message, message


def test_the_lmms_eval_task_refuses_several_images(tmp_path: Path) -> None:
    from prunert.integrations.lmms_eval_tasks import write_task

    path = _jsonl(tmp_path, *ROWS)
    with pytest.raises(ConfigError, match=rf"{path} line 1: 'images' holds 2 images; the lmms-eval task takes one image per record"):
        write_task(path, tmp_path / "task")
    assert not (tmp_path / "task").exists()
