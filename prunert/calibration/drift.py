"""How far a quantized variant drifts from fp32, measured end to end in ONNX Runtime CPU.

Both pipelines get the same samples (batch 1): the quantized one runs the variant's graphs (a graph the
variant leaves in fp32 is the fp32 file), from its own vision output through its own prefill and greedy
decoding. Per sample:

kept_overlap      |kept(fp32) ∩ kept(quantized)| / K
token_cosine      mean cosine of the visual tokens both kept (matched by original index); None if none
logits_kl         KL(softmax fp32 || softmax quantized) of the prefill's last-position logits (nats)
logits_cosine     cosine of those logits
decoder_kl        the same KL with both decoders fed the fp32 spliced embeddings: the decoder's own
                  share of the drift (logits_kl also carries the vision graph's, kept-token changes included)
greedy_agreement  leading greedy tokens identical before the first divergence / the longer sequence

Cosines, overlap and KL are prunert.metrics', the same parity and precision validation report (a zero vector
against a zero vector: cosine 1.0; against a nonzero one: 0.0).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunert import metrics
from prunert.calibration.dataset import CalibrationSet, for_each_sample
from prunert.errors import ArtifactError
from prunert.manifest import GraphSpec, load_manifest
from prunert.runtime.runner import Runner


@dataclass(frozen=True)
class SampleDrift:
    image: str
    prompt: str
    kept_overlap: float
    token_cosine: float | None
    logits_kl: float
    logits_cosine: float
    decoder_kl: float
    greedy_agreement: float
    fp32_tokens: tuple[int, ...]
    quantized_tokens: tuple[int, ...]


@dataclass(frozen=True)
class DriftReport:
    precision: str
    greedy_tokens: int
    graphs: dict[str, str]  # graph -> the file the quantized side ran
    samples: tuple[SampleDrift, ...]

    def summary(self) -> dict[str, Any]:
        overlap = [s.kept_overlap for s in self.samples]
        cosine = [s.token_cosine for s in self.samples if s.token_cosine is not None]
        kl = [s.logits_kl for s in self.samples]
        logits_cos = [s.logits_cosine for s in self.samples]
        decoder_kl = [s.decoder_kl for s in self.samples]
        agree = [s.greedy_agreement for s in self.samples]
        return {
            "samples": len(self.samples),
            "kept_overlap_mean": _num(np.mean(overlap)),
            "kept_overlap_min": _num(np.min(overlap)),
            "token_cosine_mean": _num(np.mean(cosine)) if cosine else None,
            "token_cosine_min": _num(np.min(cosine)) if cosine else None,
            "logits_kl_mean": _num(np.mean(kl)),
            "logits_kl_max": _num(np.max(kl)),
            "logits_cosine_mean": _num(np.mean(logits_cos)),
            "logits_cosine_min": _num(np.min(logits_cos)),
            "decoder_kl_mean": _num(np.mean(decoder_kl)),
            "decoder_kl_max": _num(np.max(decoder_kl)),
            "greedy_agreement_mean": _num(np.mean(agree)),
            "greedy_agreement_min": _num(np.min(agree)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "reference": "fp32",
            "backend": "onnxruntime CPU",
            "greedy_tokens": self.greedy_tokens,
            "graphs": dict(self.graphs),
            "summary": self.summary(),
            "samples": [asdict(s) for s in self.samples],
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        s, p = self.summary(), self.precision
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        lines = [
            f"{p} vs fp32 drift (ONNX Runtime CPU, {s['samples']} samples, {self.greedy_tokens} greedy tokens)",
            f"  {'metric':<28} {'mean':>10}  {'worst':>10}",
            f"  {'kept-index overlap':<28} {fmt(s['kept_overlap_mean'], '.4f'):>10}  {fmt(s['kept_overlap_min'], '.4f'):>10} (min)",
            f"  {'kept-token cosine':<28} {fmt(s['token_cosine_mean'], '.5f'):>10}  {fmt(s['token_cosine_min'], '.5f'):>10} (min)",
            f"  {f'logits KL(fp32 || {p})':<28} {fmt(s['logits_kl_mean'], '.3g'):>10}  {fmt(s['logits_kl_max'], '.3g'):>10} (max)",
            f"  {'logits cosine':<28} {fmt(s['logits_cosine_mean'], '.5f'):>10}  {fmt(s['logits_cosine_min'], '.5f'):>10} (min)",
            f"  {'decoder-only KL':<28} {fmt(s['decoder_kl_mean'], '.3g'):>10}  {fmt(s['decoder_kl_max'], '.3g'):>10} (max)",
            f"  {'greedy-token agreement':<28} {fmt(s['greedy_agreement_mean'], '.3f'):>10}  {fmt(s['greedy_agreement_min'], '.3f'):>10} (min)",
            "  per sample: overlap  cosine  KL  decoder-KL  agreement  image  prompt",
        ]
        for sample in self.samples:
            prompt = " ".join(sample.prompt.split())
            lines.append(
                f"    {sample.kept_overlap:.3f}  {fmt(sample.token_cosine, '.5f')}  {sample.logits_kl:.3g}  "
                f"{sample.decoder_kl:.3g}  {sample.greedy_agreement:.3f}  {sample.image}  {prompt[:48]!r}"
            )
        return "\n".join(lines)


# ONNX Runtime's CPU QDQ fusions turn DQ -> Conv -> Q into QLinearConv, which has no float8 kernel; with
# this session option ORT runs FP8 Q/DQ graphs as Q/DQ + float ops. Runners opening fp8 graphs need it.
ORT_FP8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def ort_session(path: Path, precision: str, threads: int = 0):
    """An ONNX Runtime CPU session for a quantized graph (fp8 needs ORT_FP8_SESSION_CONFIG)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if precision == "fp8":
        for key, value in ORT_FP8_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _num(value: Any) -> float:
    return float(f"{float(value):.6g}")


