"""Parity results: one row per stage and metric, a PASS/FAIL verdict, a table and parity.json.
Standard library + numpy only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prunert import metrics

PASS, FAIL, TIE = "PASS", "FAIL", "TIE"


@dataclass(frozen=True)
class Check:
    stage: str
    metric: str
    value: float | int | str
    bound: str  # what passing means, e.g. "<= 1e-3"
    status: str  # PASS / FAIL / TIE (a near-tie greedy step: reported, not a failure)
    detail: str = ""


@dataclass
class ParityReport:
    artifact: str
    source: str
    synthetic: bool
    backend: str
    precision: str  # GraphPrecisions.label: "fp16", or per graph "vision=fp16,decoder=int8"
    tolerances: dict  # the bars applied (ParityTolerances.for_precisions), recorded so none is loosened silently
    image: str
    prompt: str
    checks: list[Check] = field(default_factory=list)
    note: str = ""  # the source's note (a trained demonstration preset), printed like the synthetic note
    runtime: dict = field(default_factory=dict)  # RuntimeConfig.record(): ONNX Runtime threads and spinning of the run

    @property
    def passed(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    @property
    def verdict(self) -> str:
        return PASS if self.passed else FAIL

    def add(self, stage: str, metric: str, value, bound: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(stage, metric, _plain(value), bound, PASS if ok else FAIL, detail))

    def add_max_abs(self, stage: str, expected: np.ndarray, actual: np.ndarray, limit: float | None) -> None:
        """limit None: reported, not a bound (lower precisions are judged by cosine and overlap)."""
        if expected.shape != actual.shape:
            self.add(stage, "shape", str(actual.shape), f"== {expected.shape}", False)
            return
        diff = metrics.max_abs_diff(expected, actual)
        self.add(stage, "max abs diff", diff, "(reported)" if limit is None else f"<= {limit:g}", limit is None or diff <= limit)

    def add_cosine(self, stage: str, expected: np.ndarray, actual: np.ndarray, minimum: float) -> None:
        """prunert.metrics.cosine (two zero vectors: 1.0, a zero against a nonzero one: 0.0); nan on a size mismatch."""
        cosine = metrics.cosine(expected, actual) if expected.shape == actual.shape else float("nan")
        self.add(stage, "cosine", cosine, f">= {minimum:g}", cosine >= minimum)

    def add_kl(self, stage: str, expected: np.ndarray, actual: np.ndarray, limit: float | None) -> None:
        """KL(softmax expected || softmax actual) of the last position's logits [..., L, V] (prunert.metrics);
        limit None: reported, not a bound."""
        if expected.shape != actual.shape:
            return  # add_max_abs reports the shape mismatch
        kl = metrics.kl_divergence(expected.reshape(-1, expected.shape[-1])[-1], actual.reshape(-1, actual.shape[-1])[-1])
        self.add(stage, "KL (last)", kl, "(reported)" if limit is None else f"<= {limit:g}", limit is None or kl <= limit)

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        rows = [("stage", "metric", "value", "bound", "status")]
        for c in self.checks:
            value = f"{c.value:.3g}" if isinstance(c.value, float) else str(c.value)
            rows.append((c.stage, c.metric, value, c.bound, c.status + (f" ({c.detail})" if c.detail else "")))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
