"""drift_report: int8/fp8 vs fp32 in ONNX Runtime CPU, deterministic, numbers in range."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from prunert.calibration.dataset import load_calibration_set
from prunert.calibration.drift import DriftReport, _agreement, drift_report
from prunert.calibration.quantize import calibrate_artifact
from prunert.config import CalibrationConfig
from prunert.errors import ArtifactError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "calibration"


@pytest.fixture(scope="module")
def calibration():
    return load_calibration_set(EXAMPLES, None, max_samples=3)


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, calibration, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("drift") / "artifact"
    shutil.copytree(tiny_artifact, artifact)
    manifest, report = calibrate_artifact(artifact, calibration, CalibrationConfig(), log=lambda s: None)
    return artifact, manifest, report


def _check_ranges(report: DriftReport, samples: int) -> None:
    summary = report.summary()
    assert summary["samples"] == samples == len(report.samples)
    for sample in report.samples:
        assert 0 <= sample.kept_overlap <= 1 and sample.kept_overlap * 16 == round(sample.kept_overlap * 16)
        assert sample.token_cosine is None or -1 <= sample.token_cosine <= 1 + 1e-9
        assert sample.logits_kl >= 0 and sample.decoder_kl >= 0 and -1 <= sample.logits_cosine <= 1 + 1e-9
        assert 0 <= sample.greedy_agreement <= 1
        assert 1 <= len(sample.fp32_tokens) <= report.greedy_tokens and 1 <= len(sample.quantized_tokens) <= report.greedy_tokens
    assert summary["kept_overlap_min"] <= summary["kept_overlap_mean"] <= 1
    assert summary["logits_kl_mean"] <= summary["logits_kl_max"]
    assert all(math.isfinite(v) for v in summary.values() if v is not None)


def test_int8_drift_is_in_range_and_plausible(calibrated):
    _, manifest, report = calibrated
    _check_ranges(report, 3)
    summary = report.summary()
    assert summary["token_cosine_mean"] > 0.99  # tokens kept by both agree closely
    assert summary["decoder_kl_mean"] < 0.05  # the int8 decoder alone on fp32 embeddings
    assert summary["kept_overlap_mean"] >= 0.5  # random weights: selection has near-ties, K=16
    assert report.graphs == {g: manifest.variants["int8"].graphs[g].file for g in ("vision", "decoder")}


def test_standalone_report_is_deterministic_and_matches_the_saved_one(calibrated, calibration, tmp_path):
    artifact, manifest, saved = calibrated
    out = tmp_path / "drift.json"
    first = drift_report(artifact, "int8", calibration, out=out)
    second = drift_report(artifact, "int8", calibration)
    assert first.to_dict() == second.to_dict() == saved.to_dict()
    assert json.loads(out.read_text()) == json.loads(json.dumps(first.to_dict()))
    on_disk = json.loads((artifact / manifest.variants["int8"].settings["drift_report"]).read_text())
    assert on_disk["summary"] == first.summary() and on_disk["precision"] == "int8"


def test_table_names_every_metric(calibrated):
    table = calibrated[2].table()
    for needle in ("int8 vs fp32", "kept-index overlap", "kept-token cosine", "KL(fp32 || int8)", "decoder-only KL",
                   "greedy-token agreement", "astronaut.jpg"):
        assert needle in table
    assert len(table.splitlines()) == 9 + 3  # title, header, 6 metrics, per-sample header, 3 samples


def test_missing_variant_is_an_artifact_error(tiny_artifact, calibration):
    with pytest.raises(ArtifactError, match="no fp8 variant"):
        drift_report(tiny_artifact, "fp8", calibration)


def test_metric_helpers():
    assert _agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert _agreement([1, 2], [1, 2]) == 1.0 and _agreement([], []) == 1.0
    assert _agreement([5, 2], [1, 2]) == 0.0 and _agreement([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    # KL, cosines and overlap are prunert.metrics' (tests/test_metrics.py)