class _SessionRunner(Runner):
    """A Runner over an ONNX Runtime CPU session opened for a quantized graph."""

    def __init__(self, path: Path, spec: GraphSpec, precision: str):
        super().__init__(spec)
        self.session = ort_session(path, precision)
        self.output_names = [t.name for t in spec.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def quantized_pipeline(pipe: Any, files: dict[str, Path], graphs: dict[str, GraphSpec], precision: str) -> Any:
    """A shallow copy of the fp32 pipeline whose runners for `files` (graph -> .onnx) run those graphs."""
    quantized = copy.copy(pipe)
    for name, path in files.items():
        setattr(quantized, name, _SessionRunner(Path(path), graphs[name], precision))
    return quantized


def compare(fp32: Any, quantized: Any, calibration_set: CalibrationSet, precision: str, greedy_tokens: int = 8) -> DriftReport:
    """Run both pipelines on every sample and measure the drift (see the module docstring)."""
    runs = []
    for pipe in (fp32, quantized):
        results: list[tuple] = []

        def visit(index, vision, state, tokens, results=results):
            last = state.logits[0, -1].astype(np.float64)
            spliced = (state.inputs_embeds, state.attention_mask, state.position_ids)  # not the KV cache: large
            kept_tokens, kept_indices = vision.kept(0)  # [k, D], [k]: the real slots
            results.append((kept_indices, kept_tokens, last, tokens, spliced))

        for_each_sample(pipe, calibration_set, visit, greedy_tokens)
        runs.append(results)
    decoder_logits = []
    for ref in runs[0]:  # the quantized decoder on the fp32 spliced embeddings
        logits, _ = quantized.run_decoder(*ref[4], quantized.empty_past(1))
        decoder_logits.append(logits[0, -1])
    prompts = calibration_set.prompts_for(fp32.manifest.text.placeholder)  # as run: the artifact's placeholder
    samples = [sample_drift(sample.image.name, prompt, ref, got, decoder)
               for sample, prompt, ref, got, decoder in zip(calibration_set.samples, prompts, *runs, decoder_logits)]
    files = {name: getattr(quantized, name).spec.file for name in ("vision", "decoder")}
    return DriftReport(precision, greedy_tokens, files, tuple(samples))


def sample_drift(image: str, prompt: str, ref: tuple, got: tuple, decoder_logits: np.ndarray) -> SampleDrift:
    """One sample's drift from the two runs' (kept indices [k], kept tokens [k, D], prefill last logits [V], greedy
    tokens, spliced inputs) and the quantized decoder's last logits on the fp32 spliced inputs [V]."""
    token_cosine = metrics.matched_token_cosine(ref[0], ref[1], got[0], got[1])
    return SampleDrift(
        image=image,
        prompt=prompt,
        kept_overlap=_num(metrics.kept_overlap(ref[0], got[0])),
        token_cosine=None if token_cosine is None else _num(token_cosine),
        logits_kl=_num(max(metrics.kl_divergence(ref[2], got[2]), 0.0)),
        logits_cosine=_num(metrics.cosine(ref[2], got[2])),
        decoder_kl=_num(max(metrics.kl_divergence(ref[2], decoder_logits), 0.0)),
        greedy_agreement=_num(_agreement(ref[3], got[3])),
        fp32_tokens=tuple(ref[3]),
        quantized_tokens=tuple(got[3]),
    )


def _agreement(reference: list[int], other: list[int]) -> float:
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / longest


def drift_report(
    directory: Path,
    precision: str,
    calibration_set: CalibrationSet,
    greedy_tokens: int = 8,
    out: Path | None = None,
) -> DriftReport:
    """Compare the artifact's `precision` variant with its fp32 graphs; write the JSON to `out` if given.

    (`calibrate_artifact` writes drift-<precision>.json inside the variant folder, hashed in the manifest;
    this standalone form cannot write there without re-committing the variant.)
    """
    from prunert.runtime import VLMPipeline

    directory = Path(directory)
    manifest = load_manifest(directory)
    if precision not in manifest.variants:
        raise ArtifactError(f"artifact '{directory}': no {precision} variant (it has {['fp32', *sorted(manifest.variants)]})")
    variant = manifest.variants[precision]
    files = {
        name: directory / spec.file for name, spec in variant.graphs.items() if spec.file != manifest.graphs[name].file
    }
    fp32 = VLMPipeline(directory, decoder="decoder")  # the form the quantized variant has
    report = compare(fp32, quantized_pipeline(fp32, files, variant.graphs, precision), calibration_set, precision, greedy_tokens)
    if out is not None:
        report.write(Path(out))
    return report
