"""`prunert export --dtype`: the checkpoint exported in its own dtype (fp16 weights behind float32 graph I/O, the
selection op fp32), recorded in the manifest, validated by ONNX Runtime only after the torch weights are freed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from prunert.adapters.hf_loading import checkpoint_dtype
from prunert.config import SELECTION_SCOPE, ExportConfig
from prunert.errors import ArtifactError, ConfigError
from prunert.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"
TINY = "synthetic:llava-tiny"


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory: pytest.TempPathFactory, tiny_settings: dict) -> dict:
    """synthetic:llava-tiny exported with `--dtype fp16` through the CLI, recording, at every ONNX Runtime session
    created during the export, how many bytes of torch weights the export adapter still held."""
    import onnxruntime

    from prunert import cli
    from prunert.export import pipeline

    adapters, held = [], []
    load, session = pipeline.load_export_adapter, onnxruntime.InferenceSession

    def recording_load(*args, **kwargs):
        adapters.append(load(*args, **kwargs))
        return adapters[-1]

    def recording_session(path, *args, **kwargs):
        model = adapters[-1].model
        held.append((Path(str(path)).name, sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()))))
        return session(path, *args, **kwargs)

    out = tmp_path_factory.mktemp("dtype") / "tiny-fp16"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_export_adapter", recording_load)
        patch.setattr(onnxruntime, "InferenceSession", recording_session)
        code = cli.main(["export", "--model", TINY, "--budget", str(tiny_settings["budget"]), "--dtype", "fp16", "--out", str(out),
                         "--max-prompt-tokens", str(tiny_settings["max_prompt_tokens"]), "--max-new-tokens", str(tiny_settings["max_new_tokens"])])
    return {"code": code, "artifact": out, "held": held, "weights": adapters}


def test_fp16_export_records_its_dtype(fp16_export: dict) -> None:
    assert fp16_export["code"] == 0
    manifest = load_manifest(fp16_export["artifact"])
    assert manifest.source.dtype == "fp16"
    for name in ("vision", "decoder"):  # their graph I/O stays float32: the runtime feeds the same arrays
        spec = manifest.graphs[name]
        assert {t.dtype for t in (*spec.inputs, *spec.outputs)} <= {"float32", "int64"}


def test_fp16_export_has_fp16_weights_and_an_fp32_selection(fp16_export: dict) -> None:
    from prunert.export.precision_islands import element_types, name_scopes

    for name in ("vision.onnx", "decoder.onnx"):
        model = onnx.load(str(fp16_export["artifact"] / name))
        weights = [t for t in model.graph.initializer if np.prod(t.dims) >= 1024]  # the matrices, not shape constants
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), name
        assert {i.type.tensor_type.elem_type for i in model.graph.input} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    vision = onnx.load(str(fp16_export["artifact"] / "vision.onnx"))
    types = element_types(vision)
    selection = [node for node in vision.graph.node if SELECTION_SCOPE in name_scopes(node)]
    assert selection  # the scope is found: the check below is not vacuous
    assert not [out for node in selection for out in node.output if types.get(out) == onnx.TensorProto.FLOAT16]


def test_torch_weights_are_freed_before_any_onnx_runtime_session(fp16_export: dict) -> None:
    """Every validation session (vision, decoder, and any later graph) opens with no torch weight bytes left."""
    held = fp16_export["held"]
    assert {name for name, _ in held} >= {"vision.onnx", "decoder.onnx"}
    assert [(name, size) for name, size in held if size] == []
    assert sum(t.numel() for t in fp16_export["weights"][0].model.parameters()) == 0


def test_fp16_artifact_runs_and_passes_parity_at_its_dtype_bars(fp16_export: dict, prunert_main, tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    shutil.copytree(fp16_export["artifact"], artifact)
    code, out, err = prunert_main("run", artifact, "--image", PHOTO, "--prompt", PROMPT, "--max-new-tokens", "4")
    assert code == 0, err
    code, out, err = prunert_main("parity", artifact, "--image", PHOTO, "--prompt", PROMPT, "--out", tmp_path / "parity.json")
    assert code == 0, out + err
    assert "the fp16 bars" in out and "parity: PASS" in out
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["tolerances"]["logits_max_abs"] is None  # fp16's bars, not fp32's 1e-3 on fp16 weights


@pytest.mark.parametrize("value", ["int8", "bf16", "float16"])
def test_bad_dtype_is_one_line_exit_2(value: str, prunert_main, error_line, tmp_path: Path) -> None:
    code, _, err = prunert_main("export", "--model", TINY, "--dtype", value, "--out", tmp_path / "x")
    assert code == 2
    error_line(err, "--dtype", repr(value), "fp16")
    assert not (tmp_path / "x").exists()


def test_default_dtype_is_the_checkpoints_own() -> None:
    assert checkpoint_dtype({"torch_dtype": "float16"}) == "fp16"  # llava-hf checkpoints
    assert checkpoint_dtype({"dtype": "float16"}) == "fp16"  # transformers 5 writes "dtype"
    assert checkpoint_dtype({"torch_dtype": "bfloat16"}) == "fp32"  # no bf16 kernels on ORT CPU; fp16 may overflow
    assert checkpoint_dtype({"dtype": "float32"}) == "fp32"
    assert checkpoint_dtype({}) == "fp32"
    with pytest.raises(ConfigError, match="--dtype"):
        ExportConfig(dtype="fp64")


def test_manifest_dtype_is_strict(artifact_copy: Path, edit_manifest) -> None:
    """An unknown source.dtype is an ArtifactError; a manifest written before the field loads as fp32."""
    edit_manifest(artifact_copy, lambda data: data["source"].update(dtype="fp64"))
    with pytest.raises(ArtifactError, match="source.dtype"):
        load_manifest(artifact_copy)
    edit_manifest(artifact_copy, lambda data: data["source"].pop("dtype"))
    assert load_manifest(artifact_copy).source.dtype == "fp32"


def test_own_weights_keeps_the_model_and_leaves_nothing_in_the_checkpoint_mapping() -> None:
    """Linears become MatMulLinear (weights [in, out]: the exporter folds no transposed copy), every tensor is copied
    out of the safetensors mapping, and the model computes what it did."""
    import torch

    from prunert.adapters import resolve_source
    from prunert.export.pipeline import load_export_adapter
    from prunert.export.weights import MatMulLinear, _inside, _mapped_checkpoint_ranges, own_weights

    adapter = load_export_adapter(resolve_source(TINY), "fp32")
    pixels = adapter.example_vision_inputs(2)
    head = adapter.model.lm_head.weight.detach().clone()  # [V, D]
    with torch.no_grad():
        before = adapter.vision_features(*pixels)["tokens"]  # [B, N, D]
    assert any(_inside(p, _mapped_checkpoint_ranges()) for p in adapter.model.parameters())  # transformers maps the file
    assert own_weights(adapter.model) > 0
    assert not [m for m in adapter.model.modules() if type(m) is torch.nn.Linear]
    assert isinstance(adapter.model.lm_head, MatMulLinear) and torch.equal(adapter.model.lm_head.weight, head)
    assert not [n for n, p in adapter.model.named_parameters() if _inside(p, _mapped_checkpoint_ranges())]
    with torch.no_grad():
        after = adapter.vision_features(*pixels)["tokens"]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
