"""`prunert quantize --weights int4` on the tiny artifact: the variant, its two forms holding the same int4 numbers,
`run` / `parity` / `check-trt` on it, and bad input (exit 2, one line, the artifact untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from prunert.calibration.weight_only import unpack_matmulnbits
from prunert.config import FUSED_DECODER, PRECISION_TOLERANCES
from prunert.manifest import MANIFEST_NAME, load_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "calibration"
PHOTO = EXAMPLES / "astronaut.jpg"
PROMPT = "<image> What is shown in this image?"


@pytest.fixture(scope="module")
def int4_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact with an AWQ int4 variant (block 64), made once through the CLI. Read-only!"""
    import shutil

    from prunert import cli

    out = tmp_path_factory.mktemp("int4") / "artifact"
    shutil.copytree(tiny_artifact, out)
    assert cli.main(["quantize", str(out), "--weights", "int4", "--algo", "awq", "--block-size", "64", "--max-samples", "3"]) == 0
    return out


def _int4_values(path: Path, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Every int4 number and scale of a graph, sorted (a multiset: the fused form concatenates q/k/v, gate/up)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values, scales = [], []
    for node in model.graph.node:
        if form == "dq" and node.op_type == "DequantizeLinear":
            values.append(inits[node.input[0]].astype(np.int8).reshape(-1))
            scales.append(inits[node.input[1]].reshape(-1))
        elif form == "nbits" and node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            int4 = unpack_matmulnbits(inits[node.input[1]], inits[node.input[2]], attrs["K"], attrs["block_size"])
            values.append(int4.values.reshape(-1))
            scales.append(int4.scales.reshape(-1))
    return np.sort(np.concatenate(values)), np.sort(np.concatenate(scales))


def test_quantize_adds_the_int4_variant_with_its_settings(int4_artifact: Path) -> None:
    manifest = load_manifest(int4_artifact)  # every listed file hashed
    variant = manifest.variants["int4"]
    assert variant.tool.startswith("prunert.calibration.weight_only (awq)")
    settings = variant.settings
    assert (settings["algo"], settings["block_size"], settings["lm_head"], settings["accuracy_level"]) == ("awq", 64, "int4", 4)
    assert settings["summaries"]["decoder"]["algo"] == "awq" and settings["summaries"]["decoder"]["error_ratio"] <= 1.0
    assert settings["calibration_set"]["samples"] == 3 and settings["drift"]["decoder"]["kept_overlap_min"] == 1.0
    assert variant.graphs["vision"] == manifest.graphs["vision"]  # fp32: the selection stays exact
    folder = variant.graphs["decoder"].file.split("/")[0]
    assert folder.startswith("int4-") and f"{folder}/drift-int4.json" in manifest.files
    dq = onnx.load(str(int4_artifact / variant.graphs["decoder"].file), load_external_data=False)
    assert {(o.domain, o.version) for o in dq.opset_import} == {("", 21)}
    assert sum(n.op_type == "DequantizeLinear" for n in dq.graph.node) == settings["summaries"]["decoder"]["quantized_matmuls"] > 0
    assert sum(n.op_type == "Mul" and n.name.endswith("_awq_mul") for n in dq.graph.node) > 0


def test_the_fused_form_holds_the_same_int4_numbers(int4_artifact: Path) -> None:
    manifest = load_manifest(int4_artifact, verify_hashes=False)
    if FUSED_DECODER not in manifest.graphs:
        pytest.skip("this export writes no fused decoder")
    variant = manifest.variants["int4"]
    fused = onnx.load(str(int4_artifact / variant.graphs[FUSED_DECODER].file), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in fused.graph.node)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (int4_artifact / variant.graphs["decoder"].file).parent.iterdir()}
    assert len(set(modes.values())) == 1, modes  # external data too: not onnx's 0600
    assert not any(n.op_type == "MatMul" and n.input[1] in {i.name for i in fused.graph.initializer} for n in fused.graph.node)
    dq_values, dq_scales = _int4_values(int4_artifact / variant.graphs["decoder"].file, "dq")
    nb_values, nb_scales = _int4_values(int4_artifact / variant.graphs[FUSED_DECODER].file, "nbits")
    np.testing.assert_array_equal(dq_values, nb_values)
    np.testing.assert_allclose(dq_scales, nb_scales, rtol=1e-6)


def test_run_and_check_trt_on_the_int4_variant(int4_artifact: Path, prunert_main) -> None:
    code, out, err = prunert_main("run", int4_artifact, "--precision", "int4", "--image", PHOTO, "--prompt", PROMPT,
                                  "--max-new-tokens", "3", "--no-stream")
    assert code == 0, err
    assert "onnxruntime int4" in err
    code, out, err = prunert_main("check-trt", int4_artifact)
    assert code == 0, out + err
    decoder = load_manifest(int4_artifact, verify_hashes=False).variants["int4"].graphs["decoder"].file
    line = next(line for line in out.splitlines() if line.startswith(f"OK  {decoder}:"))
    assert "DequantizeLinear" in line and line.endswith("opset <= 21, int4 weight-only rules")


