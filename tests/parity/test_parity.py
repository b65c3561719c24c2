"""Parity: the exported pipeline against the PyTorch reference passes on the tiny artifact, a
perturbed or different reference FAILs (exit 1, never a warning), and a greedy near-tie is a TIE."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prunert import cli
from prunert.adapters.llava import export as llava_export
from prunert.adapters.llava import synthetic
from prunert.config import ParityTolerances
from prunert.manifest import load_manifest
from prunert.parity.reference import _compare_greedy, run_parity
from prunert.parity.report import FAIL, PASS, TIE, Check, ParityReport

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"
STAGES = {"source", "pixels:pixel_values", "token ids", "visual tokens before pruning", "kept indices", "kept tokens", "prefill logits",
          "greedy tokens"}


@pytest.fixture(scope="module")
def passing_report(tiny_artifact: Path) -> ParityReport:
    return run_parity(tiny_artifact, PHOTO, PROMPT)


def test_run_parity_passes_every_check(passing_report: ParityReport) -> None:
    report = passing_report
    assert {check.stage for check in report.checks} == STAGES
    failed = [check for check in report.checks if check.status != PASS]
    assert not failed, report.table()
    assert report.passed and report.verdict == PASS
    assert report.synthetic is True and report.source == "synthetic:llava-tiny"
    greedy = next(check for check in report.checks if check.stage == "greedy tokens")
    assert greedy.value == f"{ParityTolerances().greedy_tokens}/{ParityTolerances().greedy_tokens} agree"


def test_cli_parity_pass_writes_report(capsys, artifact_copy: Path) -> None:
    code = cli.main(["parity", str(artifact_copy), "--image", str(PHOTO), "--prompt", PROMPT])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == "parity: PASS"
    written = json.loads((artifact_copy / "parity.json").read_text())
    assert written["verdict"] == PASS
    assert {check["stage"] for check in written["checks"]} == STAGES
    assert all(check["status"] == PASS for check in written["checks"])
    load_manifest(artifact_copy)  # the report beside the graphs does not break the artifact


def test_perturbed_adapter_fails_before_pruning(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference does not run the adapter's vision code: an adapter whose tokens drift from HF's fails the stage
    "visual tokens before pruning", while the exported graph still matches HF's own tokens."""
    original = llava_export.LlavaExportAdapter.vision_features

    def perturbed(self, pixel_values, extras=()):
        features = original(self, pixel_values, extras)
        return {**features, "tokens": features["tokens"] + 0.05}  # the adapter's projector output, shifted

    monkeypatch.setattr(llava_export.LlavaExportAdapter, "vision_features", perturbed)
    report = run_parity(tiny_artifact, PHOTO, PROMPT)
    assert report.verdict == FAIL and not report.passed
    status = {(check.stage, check.metric): check.status for check in report.checks}
    assert status[("visual tokens before pruning", "max abs diff")] == FAIL
    assert status[("kept tokens", "max abs diff")] == PASS and status[("prefill logits", "max abs diff")] == PASS


