"""Non-finite visual tokens are an error of the runtime (prunert.runtime.finite), not tokens for the LLM.

The tiny artifact's vision graph is edited (a copy) so that its visual_tokens really come out NaN / inf in ONNX
Runtime, as an fp16 overflow in the vision tower makes them: VLMPipeline.encode_images and `prunert run` stop with
one line naming the graph, its file and precision, with the hint for an fp32 island where one applies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from prunert.errors import PrunertError
from prunert.manifest import load_manifest
from prunert.runtime import Artifact, VLMPipeline
from prunert.runtime.finite import NonFiniteOutputError, check_finite_outputs

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"


# ----------------------------------------------------------------------------------------- the check


def test_finite_outputs_pass() -> None:
    outputs = {"visual_tokens": np.ones((2, 4, 3), np.float32), "kept_indices": np.arange(8).reshape(2, 4)}
    check_finite_outputs(outputs, "vision", "vision.fp16.onnx", "fp16", "onnxruntime")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("precision, hint", [("fp16", "--fp32-layer"), ("bf16", "--fp32-layer"), ("fp32", "fp32 graph itself"), ("int8", "calibrate")])
def test_non_finite_output_is_one_line_naming_graph_and_precision(bad: float, precision: str, hint: str) -> None:
    tokens = np.ones((2, 4, 3), np.float32)
    tokens[1, 2, 0] = bad
    with pytest.raises(NonFiniteOutputError) as info:
        check_finite_outputs({"visual_tokens": tokens}, "vision", f"vision.{precision}.onnx", precision, "onnxruntime")
    message = str(info.value)
    assert isinstance(info.value, PrunertError) and info.value.exit_code == 2
    assert "\n" not in message
    for needle in ("vision graph", f"vision.{precision}.onnx", f"({precision},", "visual_tokens", "[1, 2, 0]", hint):
        assert needle in message, (needle, message)
    if hint == "--fp32-layer":
        assert f"prunert convert ARTIFACT --precision {precision} --fp32-layer PATTERN" in message


def test_half_precision_outputs_are_checked_too() -> None:
    half = np.ones((1, 2, 3), np.float16)
    half[0, 1, 2] = np.float16(70000.0)  # beyond fp16's 65504: inf
    with pytest.raises(NonFiniteOutputError, match="inf"):
        check_finite_outputs({"visual_tokens": half}, "vision", "vision.fp16.onnx", "fp16", "trt")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    brain = np.full((1, 2, 3), np.nan, np.float32).astype(ml_dtypes.bfloat16)
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        check_finite_outputs({"visual_tokens": brain}, "vision", "vision.bf16.onnx", "bf16", "trt")


# ----------------------------------------------------------------------------------------- a vision graph that overflows


@pytest.fixture(scope="module")
def overflowing_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny artifact whose vision graph multiplies visual_tokens by [inf, 1, 1, ...]: entry 0 of
    every token becomes +-inf (NaN where it was 0). Its hash no longer matches: loaded with verification off."""
    copy = tmp_path_factory.mktemp("overflow") / "artifact"
    shutil.copytree(tiny_artifact, copy)
    spec = load_manifest(copy).graph_spec("vision", "fp32")
    path = copy / spec.file
    model = onnx.load(str(path))
    out = next(o for o in model.graph.output if o.name == "visual_tokens")
    width = out.type.tensor_type.shape.dim[-1].dim_value
    producer = next(n for n in model.graph.node if "visual_tokens" in n.output)
    producer.output[list(producer.output).index("visual_tokens")] = "visual_tokens_finite"
    poison = np.ones(width, np.float32)
    poison[0] = np.inf
    model.graph.initializer.append(numpy_helper.from_array(poison, "overflow_poison"))
    model.graph.node.append(helper.make_node("Mul", ["visual_tokens_finite", "overflow_poison"], ["visual_tokens"], name="overflow"))
    onnx.save(model, str(path))
    return copy


def test_pipeline_refuses_non_finite_visual_tokens(overflowing_artifact: Path) -> None:
    pipe = VLMPipeline(Artifact(overflowing_artifact, verify_hashes=False))
    with pytest.raises(NonFiniteOutputError, match=r"vision graph '.*' \(fp32, backend onnxruntime\): output 'visual_tokens'"):
        pipe.encode_images([PHOTO], [PROMPT])
    with pytest.raises(NonFiniteOutputError):
        pipe.generate([PHOTO], [PROMPT])


def test_the_unedited_artifact_runs(tiny_pipeline) -> None:
    """The check passes real outputs (the same call as above, on the shared artifact)."""
    vision = tiny_pipeline.encode_images([PHOTO], [PROMPT])
    assert np.isfinite(vision.visual_tokens).all()


def test_cli_run_prints_one_line_and_exits_2(overflowing_artifact: Path, capsys, error_line) -> None:
    from prunert.cli import main

    code = main(["run", str(overflowing_artifact), "--no-verify", "--image", str(PHOTO), "--prompt", PROMPT])
    assert code == 2
    line = error_line(capsys.readouterr().err, "vision graph", "fp32", "visual_tokens", "inf value(s)")
    assert line.startswith("prunert: error: ")
