"""Export: the manifest contract, the ONNX graphs (checker, opset, symbolic batch), bad budgets and
model directories, and atomic writes (a crash or an existing --out leaves nothing half-written)."""

from __future__ import annotations

from prunert.config import SCHEMA_VERSION

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from prunert import cli, pruning_ops
from prunert.adapters.llava.synthetic import PRESETS
from prunert.config import BudgetConfig, ExportConfig
from prunert.errors import ArtifactError, ConfigError, ModelSourceError
from prunert.export import pipeline as export_pipeline
from prunert.manifest import MANIFEST_NAME, GraphSpec, TensorSpec, load_manifest
from prunert.runtime.runner import OnnxRuntimeRunner

TINY = "synthetic:llava-tiny"
TINY_N = PRESETS["llava-tiny"].num_patches  # 100 visual tokens
NUM_LAYERS = PRESETS["llava-tiny"].text_layers  # 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------- manifest


def test_manifest_has_every_required_field(tiny_artifact: Path, tiny_settings: dict) -> None:
    budget, max_prompt, max_new = (tiny_settings[k] for k in ("budget", "max_prompt_tokens", "max_new_tokens"))
    raw = json.loads((tiny_artifact / MANIFEST_NAME).read_text())
    manifest = load_manifest(tiny_artifact)  # strict parse + hash verification

    assert raw["schema_version"] == manifest.schema_version == SCHEMA_VERSION
    assert len(manifest.source.revision) == 16
    assert manifest.prunert_version
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers"):
        assert package in manifest.versions
    for package in ("torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers"):
        assert manifest.versions[package] != "not installed", package
    assert manifest.opset == 20

    assert manifest.source.model == TINY
    assert manifest.source.family == "llava"
    assert manifest.source.architecture == "LlavaForConditionalGeneration"
    assert manifest.source.synthetic is True

    assert manifest.budget.budget == budget
    assert manifest.budget.method == "resprune"
    assert manifest.budget.num_visual_tokens == TINY_N
    assert manifest.budget.params == pruning_ops.method_params(BudgetConfig(budget=budget))
    assert set(manifest.budget.params) == {"alpha", "relevance", "epsilon", "tau", "normalize", "epsilon_floor", "gram_max_n"}

    text = manifest.text
    assert text.image_token == "<image>"
    assert text.max_prompt_tokens == max_prompt
    assert text.max_sequence == max_prompt - 1 + budget + max_new
    assert text.eos_token_ids and text.bos_token_id is not None
    assert "{prompt}" in text.prompt_template
    assert manifest.decoder.num_layers == NUM_LAYERS
    assert manifest.family_config == {"vision_feature_layer": -2, "image_size": 140}


def test_manifest_io_names_and_symbolic_dims(tiny_artifact: Path, tiny_settings: dict) -> None:
    manifest = load_manifest(tiny_artifact)
    budget = tiny_settings["budget"]
    assert set(manifest.graphs) == {"vision", "decoder", "decoder_fused"}
    vision, decoder = manifest.graphs["vision"], manifest.graphs["decoder"]

    assert [t.name for t in vision.inputs] == ["pixel_values", "text_embeds", "text_mask"]
    assert [t.name for t in vision.outputs] == ["visual_tokens", "kept_indices"]
    assert vision.input("pixel_values").shape == ("batch", 3, 140, 140)
    assert vision.outputs[0].shape == ("batch", budget, 64)
    assert vision.outputs[1] == TensorSpec("kept_indices", "int64", ("batch", budget))

    past = [f"past_key_values.{i}.{kind}" for i in range(NUM_LAYERS) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(NUM_LAYERS) for kind in ("key", "value")]
    assert [t.name for t in decoder.inputs] == ["inputs_embeds", "attention_mask", "position_ids", *past]
    assert [t.name for t in decoder.outputs] == ["logits", *present]
    for graph in (vision, decoder):
        for tensor in (*graph.inputs, *graph.outputs):
            assert tensor.shape[0] == "batch", tensor
        assert graph.external_data is None


