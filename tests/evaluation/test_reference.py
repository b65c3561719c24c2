"""`prunert eval --reference hf`: the PyTorch checkpoint itself, through Hugging Face's own processor and generate,
answers exactly as the exported unpruned artifact does (the point of the feature), record by record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunert import cli
from prunert.evaluation import EvalConfig, evaluate_artifact, load_records
from prunert.evaluation.reference import evaluate_reference
from prunert.manifest import load_manifest


@pytest.fixture(scope="module")
def reference_result(tiny_unpruned: Path, shapes_set: Path):
    manifest = load_manifest(tiny_unpruned)
    return evaluate_reference(manifest.source.model, load_records(shapes_set), EvalConfig(), manifest.budget.num_visual_tokens,
                              manifest.source, progress=False)


@pytest.mark.parametrize("batch", [1, 8])
def test_hf_answers_as_the_unpruned_artifact(reference_result, tiny_unpruned: Path, shapes_set: Path, batch: int) -> None:
    ours = evaluate_artifact(tiny_unpruned, load_records(shapes_set), EvalConfig(batch=batch), progress=False)
    assert [p.prediction for p in reference_result.predictions] == [p.prediction for p in ours.predictions]
    assert [p.correct for p in reference_result.predictions] == [p.correct for p in ours.predictions]
    assert all(p.prediction for p in ours.predictions)  # something was generated: the comparison is not vacuous


def test_the_reference_result(reference_result, tiny_settings: dict) -> None:
    r = reference_result
    assert (r.artifact, r.method, r.budget, r.precision, r.unpruned) == ("hf:synthetic:llava-tiny", "none", tiny_settings["num_visual_tokens"],
                                                                         "fp32", True)
    assert r.ttft_s is None and r.decode_tok_s is None and r.source.synthetic
    assert [p.line for p in r.predictions] == list(range(1, 9))


def test_cli_reference_row_agreement_and_json(prunert_main, tiny_unpruned: Path, tiny_artifact: Path, shapes_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    code, stdout, err = prunert_main("eval", tiny_unpruned, tiny_artifact, "--data", shapes_set, "--limit", "4", "--reference", "hf", "--out", out)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[3].split()[:4] == ["hf:synthetic:llava-tiny", "none", "100", "fp32"]
    agreement = next(line for line in lines if line.startswith("predictions identical to the reference: "))
    assert agreement.startswith("predictions identical to the reference: #1 4/4, #2 ")
    assert cli.SYNTHETIC_NOTE in lines and not any("is not the one the artifacts were exported from" in line for line in lines)
    data = json.loads(out.read_text())
    assert list(data) == ["artifacts", "reference"]
    assert [e["artifact"] for e in data["artifacts"]] == [str(tiny_unpruned), str(tiny_artifact)]
    assert [p["prediction"] for p in data["reference"]["predictions"]] == [p["prediction"] for p in data["artifacts"][0]["predictions"]]


def test_a_bad_reference_model_fails_before_any_artifact_runs(prunert_main, error_line, monkeypatch, tiny_unpruned: Path, shapes_set: Path,
                                                              tmp_path: Path) -> None:
    import prunert.evaluation.command as command

    monkeypatch.setattr(command, "evaluate_artifact", lambda *a, **k: pytest.fail("an artifact ran before --model was checked"))
    code, _, err = prunert_main("eval", tiny_unpruned, "--data", shapes_set, "--reference", "hf", "--model", tmp_path / "gone")
    assert code == 2
    error_line(err, "not a directory")


def test_missing_torch_fails_before_any_artifact_runs(prunert_main, error_line, monkeypatch, tiny_unpruned: Path, shapes_set: Path) -> None:
    import importlib.util

    import prunert.evaluation.command as command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(command, "evaluate_artifact", lambda *a, **k: pytest.fail("an artifact ran before torch was checked"))
    code, _, err = prunert_main("eval", tiny_unpruned, "--data", shapes_set, "--reference", "hf")
    assert code == 2
    error_line(err, "--reference hf: needs torch", "prunert[export]")


def test_a_processor_whose_image_processor_needs_a_missing_backend_is_one_line(prunert_main, error_line, monkeypatch,
                                                                              tiny_unpruned: Path, shapes_set: Path) -> None:
    """No AutoProcessor and no image processor (a backend missing): one line, before any artifact runs. A missing
    video processor alone (Qwen2.5-VL without torchvision) is left out instead (next test)."""
    import transformers
    from transformers.processing_utils import MODALITY_TO_AUTOPROCESSOR_MAPPING

    import prunert.evaluation.command as command

    def needs_torchvision(*args, **kwargs):
        raise ImportError("\nQwen2VLVideoProcessor requires the Torchvision library but it was not found in your environment.\nMore.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    monkeypatch.setattr(MODALITY_TO_AUTOPROCESSOR_MAPPING["image_processor"], "from_pretrained", needs_torchvision)
    monkeypatch.setattr(command, "evaluate_artifact", lambda *a, **k: pytest.fail("an artifact ran before the reference loaded"))
    code, _, err = prunert_main("eval", tiny_unpruned, "--data", shapes_set, "--reference", "hf")
    assert code == 2
    error_line(err, "--reference hf: Hugging Face's processor for 'synthetic:llava-tiny' does not load here",
               "requires the Torchvision library")


def test_qwen_reference_answers_as_its_unpruned_artifact_without_the_video_processor(prunert_cache: Path, shapes_set: Path,
                                                                                     tmp_path: Path) -> None:
    """Qwen2.5-VL's AutoProcessor needs torchvision for its video processor; the reference is built without it
    (hf_loading.load_hf_processor) and answers each record as the unpruned fp32 artifact does."""
    from prunert.adapters import resolve_source
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact, load_export_adapter

    qwen, out = "synthetic:qwen2.5-vl-tiny", tmp_path / "qwen-none"
    largest_n = load_export_adapter(resolve_source(qwen)).num_visual_tokens  # --method none keeps every image's own N
    manifest = export_artifact(qwen, out, BudgetConfig(budget=largest_n, method="none"), ExportConfig(), log=lambda message: None)
    records = load_records(shapes_set, 4)
    ours = evaluate_artifact(out, records, EvalConfig(), progress=False)
    ref = evaluate_reference(qwen, records, EvalConfig(), manifest.budget.num_visual_tokens, progress=False)
    assert [p.prediction for p in ref.predictions] == [p.prediction for p in ours.predictions]
