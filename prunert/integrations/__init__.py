"""Bridges from prunert artifacts to other tools' harnesses.

- `prunert.integrations.lmms_eval`: the `prunert` model of lmms-eval (its `lmms_eval.models` entry point,
  pyproject.toml). The only module of prunert that imports lmms_eval; nothing imports it but lmms-eval.
- `prunert.integrations.lmms_eval_tasks`: a local lmms-eval task over a prunert eval JSONL (the shapes sets of
  `prunert.shapes.dataset.write_eval_set`, or any image/question/answer records); writing it needs no lmms-eval.
"""
