"""Evaluating one exported artifact on records: greedy generation through prunert.runtime.VLMPipeline (no torch).

Each record's prompt is `question_prompt(placeholder, question, images)` (the placeholder and a newline once per
image, then the question), which the runtime puts through the family's prompt template, as
`prunert run --prompt "<image>\\n..."` does; a record of several images ("images") gets them in one prompt. Records
run in batches of `min(EvalConfig.batch, the artifact's max_batch)`, in order; every prompt is tokenized before
the first batch, so a question too long for the artifact fails before the long run, naming its line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from prunert import pruning_ops
from prunert.config import GraphPrecisions, RuntimeConfig
from prunert.errors import ConfigError, ImageError, PromptError
from prunert.evaluation.data import EvalRecord
from prunert.evaluation.report import ArtifactResult, Prediction
from prunert.evaluation.scoring import exact_match

MAX_BATCH = 1024


@dataclass(frozen=True)
class EvalConfig:
    batch: int = 8  # records per generate call; capped at the artifact's max_batch
    backend: str = "onnxruntime"
    precision: GraphPrecisions = GraphPrecisions()  # per graph role; --precision's text ("fp16", "vision=fp16,decoder=int8") is parsed
    runtime: RuntimeConfig = RuntimeConfig()  # ONNX Runtime threads (0: its default) and spinning
    max_new_tokens: int = 8  # answers are a word or a few; capped by the artifact's max_sequence, as in `prunert run`

    def __post_init__(self) -> None:
        from prunert.runtime.pipeline import BACKENDS

        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"--batch: got {self.batch}, expected 1..{MAX_BATCH} (capped at the artifact's max_batch)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens: got {self.max_new_tokens}, expected >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: unknown; expected one of {list(BACKENDS)}")
        object.__setattr__(self, "precision", GraphPrecisions.parse(self.precision))


def question_prompt(placeholder: str, question: str, images: int = 1) -> str:
    """The prompt of one record: the image placeholder and a newline per image, then the question (the family's
    template wraps it)."""
    return f"{placeholder}\n" * images + question


def record_images(record: EvalRecord) -> list:
    """The record's images, in order (runtime.image.load_image); a bad file names the record's line."""
    from prunert.runtime.image import load_image

    try:
        return [load_image(image) for image in record.images]
    except ImageError as exc:
        raise ImageError(f"{record.where}: {exc}") from None


def score(record: EvalRecord, text: str) -> Prediction:
    return Prediction(record.line, record.question, record.answers[0], text, exact_match(text, record.answers), record.category)


class Progress:
    """`label done/total [bar]` redrawn in place on a terminal's stderr; silent when it is not a terminal (logs,
    captured output) or disabled. close() ends the line, so what follows starts on its own."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.shown = enabled and self.stream.isatty()
        self.label, self.total, self.width, self.done, self.start = label, total, width, 0, time.perf_counter()
        self._draw()

    def advance(self, count: int) -> None:
        self.done = min(self.total, self.done + count)
        self._draw()

    def _draw(self) -> None:
        if self.shown:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} {self.done}/{self.total} [{bar}] {time.perf_counter() - self.start:.0f}s")
            self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def check_prompts(pipe, records: Sequence[EvalRecord]) -> list[str]:
    """Every record's prompt, tokenized once here so that a bad one fails before the first batch, naming its line."""
    prompts = [question_prompt(pipe.manifest.text.placeholder, r.question, len(r.images)) for r in records]
    for record, prompt in zip(records, prompts):
        try:
            pipe.tokenize([prompt], [len(record.images)])
        except PromptError as exc:
            raise PromptError(f"{record.where}: question: {exc}") from None
    return prompts


def evaluate_artifact(artifact_dir: str | Path, records: Sequence[EvalRecord], cfg: EvalConfig = EvalConfig(),
                      progress: bool = True) -> ArtifactResult:
    """Greedy answers of the artifact to every record, scored; timings from the pipeline's per-batch Timings."""
    from prunert.config import GenerationConfig
    from prunert.runtime import Artifact, VLMPipeline

    if not records:
        raise ConfigError("records: got none, expected at least one (load_records)")
    pipe = VLMPipeline(Artifact(artifact_dir), backend=cfg.backend, precision=cfg.precision, runtime=cfg.runtime)
    manifest = pipe.manifest
    prompts = check_prompts(pipe, records)
    size = min(cfg.batch, manifest.text.max_batch)
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens)  # temperature 0: greedy
    predictions: list[Prediction] = []
    ttft_total = decode_time = 0.0
    steps = 0
    bar = Progress(f"eval {artifact_dir}", len(records), progress)
    try:
        for start in range(0, len(records), size):
            batch = records[start : start + size]
            results = pipe.generate([record_images(r) for r in batch], prompts[start : start + size], generation)
            predictions += [score(record, result.text) for record, result in zip(batch, results)]
            timings = pipe.timings
            ttft_total += timings.ttft_s * len(batch)  # each record waited its batch's TTFT
            decode_time, steps = decode_time + timings.decode_s, steps + timings.decode_steps
            bar.advance(len(batch))
    finally:
        bar.close()
    return ArtifactResult(str(artifact_dir), manifest.budget.method, manifest.budget.budget, cfg.precision.label,
                          pruning_ops.method_spec(manifest.budget.method).keeps_all, tuple(predictions),
                          ttft_total / len(records), steps / decode_time if steps and decode_time > 0 else None, manifest.source,
                          runtime=cfg.runtime.record())
