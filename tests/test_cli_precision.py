"""`prunert convert / calibrate / build` and `run` / `parity` / `inspect` at a precision: the commands
wire the back ends, pick the variant's graphs, apply the precision's parity bars, and fail with one
`prunert: error:` line (exit 2) on bad input. The int8 runtime path and `build` import no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunert import cli
from prunert.config import PRECISION_TOLERANCES
from prunert.manifest import MANIFEST_NAME, load_manifest

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is the astronaut holding?"


@pytest.fixture(scope="module")
def precise_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact with fp16 (convert) and int8 (calibrate) variants, made through the CLI."""
    import shutil

    out = tmp_path_factory.mktemp("precise") / "artifact"
    shutil.copytree(tiny_artifact, out)
    assert cli.main(["convert", str(out), "--precision", "fp16", "--max-samples", "2"]) == 0
    assert cli.main(["calibrate", str(out), "--precision", "int8", "--max-samples", "3"]) == 0
    assert cli.main(["calibrate", str(out), "--precision", "fp8", "--max-samples", "2"]) == 0
    return out


def test_variants_are_listed_and_inspected(prunert_main, precise_artifact: Path) -> None:
    manifest = load_manifest(precise_artifact)  # every hash verifies, the variants' files included
    assert sorted(manifest.variants) == ["fp16", "fp8", "int8"]
    assert manifest.variants["int8"].tool.startswith("onnxruntime.quantization")
    code, out, _ = prunert_main("inspect", precise_artifact)
    assert code == 0 and "fp16 by prunert.export.precision" in out and "int8 by onnxruntime.quantization" in out


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_run_at_a_precision(prunert_main, precise_artifact: Path, precision: str) -> None:
    code, out, err = prunert_main("run", precise_artifact, "--precision", precision, "--image", PHOTO, "--prompt", PROMPT,
                           "--max-new-tokens", "3", "--no-stream")
    assert code == 0, err
    assert f"onnxruntime {precision}" in err


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_parity_applies_the_precision_bars(prunert_main, precise_artifact: Path, tmp_path: Path, precision: str) -> None:
    out_path = tmp_path / "parity.json"
    code, out, err = prunert_main("parity", precise_artifact, "--precision", precision, "--image", PHOTO, "--prompt", PROMPT,
                           "--out", out_path)
    report = json.loads(out_path.read_text())
    assert code == (0 if report["verdict"] == "PASS" else 1), err
    assert report["precision"] == precision and report["backend"] == "onnxruntime"
    bars = PRECISION_TOLERANCES[precision]
    assert report["tolerances"]["kept_min_overlap"] == bars["kept_min_overlap"]
    assert report["tolerances"]["logits_min_cosine"] == bars["logits_min_cosine"]
    bounds = {(c["stage"].split(" (")[0], c["metric"]): c["bound"] for c in report["checks"]}
    assert bounds[("kept indices", "set overlap")] == f">= {bars['kept_min_overlap']:g}"
    assert bounds[("prefill logits", "cosine")] == f">= {bars['logits_min_cosine']:g}"
    assert bounds[("prefill logits", "max abs diff")] == "(reported)"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "{a}", "--precision", "fp64", "--image", str(PHOTO), "--prompt", PROMPT], "--precision: got 'fp64'"),
        (["run", "{a}", "--precision", "bf16", "--image", str(PHOTO), "--prompt", PROMPT], "no bf16 graphs"),
        (["run", "{a}", "--backend", "trt", "--image", str(PHOTO), "--prompt", PROMPT], "tensorrt"),
        (["run", "{a}", "--backend", "ort-cuda", "--image", str(PHOTO), "--prompt", PROMPT], "onnxruntime-gpu"),
        (["convert", "{a}", "--precision", "int8"], "--precision: got 'int8', expected one of ['fp16', 'bf16']"),
        (["convert", "{a}", "--precision", "fp16", "--fp32-layer", "*no-such-layer*"], "no-such-layer"),
        (["calibrate", "{a}", "--precision", "fp16"], "--precision: got 'fp16', expected one of ['int8', 'fp8']"),
        (["calibrate", "{a}", "--precision", "int8", "--images", "/nonexistent/dir"], "/nonexistent/dir"),
        (["calibrate", "{a}", "--precision", "int8", "--calibration-method", "mse"], "--calibration-method: got 'mse'"),
        (["build", "{a}", "--precision", "int3"], "--precision: got 'int3'"),
        (["run", "{a}", "--precision", "int4", "--image", str(PHOTO), "--prompt", PROMPT], "prunert quantize ARTIFACT --weights int4"),
        (["build", "{a}", "--max-batch", "0"], "--max-batch: got 0"),
        (["build", "{a}", "--graph", "audio"], "graphs: got ['audio']"),
        (["build", "{a}"], "tensorrt"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(prunert_main, error_line, artifact_copy: Path, args: list[str], needle: str) -> None:
    before = {p: p.read_bytes() for p in sorted(artifact_copy.rglob("*")) if p.is_file()}
    code, _, err = prunert_main(*[a.format(a=artifact_copy) for a in args])
    assert code == 2
    error_line(err, needle)
    after = {p: p.read_bytes() for p in sorted(artifact_copy.rglob("*")) if p.is_file()}
    assert after == before and (artifact_copy / MANIFEST_NAME).is_file()


def test_int8_run_build_and_convert_without_torch(python_without, precise_artifact: Path) -> None:
    result = python_without(
        """
        from prunert import cli
        artifact, photo = sys.argv[1:3]
        code = cli.main(["run", artifact, "--precision", "int8", "--image", photo, "--prompt", "<image> Hi?", "--max-new-tokens", "2"])
        assert code == 0, code
        assert cli.main(["build", artifact, "--precision", "int8"]) == 2  # no tensorrt here: a clean error, not a torch import
        assert cli.main(["convert", artifact, "--precision", "bf16", "--max-samples", "1"]) == 0  # onnx + ORT only: runs on a target
        assert_no_heavy_modules()
        print("ok")
        """,
        precise_artifact,
        PHOTO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
    assert "tensorrt" in result.stderr and "Traceback" not in result.stderr