def test_manifest_hashes_every_file(tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact)
    on_disk = {p.name for p in tiny_artifact.iterdir() if p.is_file() and p.name != MANIFEST_NAME}
    assert set(manifest.files) == on_disk
    assert {"vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json", "preprocessor_config.json"} <= on_disk
    for name, digest in manifest.files.items():
        assert digest == _sha256(tiny_artifact / name), name
    assert not [p for p in tiny_artifact.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------------------- ONNX graphs


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_onnx_graph_is_valid_and_matches_manifest(tiny_artifact: Path, graph: str) -> None:
    spec: GraphSpec = load_manifest(tiny_artifact).graphs[graph]
    path = tiny_artifact / spec.file
    onnx.checker.check_model(str(path), full_check=True)  # by path: works for external data too
    model = onnx.load(str(path))
    default_opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default_opsets and max(default_opsets) <= 20

    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == [t.name for t in spec.inputs]
    for tensor in spec.inputs:
        dims = inputs[tensor.name].type.tensor_type.shape.dim
        got = tuple(d.dim_param if d.dim_param else d.dim_value for d in dims)
        assert got == tensor.shape, (tensor.name, got)
    for output in model.graph.output:
        batch = output.type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch" and not batch.dim_value, output.name  # never baked to 1


def test_vision_graph_runs_with_batch_1_and_3(tiny_artifact: Path, tiny_settings: dict) -> None:
    spec = load_manifest(tiny_artifact).graphs["vision"]
    budget = tiny_settings["budget"]
    runner = OnnxRuntimeRunner(tiny_artifact / spec.file, spec)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, 140, 140)).astype(np.float32)
    text = rng.standard_normal((3, 4, 64)).astype(np.float32)
    mask = np.ones((3, 4), np.int64)

    one = runner.infer({"pixel_values": pixels[:1], "text_embeds": text[:1], "text_mask": mask[:1]})
    three = runner.infer({"pixel_values": pixels, "text_embeds": text, "text_mask": mask})
    assert one["visual_tokens"].shape == (1, budget, 64) and one["kept_indices"].shape == (1, budget)
    assert three["visual_tokens"].shape == (3, budget, 64) and three["kept_indices"].shape == (3, budget)
    np.testing.assert_array_equal(one["kept_indices"][0], three["kept_indices"][0])
    np.testing.assert_allclose(one["visual_tokens"][0], three["visual_tokens"][0], atol=1e-5)
    for row in three["kept_indices"]:
        assert len(set(row.tolist())) == budget and (np.diff(row) > 0).all()
        assert 0 <= row.min() and row.max() < TINY_N


def test_decoder_graph_runs_with_batch_3_and_kv_cache(tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact)
    spec = manifest.graphs["decoder"]
    runner = OnnxRuntimeRunner(tiny_artifact / spec.file, spec)
    batch, seq, heads, head_dim = 3, 6, manifest.decoder.num_kv_heads, manifest.decoder.head_dim
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((batch, seq, 64)).astype(np.float32)
    names = [t.name for t in spec.inputs[3:]]

    def feeds(embeds, start, past):
        length = embeds.shape[1]
        return {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((batch, start + length), np.int64),
            "position_ids": np.tile(np.arange(start, start + length, dtype=np.int64), (batch, 1)),
            **dict(zip(names, past)),
        }

    empty = [np.zeros((batch, heads, 0, head_dim), np.float32) for _ in names]
    full = runner.infer(feeds(embeds, 0, empty))
    assert full["logits"].shape == (batch, seq, manifest.decoder.vocab_size)
    assert full["present.0.key"].shape == (batch, heads, seq, head_dim)

    # prefill seq-1 positions, then one cached step: same last logits as the full pass
    head = runner.infer(feeds(embeds[:, :-1], 0, empty))
    past = [head[t.name] for t in spec.outputs[1:]]
    step = runner.infer(feeds(embeds[:, -1:], seq - 1, past))
    assert step["logits"].shape == (batch, 1, manifest.decoder.vocab_size)
    assert step["present.1.value"].shape == (batch, heads, seq, head_dim)
    np.testing.assert_allclose(step["logits"][:, 0], full["logits"][:, -1], atol=1e-4)


# ---------------------------------------------------------------------------------------- bad input


