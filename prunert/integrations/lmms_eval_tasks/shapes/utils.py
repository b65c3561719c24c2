"""Functions of the prunert eval-JSONL task (`_default_template_yaml`). Records come from the JSONL that
prunert.integrations.lmms_eval_tasks.write_task wrote: image paths absolute, `answers` a list."""

from __future__ import annotations

from typing import Any

from prunert.evaluation.scoring import exact_match
from prunert.runtime.image import load_image


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The record's one image, RGB (prunert.runtime.image.load_image: a bad file names its path)."""
    return [load_image(doc["image"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """exact_match: 1.0 when the prediction's normal form equals one of the record's answers' (prunert eval's rule)."""
    return {"exact_match": float(exact_match(results[0], doc["answers"]))}
