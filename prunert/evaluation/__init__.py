"""`prunert eval`: accuracy of exported artifacts on JSONL question sets (exact match after VQA-style
normalisation, 95% Wilson intervals, per-category breakdown), and optionally of the Hugging Face checkpoint
itself (`--reference hf`, evaluation.reference: torch, imported only there).

    records = load_records("questions.jsonl", limit=None)
    result = evaluate_artifact(artifact_dir, records, EvalConfig(batch=8))
    result.accuracy, result.ci95, result.by_category, result.to_json()
"""

from prunert.evaluation.data import EvalRecord, load_records
from prunert.evaluation.report import ArtifactResult, Prediction
from prunert.evaluation.runner import EvalConfig, evaluate_artifact, question_prompt

__all__ = ["ArtifactResult", "EvalConfig", "EvalRecord", "Prediction", "evaluate_artifact", "load_records", "question_prompt"]