def _export_cli(capsys, tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    code = cli.main(["export", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert not out.exists(), "nothing may be written on bad input"
    leftovers = [p.name for p in set(tmp_path.iterdir()) - before]
    assert not leftovers, leftovers  # no .partial staging dirs beside --out
    return code, err, out


@pytest.mark.parametrize("budget", [0, -3, TINY_N, TINY_N + 1, 10_000])
def test_export_rejects_budget_out_of_range(capsys, error_line, tmp_path: Path, budget: int) -> None:
    code, err, _ = _export_cli(capsys, tmp_path, "--model", TINY, "--budget", str(budget))
    assert code == 2
    error_line(err, "budget", f"got {budget}", str(TINY_N))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--budget", "50", "--method", "none"], "budget"),
        (["--budget", "8", "--method", "topk"], "topk"),
        (["--budget", "8", "--alpha", "-1"], "alpha"),
        (["--budget", "8", "--epsilon", "0"], "epsilon"),
    ],
)
def test_export_rejects_bad_method_settings(capsys, error_line, tmp_path: Path, flags: list[str], needle: str) -> None:
    code, err, _ = _export_cli(capsys, tmp_path, "--model", TINY, *flags)
    assert code == 2
    error_line(err, needle)


def _model_dir(kind: str, root: Path, checkpoint: Path) -> Path:
    path = root / f"model-{kind}"
    if kind == "missing":
        return path
    path.mkdir()
    llava_config = (checkpoint / "config.json").read_text()
    if kind == "bert":
        (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
        (path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    elif kind == "bad-json":
        (path / "config.json").write_text("{not json")
    elif kind == "no-safetensors":
        (path / "config.json").write_text(llava_config)
        (path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    elif kind == "corrupt-safetensors":
        (path / "config.json").write_text(llava_config)
        (path / "model.safetensors").write_bytes(b"garbage, not a safetensors file")
    elif kind == "no-tokenizer":
        (path / "config.json").write_text(llava_config)
        os.symlink(checkpoint / "model.safetensors", path / "model.safetensors")
    return path  # "no-config": an empty directory


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("missing", "not a directory"),
        ("no-config", "no config.json"),
        ("bad-json", "not valid JSON"),
        ("bert", "'bert'"),
        ("no-safetensors", "safetensors"),
        ("corrupt-safetensors", "cannot load"),
        ("no-tokenizer", "tokenizer.json"),
    ],
)
def test_export_rejects_model_dirs_that_are_not_llava(capsys, error_line, tmp_path: Path, tiny_checkpoint: Path, kind: str, needle: str) -> None:
    model = _model_dir(kind, tmp_path, tiny_checkpoint)
    code, err, _ = _export_cli(capsys, tmp_path, "--model", str(model), "--budget", "8")
    assert code == 2
    error_line(err, str(model), needle)


def test_export_rejects_unknown_synthetic_preset(capsys, error_line, tmp_path: Path) -> None:
    code, err, _ = _export_cli(capsys, tmp_path, "--model", "synthetic:llava-huge", "--budget", "8")
    assert code == 2
    error_line(err, "synthetic:llava-huge", "llava-tiny")


def test_export_into_existing_dir_without_overwrite_fails_untouched(capsys, error_line, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main(["export", "--model", TINY, "--budget", "8", "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, str(out), "already exists", "--overwrite")
    assert _listing(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert _listing(tmp_path) == ["out"]
    with pytest.raises(ArtifactError, match="already exists"):
        export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), log=lambda m: None)


# ---------------------------------------------------------------------------------------- atomic writes


def test_interrupt_mid_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the real vision graph was written into the staging dir: nothing survives."""
    seen: list[list[str]] = []

    def interrupted(check):
        seen.append(_listing(check.path.parent))  # the staging directory, mid-export
        raise KeyboardInterrupt

    monkeypatch.setattr(export_pipeline, "check_graph", interrupted)  # validation, after every graph was written
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), ExportConfig(max_prompt_tokens=16, max_new_tokens=4), log=lambda m: None)
    assert seen and "vision.onnx" in seen[0]  # the crash really happened mid-write
    assert not out.exists()
    assert _listing(tmp_path) == []


def _fast_fake_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip torch.onnx.export and validation: write a stand-in file per graph (keeps these tests fast)."""

    def fake_export(module, args, dynamic, inputs, outputs, path, cfg, fixed_dims_hint=""):
        path.write_bytes(b"stand-in graph")
        return GraphSpec(
            file=path.name,
            inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
            outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
        )

    monkeypatch.setattr(export_pipeline, "_export", fake_export)
    monkeypatch.setattr(export_pipeline, "check_graph", lambda *a: None)
    monkeypatch.setattr(export_pipeline, "check_fused_decoder", lambda *a: None)
    monkeypatch.setattr(export_pipeline, "_check_tensorrt", lambda *a: None)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_while_saving_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    _fast_fake_export(monkeypatch)
    staged: list[list[str]] = []

    def crash(path, array):
        staged.append(_listing(Path(path).parent))
        raise exc

    monkeypatch.setattr(export_pipeline.np, "save", crash)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), log=lambda m: None)
    assert staged == [["decoder.onnx", "decoder_fused.onnx", "decoder_fused.onnx.data", "vision.onnx"]]
    assert not out.exists()
    assert _listing(tmp_path) == []


def test_cli_interrupted_export_exits_130_and_leaves_nothing(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fast_fake_export(monkeypatch)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_pipeline.shutil, "copyfile", interrupted)
    out = tmp_path / "out"
    code = cli.main(["export", "--model", TINY, "--budget", "8", "--out", str(out)])
    assert code == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "interrupted" in captured.err
    assert not out.exists() and _listing(tmp_path) == []


def test_overwrite_replaces_existing_dir_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fast_fake_export(monkeypatch)
    out = tmp_path / "out"
    export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=4), log=lambda m: None)  # --overwrite replaces only an artifact
    (out / "old.txt").write_text("old")
    manifest = export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), overwrite=True, log=lambda m: None)
    assert _listing(tmp_path) == ["out"]  # no .partial- or .old- dirs left
    assert "old.txt" not in _listing(out) and MANIFEST_NAME in _listing(out)
    assert load_manifest(out).files == manifest.files


def test_budget_config_validation_directly() -> None:
    BudgetConfig(budget=1).validate_against(TINY_N)
    BudgetConfig(budget=TINY_N - 1).validate_against(TINY_N)
    BudgetConfig(budget=TINY_N, method="none").validate_against(TINY_N)
    for budget in (0, -1, TINY_N):
        with pytest.raises(ConfigError, match="budget"):
            BudgetConfig(budget=budget).validate_against(TINY_N)
    with pytest.raises(ModelSourceError):
        export_pipeline.export_artifact("synthetic:nope", Path("/nonexistent/out"), BudgetConfig(budget=8))
