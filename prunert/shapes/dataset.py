"""Held-out shapes question sets on disk: `questions.jsonl` plus one PNG per question (numpy + Pillow only).

Each line is `{"image": "images/000000.png", "question": ..., "answer": ..., "category": <template>}`, the
record format `prunert eval` and lmms-eval's `dataset_path: json` tasks read. The set is a function of
(seed, count); held-out sets use their own seed stream, disjoint from the one training draws from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from prunert.errors import ConfigError
from prunert.shapes.scenes import Question, Scene, sample_question
from prunert.staged_dir import publish_directory

QUESTIONS_FILE = "questions.jsonl"
IMAGES_DIR = "images"
EVAL_STREAM = 1  # numpy SeedSequence entropy [EVAL_STREAM, seed]; training uses TRAIN_STREAM
TRAIN_STREAM = 2
MAX_QUESTIONS = 1_000_000


def eval_questions(count: int, seed: int) -> list[tuple[Scene, Question]]:
    """The held-out set (seed, count): question i of every count is the same for one seed."""
    rng = np.random.default_rng([EVAL_STREAM, seed])
    return [sample_question(i, rng) for i in range(count)]


def write_eval_set(out_dir: str | os.PathLike[str], count: int, seed: int, *, overwrite: bool = False) -> Path:
    """Write `count` held-out questions with their images to `out_dir` (staged beside it, renamed into place).
    Returns the path of questions.jsonl. An existing `out_dir` is refused unless `overwrite` and it holds a
    shapes set written here (questions.jsonl + images/ and nothing else)."""
    if not 1 <= count <= MAX_QUESTIONS:
        raise ConfigError(f"--count: got {count}, expected 1..{MAX_QUESTIONS}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConfigError(f"--out {out}: already exists (pass --overwrite to replace a shapes set)")
        if out.is_symlink() or not out.is_dir() or {p.name for p in out.iterdir()} - {QUESTIONS_FILE, IMAGES_DIR}:
            raise ConfigError(f"--out {out}: is not a shapes set written by prunert; refusing to replace it")
    publish_directory(out, lambda stage: _write_set(stage, count, seed), overwrite=True)
    return out / QUESTIONS_FILE


def _write_set(stage: Path, count: int, seed: int) -> None:
    (stage / IMAGES_DIR).mkdir()
    lines = []
    for index, (scene, question) in enumerate(eval_questions(count, seed)):
        name = f"{IMAGES_DIR}/{index:06d}.png"
        scene.render().save(stage / name, compress_level=1)
        lines.append(json.dumps({"image": name, "question": question.question, "answer": question.answer,
                                 "category": question.template}))
    (stage / QUESTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