def test_parity_applies_the_int4_bars(int4_artifact: Path, prunert_main, tmp_path: Path) -> None:
    out_path = tmp_path / "parity.json"
    code, out, err = prunert_main("parity", int4_artifact, "--precision", "int4", "--image", PHOTO, "--prompt", PROMPT, "--out", out_path)
    report = json.loads(out_path.read_text())
    assert code == (0 if report["verdict"] == "PASS" else 1), err
    bounds = {(c["stage"].split(" (")[0], c["metric"]): c for c in report["checks"]}
    kept = next(c for key, c in bounds.items() if key[0] == "kept indices")
    assert report["tolerances"]["kept_min_overlap"] == 1.0 and kept["status"] == "PASS"  # the vision graph is fp32
    assert bounds[("prefill logits", "KL (last)")]["bound"] == f"<= {PRECISION_TOLERANCES['int4']['logits_max_kl']:g}"


def test_quantizing_again_replaces_the_old_folder(int4_artifact: Path, tmp_path: Path, prunert_main) -> None:
    import shutil

    copy = tmp_path / "again"
    shutil.copytree(int4_artifact, copy)
    before = load_manifest(copy).variants["int4"].graphs["decoder"].file.split("/")[0]
    code, out, err = prunert_main("quantize", copy, "--weights", "int4", "--algo", "gptq", "--lm-head", "fp32", "--max-samples", "2")
    assert code == 0, err
    variant = load_manifest(copy).variants["int4"]
    after = variant.graphs["decoder"].file.split("/")[0]
    assert after != before and not (copy / before).exists() and (copy / after).is_dir()
    assert variant.settings["lm_head"] == "fp32" and variant.settings["summaries"]["decoder"]["kept_float_matmuls"] == 1
    assert variant.settings["algo"] == "gptq" and variant.settings["summaries"]["decoder"]["error_ratio"] < 1.0
    if FUSED_DECODER in variant.graphs:  # GPTQ's numbers, not a re-rounding, in the fused form too
        dq = _int4_values(copy / variant.graphs["decoder"].file, "dq")
        nbits = _int4_values(copy / variant.graphs[FUSED_DECODER].file, "nbits")
        np.testing.assert_array_equal(dq[0], nbits[0])
        np.testing.assert_allclose(dq[1], nbits[1], rtol=1e-6)


@pytest.mark.parametrize("args, needle", [
    (["--weights", "int4", "--block-size", "48"], "--block-size: got 48, expected one of [32, 64, 128]"),
    (["--weights", "int3"], "--weights: got 'int3', expected one of ['int4']"),
    (["--weights", "int4", "--graphs", "foo"], "--graphs: got ['foo'], expected ['decoder']"),
    (["--weights", "int4", "--algo", "sq"], "--algo: got 'sq', expected one of ['rtn', 'awq', 'gptq']"),
    (["--weights", "int4", "--images", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_bad_input_is_one_line_and_leaves_the_artifact_alone(artifact_copy: Path, prunert_main, error_line, args, needle) -> None:
    before = (artifact_copy / MANIFEST_NAME).read_bytes()
    entries = sorted(p.name for p in artifact_copy.iterdir())
    code, out, err = prunert_main("quantize", artifact_copy, *args)
    assert code == 2
    error_line(err, needle)
    assert (artifact_copy / MANIFEST_NAME).read_bytes() == before and sorted(p.name for p in artifact_copy.iterdir()) == entries


def test_not_an_artifact_is_one_line(tmp_path: Path, prunert_main, error_line) -> None:
    code, out, err = prunert_main("quantize", tmp_path, "--weights", "int4")
    assert code == 2
    error_line(err, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_build_takes_the_tensorrt_form(int4_artifact: Path, tmp_path: Path, fake_trt) -> None:
    import shutil

    from prunert.config import EngineBuildConfig
    from prunert.engines.builder import build_engines

    copy = tmp_path / "build"
    shutil.copytree(int4_artifact, copy)
    before = load_manifest(copy)
    manifest = build_engines(copy, EngineBuildConfig(precision="int4", workspace_bytes=1 << 28), log=lambda message: None)
    built = {engine.graph: engine.onnx_sha256 for engine in manifest.engines if engine.precision == "int4"}
    variant = before.variants["int4"]
    assert built == {"vision": before.files[variant.graphs["vision"].file], "decoder": before.files[variant.graphs["decoder"].file]}


def test_eval_runs_the_int4_variant(int4_artifact: Path, tmp_path: Path, prunert_main) -> None:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"image": str(EXAMPLES / name), "question": "What is shown?", "answer": "cat"}) + "\n"
                            for name in ("astronaut.jpg", "coffee.jpg")))
    out = tmp_path / "eval.json"
    code, stdout, err = prunert_main("eval", int4_artifact, "--data", data, "--precision", "int4", "--max-new-tokens", "2", "--out", out)
    assert code == 0, err
    row = json.loads(out.read_text())["artifacts"][0]
    assert row["precision"] == "int4" and len(row["predictions"]) == 2
