"""Evaluation results: one ArtifactResult per artifact (its JSON entry), the printed tables and `--out` JSON.

`--out` layout (scripts rely on it, artifacts in the order given):
`{"artifacts": [{"artifact", "method", "budget", "precision", "accuracy", "ci95", "by_category", "ttft_s",
"decode_tok_s", "runtime": {"threads", "spinning"}, "predictions": [{"line", "question", "answer", "prediction", "correct"}, ...]}, ...]}`,
("precision" is GraphPrecisions.label: "fp16", or "vision=fp16,decoder=int8"),
plus `"reference"` (one entry of the same layout) with `--reference hf`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunert.evaluation.scoring import wilson_interval

OUT_KEYS = frozenset({"artifacts"})  # what an --out file must hold to be replaced (artifact_publish.replace_file)


@dataclass(frozen=True)
class Prediction:
    line: int  # the record's line in the jsonl
    question: str
    answer: str  # the record's first answer ("answer", else answers[0])
    prediction: str  # the generated text
    correct: bool  # exact match after normalisation against any of the record's answers
    category: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "question": self.question, "answer": self.answer, "prediction": self.prediction, "correct": self.correct}


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact (or the HF reference) over the records."""

    artifact: str  # the directory as given (the reference: "hf:<model>")
    method: str
    budget: int  # K kept visual tokens per image
    precision: str
    unpruned: bool  # the method keeps every token (pruning_ops MethodSpec.keeps_all): the relative-accuracy baseline
    predictions: tuple[Prediction, ...]
    ttft_s: float | None  # mean over records of their batch's time to first token (vision + prefill); None: not timed
    decode_tok_s: float | None  # decoder steps per second per sequence (all steps / all decode time); None: no steps
    source: Any = None  # the artifact's manifest SourceSpec (what `prunert run` notes about the model)
    runtime: dict[str, Any] | None = None  # RuntimeConfig.record(): ONNX Runtime threads and spinning; None: not ONNX Runtime (the reference)

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.predictions)

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, len(self.predictions))

    @property
    def by_category(self) -> dict[str, dict[str, Any]]:
        """{category: {"accuracy", "n", "ci95"}} in order of first appearance; records without one are left out."""
        groups: dict[str, list[bool]] = {}
        for p in self.predictions:
            if p.category is not None:
                groups.setdefault(p.category, []).append(p.correct)
        return {name: {"accuracy": sum(hits) / len(hits), "n": len(hits), "ci95": list(wilson_interval(sum(hits), len(hits)))}
                for name, hits in groups.items()}

    def relative_to(self, baseline: ArtifactResult | None) -> float | None:
        """accuracy / the baseline's; None without a baseline or when its accuracy is 0."""
        return self.accuracy / baseline.accuracy if baseline is not None and baseline.accuracy > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "method": self.method, "budget": self.budget, "precision": self.precision,
                "accuracy": self.accuracy, "ci95": list(self.ci95), "by_category": self.by_category, "ttft_s": self.ttft_s,
                "decode_tok_s": self.decode_tok_s, **({"runtime": self.runtime} if self.runtime is not None else {}),
                "predictions": [p.to_json() for p in self.predictions]}


def unpruned_baseline(results: list[ArtifactResult]) -> ArtifactResult | None:
    """The first unpruned artifact among `results` (the reference row is never one)."""
    return next((r for r in results if r.unpruned), None)


def results_json(results: list[ArtifactResult], reference: ArtifactResult | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"artifacts": [r.to_json() for r in results]}
    if reference is not None:
        out["reference"] = reference.to_json()
    return out


def write_results(path: Path, results: list[ArtifactResult], reference: ArtifactResult | None = None) -> None:
    Path(path).write_text(json.dumps(results_json(results, reference), indent=2) + "\n", encoding="utf-8")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(ci: tuple[float, float] | list[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def results_table(results: list[ArtifactResult], reference: ArtifactResult | None = None) -> str:
    """One row per artifact (then the reference): method, K, precision, accuracy [95% Wilson], accuracy relative to
    the unpruned artifact ("-" without one), mean TTFT and decode tok/s."""
    baseline = unpruned_baseline(results)
    rows = [("artifact", "method", "K", "precision", "accuracy", "95% CI", "vs unpruned", "TTFT ms", "tok/s")]
    for r in results + ([reference] if reference is not None else []):
        relative = r.relative_to(baseline)
        rows.append((r.artifact, r.method, str(r.budget), r.precision, f"{_percent(r.accuracy)} ({r.correct}/{len(r.predictions)})",
                     _interval(r.ci95), "-" if relative is None else f"{relative:.3f}",
                     "-" if r.ttft_s is None else f"{r.ttft_s * 1e3:.1f}", "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}"))
    return _format(rows, left=2)


def category_table(results: list[ArtifactResult], reference: ArtifactResult | None = None) -> str:
    """Accuracy per category (rows) and artifact (columns, numbered as in the results table); "" when no record has one."""
    every = results + ([reference] if reference is not None else [])
    names = list(dict.fromkeys(name for r in every for name in r.by_category))
    if not names:
        return ""
    rows = [("category", "n", *(f"#{i + 1}" if r is not reference else "reference" for i, r in enumerate(every)))]
    for name in names:
        counts = {r.by_category[name]["n"] for r in every if name in r.by_category}
        cells = [_percent(r.by_category[name]["accuracy"]) if name in r.by_category else "-" for r in every]
        rows.append((name, "/".join(map(str, sorted(counts))), *cells))
    legend = "\n".join(f"#{i + 1}: {r.artifact}" for i, r in enumerate(results))
    return _format(rows, left=1) + "\n" + legend


def _format(rows: list[tuple[str, ...]], left: int) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)