def test_perturbed_hf_reference_fails(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF's get_image_features is the reference of the kept tokens: shifting it fails both vision stages."""
    from transformers.models.llava.modeling_llava import LlavaModel

    original = LlavaModel.get_image_features

    def perturbed(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.pooler_output = [tokens + 0.05 for tokens in out.pooler_output]  # HF's projector output, shifted
        return out

    monkeypatch.setattr(LlavaModel, "get_image_features", perturbed)
    report = run_parity(tiny_artifact, PHOTO, PROMPT)
    assert report.verdict == FAIL and not report.passed
    status = {(check.stage, check.metric): check.status for check in report.checks}
    assert status[("visual tokens before pruning", "max abs diff")] == FAIL
    assert status[("kept tokens", "max abs diff")] == FAIL
    assert status[("pixels:pixel_values", "max abs diff")] == PASS and status[("token ids", "equal")] == PASS


def test_cli_parity_against_another_checkpoint_exits_1(capsys, tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same shapes and tokenizer, different seed: every model-dependent stage must FAIL."""
    monkeypatch.setitem(synthetic.PRESETS, "llava-tiny-seed1", replace(synthetic.PRESETS["llava-tiny"], seed=1))
    other = synthetic.write_checkpoint("llava-tiny-seed1", tmp_path / "seed1")
    report_path = tmp_path / "parity.json"
    code = cli.main(["parity", str(tiny_artifact), "--image", str(PHOTO), "--prompt", PROMPT, "--model", str(other), "--out", str(report_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.rstrip().splitlines()[-1] == "parity: FAIL"
    assert "Traceback" not in captured.err
    written = json.loads(report_path.read_text())
    assert written["verdict"] == FAIL and written["source"] == str(other)
    status = {(c["stage"].split(" (")[0], c["metric"]): c["status"] for c in written["checks"]}
    assert status[("kept indices", "set overlap")] == FAIL
    assert status[("kept tokens", "max abs diff")] == FAIL
    assert status[("prefill logits", "max abs diff")] == FAIL
    assert not (tiny_artifact / "parity.json").exists()


def test_cli_parity_bad_input_exits_2(capsys, error_line, tiny_artifact: Path, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code = cli.main(["parity", str(tiny_artifact), "--image", str(PHOTO), "--prompt", PROMPT, "--model", str(bert), "--out", str(tmp_path / "p.json")])
    assert code == 2
    error_line(capsys.readouterr().err, str(bert), "'bert'")
    code = cli.main(["parity", str(tiny_artifact), "--image", str(tmp_path / "none.jpg"), "--prompt", PROMPT, "--out", str(tmp_path / "p.json")])
    assert code == 2
    error_line(capsys.readouterr().err, "none.jpg", "not found")
    assert not (tmp_path / "p.json").exists()


# ---------------------------------------------------------------------------------------- greedy comparison


def _scores(steps: int, margins: dict[int, float], vocab: int = 8) -> list[np.ndarray]:
    """Reference scores whose top-1 is token 1 with the given top-2 margin per step (default 2.0)."""
    scores = []
    for step in range(steps):
        row = np.zeros(vocab, np.float32)
        row[1], row[2] = 5.0, 5.0 - margins.get(step, 2.0)
        scores.append(row)
    return scores


TOL = ParityTolerances()


def test_compare_greedy_identical_passes() -> None:
    check = _compare_greedy([1, 1, 1, 1], [1, 1, 1, 1], _scores(4, {}), TOL)
    assert check.status == PASS and check.value == "4/4 agree"


def test_compare_greedy_near_tie_is_tie_not_fail() -> None:
    margin = TOL.tie_margin / 2
    check = _compare_greedy([1, 1, 2, 7], [1, 1, 1, 1], _scores(4, {2: margin}), TOL)
    assert check.status == TIE
    assert check.value == "2/4 agree" and "step 2" in check.detail
    report = ParityReport("a", "s", True, "onnxruntime", "fp32", {}, "i", "p", [Check("x", "y", 0.0, "", PASS), check])
    assert report.passed and report.verdict == PASS  # a TIE is reported, not a failure


def test_compare_greedy_margin_exactly_at_tolerance_is_tie() -> None:
    check = _compare_greedy([2], [1], _scores(1, {0: TOL.tie_margin}), TOL)
    assert check.status == TIE


def test_compare_greedy_clear_mismatch_fails() -> None:
    check = _compare_greedy([1, 3, 1], [1, 1, 1], _scores(3, {1: 0.5}), TOL)
    assert check.status == FAIL
    assert "step 1" in check.detail and "ours 3" in check.detail and "reference 1" in check.detail
    report = ParityReport("a", "s", True, "onnxruntime", "fp32", {}, "i", "p", [check])
    assert not report.passed and report.verdict == FAIL and report.to_dict()["verdict"] == FAIL


def test_compare_greedy_length_mismatch_fails() -> None:
    check = _compare_greedy([1, 1], [1, 1, 1], _scores(3, {}), TOL)
    assert check.status == FAIL and "lengths 2 vs 3" in check.detail


def test_report_table_and_json(tmp_path: Path) -> None:
    report = ParityReport("art", "src", False, "onnxruntime", "fp32", {}, "img", "prompt")
    report.add_max_abs("logits", np.zeros((2, 3)), np.full((2, 3), 1e-2, np.float32), 1e-3)
    report.add_cosine("logits", np.ones(4), np.ones(4), 0.999)
    report.add_max_abs("shape", np.zeros((2, 3)), np.zeros((3, 2)), 1e-3)
    assert [c.status for c in report.checks] == [FAIL, PASS, FAIL]
    assert "FAIL" in report.table() and report.verdict == FAIL
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == FAIL
