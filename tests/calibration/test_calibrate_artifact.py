"""calibrate_artifact: variants written atomically through ArtifactUpdate, hashed, replaceable."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import onnxruntime
import pytest

from prunert.artifact_update import STAGING_DIR
from prunert.calibration import quantize
from prunert.calibration.dataset import load_calibration_set
from prunert.calibration.quantize import calibrate_artifact
from prunert.config import CalibrationConfig
from prunert.errors import ExportError
from prunert.export.trt_check import TrtIssue
from prunert.manifest import MANIFEST_NAME, load_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "calibration"


@pytest.fixture(scope="module")
def calibration():
    return load_calibration_set(EXAMPLES, EXAMPLES / "prompts.txt", max_samples=2)


def _folders(artifact: Path) -> list[str]:
    return sorted(p.name for p in artifact.iterdir() if p.is_dir())


def test_int8_variant_is_listed_hashed_and_resolvable(artifact_copy, calibration):
    lines = []
    manifest, drift = calibrate_artifact(artifact_copy, calibration, CalibrationConfig(), log=lines.append)
    assert lines and lines[-1].startswith("wrote int8 variant")
    reread = load_manifest(artifact_copy)  # verifies every listed sha256
    assert reread == manifest
    variant = manifest.variants["int8"]
    folder = variant.graphs["vision"].file.split("/")[0]
    assert folder.startswith("int8-") and _folders(artifact_copy) == [folder]
    for graph in ("vision", "decoder"):
        spec = manifest.graph_spec(graph, "int8")
        assert spec.file == f"{folder}/{graph}.onnx" and spec.file in manifest.files
        assert spec.inputs == manifest.graphs[graph].inputs and spec.outputs == manifest.graphs[graph].outputs
    assert f"{folder}/drift-int8.json" in manifest.files
    assert variant.tool == f"onnxruntime.quantization {onnxruntime.__version__}"
    settings = variant.settings
    assert settings["quantizer"] == "onnxruntime" and settings["op_types"] == ["MatMul", "Gemm", "Conv"]
    assert settings["calibration_set"]["samples"] == 2 and settings["calibration_set"]["feeds"]["vision"] == 2
    assert settings["quantized_nodes"]["decoder"]["MatMul"] > 0 and settings["quantized_nodes"]["vision"]["Conv"] == 1
    assert settings["excluded_selection_nodes"] > 0 and settings["fp32_graphs"] == {}
    assert settings["drift"] == drift.summary() and settings["drift_report"] == f"{folder}/drift-int8.json"
    saved = json.loads((artifact_copy / folder / "drift-int8.json").read_text())
    assert saved == json.loads(json.dumps(drift.to_dict()))
    assert not (artifact_copy / STAGING_DIR).exists()


def test_recalibrating_replaces_the_old_folder(artifact_copy, calibration):
    first, _ = calibrate_artifact(artifact_copy, calibration, CalibrationConfig(graphs=("decoder",)), log=lambda s: None)
    old = first.variants["int8"].graphs["decoder"].file.split("/")[0]
    assert first.variants["int8"].graphs["vision"].file == "vision.onnx"  # left in fp32
    assert first.variants["int8"].settings["fp32_graphs"] == {"vision": "vision.onnx"}
    second, _ = calibrate_artifact(artifact_copy, calibration, CalibrationConfig(method="percentile"), log=lambda s: None)
    new = second.variants["int8"].graphs["vision"].file.split("/")[0]
    assert new != old and _folders(artifact_copy) == [new]
    assert not any(name.startswith(old + "/") for name in second.files)
    assert second.variants["int8"].settings["calibrate_method"] == {"vision": "Percentile", "decoder": "Percentile"}
    load_manifest(artifact_copy)


def test_fp8_variant_sits_beside_int8(artifact_copy, calibration):
    calibrate_artifact(artifact_copy, calibration, CalibrationConfig(graphs=("decoder",)), log=lambda s: None)
    manifest, drift = calibrate_artifact(artifact_copy, calibration, CalibrationConfig(precision="fp8", graphs=("decoder",)), log=lambda s: None)
    assert sorted(manifest.variants) == ["fp8", "int8"] and len(_folders(artifact_copy)) == 2
    assert manifest.graph_spec("decoder", "fp8").file.startswith("fp8-")
    assert manifest.variants["fp8"].settings["ort_session_config"] == {"session.disable_quant_qdq": "1"}
    assert drift.precision == "fp8" and 0 <= drift.summary()["greedy_agreement_mean"] <= 1
    load_manifest(artifact_copy)


@pytest.mark.parametrize("where", ["check_trt", "drift"])
def test_failure_after_staging_leaves_the_artifact_unchanged(artifact_copy, calibration, monkeypatch, where):
    calibrate_artifact(artifact_copy, calibration, CalibrationConfig(graphs=("decoder",)), log=lambda s: None)
    before = (artifact_copy / MANIFEST_NAME).read_bytes()
    folders = _folders(artifact_copy)
    staged = []
    if where == "check_trt":
        def fake_check(path, config):
            staged.append(Path(path))
            assert Path(path).is_file()  # the graph was staged before the check
            return [TrtIssue("node_x", "MatMul", "injected failure")]

        monkeypatch.setattr(quantize, "check_trt", fake_check)
        expected = pytest.raises(ExportError, match="injected failure")
    else:
        def fake_compare(*args, **kwargs):
            staged.extend((artifact_copy / STAGING_DIR).rglob("*.onnx"))
            raise RuntimeError("injected drift failure")

        monkeypatch.setattr(quantize, "compare", fake_compare)
        expected = pytest.raises(RuntimeError, match="injected drift failure")
    with expected:
        calibrate_artifact(artifact_copy, calibration, CalibrationConfig(), log=lambda s: None)
    assert staged and not any(p.exists() for p in staged)
    assert (artifact_copy / MANIFEST_NAME).read_bytes() == before
    assert _folders(artifact_copy) == folders and not (artifact_copy / STAGING_DIR).exists()
    load_manifest(artifact_copy)


def test_runtime_pipeline_runs_the_int8_variant(artifact_copy, calibration):
    from prunert.runtime import VLMPipeline

    if "precision" not in inspect.signature(VLMPipeline).parameters:
        pytest.skip("VLMPipeline has no precision= argument yet")
    calibrate_artifact(artifact_copy, calibration, CalibrationConfig(), log=lambda s: None)
    pipe = VLMPipeline(artifact_copy, precision="int8")
    assert pipe.vision.spec.file.startswith("int8-")
    sample = calibration.samples[0]
    (result,) = pipe.generate([sample.image], [sample.prompt])
    assert result.kept_indices.shape == (16,) and result.token_ids
