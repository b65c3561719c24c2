"""prunert.export.precision: fp32 artifact graphs -> strongly typed fp16/bf16 graphs with fp32 islands.

One fp16 conversion of a private copy of the tiny artifact (module fixture) backs the structural and
numeric checks; hand-built graphs cover overflow islands and Loop bodies. CPU only, no TensorRT."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from prunert.artifact_update import STAGING_DIR, write_manifest
from prunert.config import SELECTION_SCOPE, PrecisionConfig
from prunert.errors import ArtifactError, ConfigError, ExportError
from prunert.export import trt_check
from prunert.export.precision import convert_artifact, convert_graph, validate_graph
from prunert.export.precision_islands import element_types, name_scopes, subgraphs
from prunert.manifest import MANIFEST_NAME, hash_directory, load_manifest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "examples" / "images"
PROMPTS = ("<image>\nWhat is in the cup?", "<image>\nDescribe the colors and the shapes of this picture in detail, please.")
F, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sample_feeds(tiny_artifact: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """The fp32 runtime's real inputs: vision (batch 2), decoder prefill (batch 2, left-padded) + one decode step."""
    from prunert.runtime import VLMPipeline
    from prunert.runtime.image import load_image
    from prunert.runtime.text import text_relevance_inputs

    pipe = VLMPipeline(tiny_artifact)
    art = pipe.artifact
    images = [load_image(IMAGES / "coffee.jpg"), load_image(IMAGES / "chelsea.jpg")]
    groups = pipe.content_words(PROMPTS)
    text_embeds, text_mask = text_relevance_inputs(groups, art.embeddings, pipe.manifest.text.max_text_tokens)
    vision = {**art.host.vision_inputs(images, art.preprocessor_config), "text_embeds": text_embeds, "text_mask": text_mask}
    visual = pipe.vision.infer(vision)["visual_tokens"]
    embeds, mask, positions = pipe.splice(pipe.tokenize(list(PROMPTS)), visual)
    assert (mask == 0).any(), "the two prompts must differ in length (left padding)"
    names = [t.name for t in pipe.decoder.spec.inputs[3:]]
    past = pipe.empty_past(2)
    logits, present = pipe.run_decoder(embeds, mask, positions, past)
    chosen = logits[:, -1].argmax(-1)
    step = {
        "inputs_embeds": np.asarray(art.embeddings[chosen], np.float32)[:, None],
        "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
        "position_ids": positions[:, -1:] + 1,
        **dict(zip(names, present)),
    }
    prefill = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **dict(zip(names, past))}
    return {"vision": [vision], "decoder": [prefill, step]}


@pytest.fixture(scope="module")
def fp16_artifact(tiny_artifact: Path, sample_feeds, tmp_path_factory: pytest.TempPathFactory):
    """A private copy of the tiny artifact with an fp16 variant converted with the default config."""
    copy = tmp_path_factory.mktemp("precision") / "artifact"
    shutil.copytree(tiny_artifact, copy)
    lines: list[str] = []
    manifest = convert_artifact(copy, PrecisionConfig(), sample_feeds, log=lines.append)
    return copy, manifest, lines


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _io_types(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


# ----------------------------------------------------------------------------------- the tiny artifact


def test_fp16_variant_is_listed_hashed_and_validated(fp16_artifact, tiny_artifact: Path):
    copy, manifest, lines = fp16_artifact
    reloaded = load_manifest(copy)  # verifies every listed sha256
    variant = reloaded.variants["fp16"]
    assert variant.precision == "fp16" and variant.tool.startswith("prunert.export.precision ")
    fp32 = load_manifest(tiny_artifact)
    for name, spec in variant.graphs.items():
        assert spec.file.startswith("fp16-") and spec.file in reloaded.files
        assert spec.inputs == fp32.graphs[name].inputs and spec.outputs == fp32.graphs[name].outputs
        assert spec.external_data is None
        assert reloaded.graph_spec(name, "fp16") == spec
    settings = variant.settings
    assert settings["config"]["precision"] == "fp16" and settings["config"]["fp32_op_types"] == ["LayerNormalization"]
    vision, decoder = settings["graphs"]["vision"], settings["graphs"]["decoder"]
    assert vision["fp32_by_reason"] == {"op_type": 5, "selection": 57}  # every float node of the ResPrune op (with its non-finite and range guards)
    for engine in ("onnxruntime_cpu", "reference"):  # ORT CPU runs most fp16 ops in fp32; onnx.reference does not
        assert vision["validation"][engine]["cosine"]["visual_tokens"] >= 0.999
        assert vision["validation"][engine]["index_overlap"]["kept_indices"] >= 0.98
        assert vision["validation"][engine]["cosine_same_index"]["visual_tokens"] >= 0.999
        assert decoder["validation"][engine]["cosine"]["logits"] >= 0.999
        assert min(v for k, v in decoder["validation"][engine]["cosine"].items() if k.startswith("present.")) >= 0.999
    assert decoder["fp32_by_reason"].get("overflow", 0) >= 1  # the finfo.min attention mask
    assert any("visual_tokens cos" in line for line in lines)
    json.loads((copy / MANIFEST_NAME).read_text())  # valid JSON (no NaN)


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_converted_graphs_are_strongly_typed(fp16_artifact, tiny_artifact: Path, graph: str):
    copy, manifest, _ = fp16_artifact
    src = onnx.load(str(tiny_artifact / f"{graph}.onnx"))
    out = onnx.load(str(copy / manifest.variants["fp16"].graphs[graph].file))
    assert _io_types(out) == _io_types(src)  # graph I/O unchanged: same arrays feed every precision
    assert max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) <= 20 and out.ir_version <= 10
    islands = {entry.split(" (")[0] for entry in manifest.variants["fp16"].settings["graphs"][graph]["islands"]}
    types = element_types(out)
    for node in out.graph.node:
        if node.op_type in ("Cast", "Shape", "Size"):
            continue
        floats = [t for t in [*node.input, *node.output] if t and types.get(t) in (F, F16)]
        want = F if node.name in islands else F16
        assert all(types[t] == want for t in floats), (node.name, [(t, types[t]) for t in floats])
    for init in out.graph.initializer:  # fp32 weights only where an island reads them
        if init.data_type == F:
            readers = [n for n in out.graph.node if init.name in n.input] + [n for n in out.graph.node if subgraphs(n)]
            assert all(n.name in islands for n in readers), init.name
    assert sum(t.data_type == F16 for t in out.graph.initializer) >= 20
    assert not any(not types.get(t) for n in out.graph.node for t in n.output if t)
    if graph == "vision":
        norms = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
        assert len(norms) == 5 and all(n.name in islands for n in norms)
        producers = {o: n for n in out.graph.node for o in n.output}
        casts = [producers[n.input[0]] for n in norms if n.input[0] in producers and producers[n.input[0]].op_type == "Cast"]
        assert casts and all(helper.get_attribute_value(c.attribute[0]) == F for c in casts)
        selection = [n for n in out.graph.node if SELECTION_SCOPE in name_scopes(n)]
        loop = [n for n in selection if n.op_type == "Loop"]
        assert len(loop) == 1 and loop[0].name in islands
        floats = lambda n: any(types.get(t) in (F, F16) for t in [*n.input, *n.output] if t)  # noqa: E731
        assert all(n.name in islands for n in selection if floats(n) and n.op_type not in ("Cast", "Shape", "Size"))
        original = next(n for n in src.graph.node if n.op_type == "Loop")
        assert loop[0].attribute[0].g.SerializeToString() == original.attribute[0].g.SerializeToString()  # body untouched


def test_fp16_graphs_run_close_to_fp32(fp16_artifact, tiny_artifact: Path, sample_feeds):
    copy, manifest, _ = fp16_artifact
    for graph in ("vision", "decoder"):
        fp32, fp16 = _session(tiny_artifact / f"{graph}.onnx"), _session(copy / manifest.variants["fp16"].graphs[graph].file)
        names = [o.name for o in fp32.get_outputs()]
        for feed in sample_feeds[graph]:
            want, got = dict(zip(names, fp32.run(names, feed))), dict(zip(names, fp16.run(names, feed)))
            assert all(got[n].dtype == want[n].dtype for n in names)
            if graph == "vision":
                assert _cosine(want["visual_tokens"], got["visual_tokens"]) >= 0.999
                overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(want["kept_indices"], got["kept_indices"])])
                assert overlap >= 0.98
            else:
                real = feed["attention_mask"][:, -want["logits"].shape[1] :].astype(bool)  # padded rows are garbage
                assert np.isfinite(got["logits"]).all()
                assert _cosine(want["logits"][real], got["logits"][real]) >= 0.999


def test_runtime_generates_with_the_fp16_variant(fp16_artifact):
    from prunert.config import GenerationConfig
    from prunert.runtime import VLMPipeline

    copy, _, _ = fp16_artifact
    config = GenerationConfig(max_new_tokens=4)
    image = IMAGES / "coffee.jpg"
    fp32 = VLMPipeline(copy).generate([image], [PROMPTS[0]], config)[0]
    fp16 = VLMPipeline(copy, precision="fp16").generate([image], [PROMPTS[0]], config)[0]
    assert len(fp16.token_ids) >= 1 and fp16.token_ids[0] == fp32.token_ids[0]
    assert len(set(fp16.kept_indices.tolist()) & set(fp32.kept_indices.tolist())) >= 15


def test_pattern_keeps_a_named_layer_fp32(tiny_artifact: Path, tmp_path: Path):
    config = PrecisionConfig(fp32_node_patterns=("*encoder.layers.1.mlp.fc2*",), auto_islands=False)
    result = convert_graph(tiny_artifact / "vision.onnx", tmp_path / "vision.onnx", config)
    patterned = {name for name, reason in result.fp32_nodes if reason.startswith("pattern:")}
    assert len(patterned) == 2 and result.reasons()["pattern"] == 2  # the MatMul and its bias Add
    assert result.matched_patterns == config.fp32_node_patterns
    out = onnx.load(str(tmp_path / "vision.onnx"))
    inits = {t.name: t.data_type for t in out.graph.initializer}
    weights = [i for n in out.graph.node if n.name in patterned for i in n.input if i in inits]
    assert weights and all(inits[w] == F for w in weights)


def test_unmatched_pattern_is_a_config_error(artifact_copy: Path):
    before = (artifact_copy / MANIFEST_NAME).read_bytes()
    with pytest.raises(ConfigError, match=r"\*no.such.layer\*"):
        convert_artifact(artifact_copy, PrecisionConfig(fp32_node_patterns=("*no.such.layer*",)), log=lambda _: None)
    assert (artifact_copy / MANIFEST_NAME).read_bytes() == before


def test_rerun_replaces_the_variant(artifact_copy: Path):
    config = PrecisionConfig(auto_islands=False)
    first = convert_artifact(artifact_copy, config, log=lambda _: None)
    old_folder = first.variants["fp16"].graphs["vision"].file.split("/")[0]
    assert (artifact_copy / old_folder).is_dir()
    second = convert_artifact(artifact_copy, config, log=lambda _: None)
    new_folder = second.variants["fp16"].graphs["vision"].file.split("/")[0]
    assert new_folder != old_folder and (artifact_copy / new_folder).is_dir()
    assert not (artifact_copy / old_folder).exists()
    assert not any(name.startswith(old_folder + "/") for name in second.files)
    assert load_manifest(artifact_copy).variants["fp16"] == second.variants["fp16"]
    assert second.variants["fp16"].settings["graphs"]["vision"]["validation"]["onnxruntime"] == "loads"


@pytest.mark.parametrize("failure", ["raises", "issues"])
def test_failure_mid_conversion_leaves_the_artifact_unchanged(artifact_copy: Path, monkeypatch, failure: str):
    before = (artifact_copy / MANIFEST_NAME).read_bytes()
    entries = sorted(p.name for p in artifact_copy.iterdir())

    def fake_check(path, config=None):
        if Path(path).name != "decoder.onnx":  # the vision graph is staged already when this fires
            return []
        if failure == "raises":
            raise ExportError("decoder.onnx: simulated failure")
        return [trt_check.TrtIssue("node_x", "Foo", "simulated problem")]

    monkeypatch.setattr(trt_check, "check_trt", fake_check)
    with pytest.raises(ExportError, match="decoder.onnx"):
        convert_artifact(artifact_copy, PrecisionConfig(auto_islands=False), log=lambda _: None)
    assert (artifact_copy / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in artifact_copy.iterdir()) == entries
    assert not (artifact_copy / STAGING_DIR).exists()


def test_bf16_variant(artifact_copy: Path, sample_feeds):
    manifest = convert_artifact(artifact_copy, PrecisionConfig(precision="bf16"), sample_feeds, log=lambda _: None)
    variant = load_manifest(artifact_copy).variants["bf16"]
    assert variant == manifest.variants["bf16"] and "fp16" not in manifest.variants
    for graph, spec in variant.graphs.items():
        out = onnx.load(str(artifact_copy / spec.file))
        onnx.checker.check_model(out, full_check=True)
        dtypes = {t.data_type for t in out.graph.initializer}
        assert BF16 in dtypes and F16 not in dtypes
        assert _io_types(out) == _io_types(onnx.load(str(artifact_copy / f"{graph}.onnx")))
        validation = variant.settings["graphs"][graph]["validation"]
        assert validation["checker"] == "ok"
        if validation["onnxruntime"] != "loads":  # ORT CPU has few bf16 kernels
            assert validation["onnxruntime"].startswith("not runnable on CPU") and "onnxruntime_cpu" not in validation
        reference = validation["reference"]  # onnx.reference runs bf16 in numpy (ml_dtypes)
        if graph == "decoder":
            assert reference["cosine"]["logits"] >= 0.999
        else:  # bf16 rounding of the projector output may flip a greedy pick on random weights
            assert reference["index_overlap"]["kept_indices"] >= 0.75
            assert reference["cosine_same_index"]["visual_tokens"] >= 0.999  # the tokens both kept agree
    # opset-20 Conv/Cos/Sin have no bf16 type in the ONNX schema: they stay fp32 islands
    assert variant.settings["graphs"]["vision"]["fp32_by_reason"]["schema"] == 1


def test_external_data_in_and_out(artifact_copy: Path, sample_feeds):
    model = onnx.load(str(artifact_copy / "decoder.onnx"))
    onnx.save_model(model, str(artifact_copy / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data", size_threshold=1024)
    manifest = load_manifest(artifact_copy, verify_hashes=False)
    graphs = {**manifest.graphs, "decoder": replace(manifest.graphs["decoder"], external_data="decoder.onnx.data")}
    write_manifest(artifact_copy, replace(manifest, graphs=graphs, files=hash_directory(artifact_copy)))
    config = PrecisionConfig()
    result = convert_artifact(artifact_copy, config, {"decoder": sample_feeds["decoder"]}, log=lambda _: None, external_data_threshold_bytes=0)
    spec = result.variants["fp16"].graphs["decoder"]
    assert spec.external_data == spec.file + ".data" and spec.external_data in load_manifest(artifact_copy).files
    assert result.variants["fp16"].graphs["vision"].external_data is not None  # threshold 0: every graph
    settings = result.variants["fp16"].settings["graphs"]["decoder"]
    assert settings["overflow_samples"] == 2 and settings["fp32_by_reason"]["overflow"] >= 1
    assert all(settings["validation"][engine]["cosine"]["logits"] >= 0.999 for engine in ("onnxruntime_cpu", "reference"))
    skeleton = onnx.load(str(artifact_copy / spec.file), load_external_data=False)
    external = [t for t in skeleton.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) <= 1024 for t in skeleton.graph.initializer)


# ------------------------------------------------------------------------------------ hand-built graphs


def _overflow_model() -> onnx.ModelProto:
    """y = (x @ W) * 1e-3 with x @ W ~ 1e5: fine in fp32, inf in fp16 unless the MatMul stays fp32."""
    weight = numpy_helper.from_array(np.full((4, 4), 400.0, np.float32), "W")
    scale = numpy_helper.from_array(np.asarray(1e-3, np.float32), "scale")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["big"], name="big_matmul"), helper.make_node("Mul", ["big", "scale"], ["y"], name="shrink")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [2, 4])], [helper.make_tensor_value_info("y", F, [2, 4])], [weight, scale])


def test_overflow_keeps_the_node_fp32(tmp_path: Path):
    src = tmp_path / "big.onnx"
    onnx.save_model(_overflow_model(), str(src))
    feeds = [{"x": np.full((2, 4), 64.0, np.float32)}]  # x @ W = 102400 > 65504
    want = _session(src).run(None, feeds[0])[0]

    result = convert_graph(src, tmp_path / "auto.onnx", PrecisionConfig(fp32_op_types=()), feeds)
    assert dict(result.fp32_nodes)["big_matmul"].startswith("overflow:")
    assert "shrink" in dict(result.fp32_nodes)  # reads the large tensor: cast down only after it shrank
    assert result.overflow[0][0] == "big_matmul" and result.overflow[0][1] == pytest.approx(102400.0)
    got = _session(tmp_path / "auto.onnx").run(None, feeds[0])[0]
    np.testing.assert_allclose(got, want, rtol=1e-3)

    assert np.allclose(ReferenceEvaluator(str(tmp_path / "auto.onnx")).run(None, feeds[0])[0], want, rtol=1e-3)

    plain = convert_graph(src, tmp_path / "plain.onnx", PrecisionConfig(fp32_op_types=(), auto_islands=False), feeds)
    assert plain.fp32_nodes == () and plain.sample_count == 0
    with np.errstate(over="ignore"):  # true fp16 arithmetic (ORT CPU would run this MatMul in fp32 and hide it)
        assert np.isinf(ReferenceEvaluator(str(tmp_path / "plain.onnx")).run(None, feeds[0])[0]).all()
        with pytest.raises(ExportError, match="overflow"):
            validate_graph(src, tmp_path / "plain.onnx", "fp16", feeds)


def test_loop_stays_fp32_and_reads_outer_tensors_through_casts(tmp_path: Path):
    """A Loop outside the selection scope: its body reads `pre`, produced by a converted node."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "pre"], ["acc_out"], name="body_add"), helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", F, [2, 3]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", F, [2, 3])],
    )
    inits = [
        numpy_helper.from_array(np.asarray(3, np.int64), "trips"),
        numpy_helper.from_array(np.asarray(True), "true"),
        numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "half"], ["pre"], name="pre_mul"),
        helper.make_node("Loop", ["trips", "true", "x"], ["acc"], name="loop", body=body),
        helper.make_node("Mul", ["acc", "half"], ["y"], name="post_mul"),
    ]
    src = tmp_path / "loop.onnx"
    onnx.save_model(_model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 3])], inits), str(src))
    result = convert_graph(src, tmp_path / "out.onnx", PrecisionConfig(), [{"x": np.ones((2, 3), np.float32)}])
    assert dict(result.fp32_nodes) == {"loop": "subgraph:Loop"}
    assert result.duplicated_initializers == 0 and result.converted_initializers == 1  # `half` read by converted nodes only
    out = onnx.load(str(tmp_path / "out.onnx"))
    loop = next(n for n in out.graph.node if n.op_type == "Loop")
    outer = [i for i in loop.attribute[0].g.node[0].input if i != "acc_in"][0]
    cast = next(n for n in out.graph.node if outer in n.output)
    assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == F and cast.input[0] == "pre"
    x = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    np.testing.assert_allclose(_session(tmp_path / "out.onnx").run(None, x)[0], _session(src).run(None, x)[0], rtol=2e-3, atol=1e-3)


def test_attribute_typed_producers_are_retargeted(tmp_path: Path):
    """Constant (also as a graph output), ConstantOfShape without a value, Cast(int -> float), and a
    Constant read by both an island (LayerNorm) and a converted Mul."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value_floats=[1.5, 2.5, 3.5]),
        helper.make_node("Constant", [], ["const_out"], value=numpy_helper.from_array(np.asarray([7.0], np.float32))),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Cast", ["n"], ["n_float"], to=F),
        helper.make_node("Add", ["x", "zeros"], ["a"]),
        helper.make_node("Mul", ["a", "c"], ["b"]),
        helper.make_node("Add", ["b", "n_float"], ["y"]),
        helper.make_node("LayerNormalization", ["y", "c"], ["ln"], name="ln", axis=-1),
    ]
    inputs = [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("n", TensorProto.INT64, [2, 3])]
    outputs = [helper.make_tensor_value_info(name, F, shape) for name, shape in (("y", [2, 3]), ("const_out", [1]), ("ln", [2, 3]))]
    src = tmp_path / "attrs.onnx"
    onnx.save_model(_model(nodes, inputs, outputs), str(src))
    result = convert_graph(src, tmp_path / "out.onnx", PrecisionConfig())
    assert dict(result.fp32_nodes) == {"ln": "op_type:LayerNormalization"} and result.duplicated_initializers == 1
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert _io_types(out) == _io_types(onnx.load(str(src)))
    attrs = {n.op_type + ":" + n.output[0]: helper.get_attribute_value(n.attribute[0]) for n in out.graph.node if n.attribute}
    assert attrs["ConstantOfShape:zeros"].data_type == F16 and attrs["Cast:n_float"] == F16
    assert attrs["Constant:const_out_fp16"].data_type == F16
    feed = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "n": np.arange(6).reshape(2, 3)}
    for got, want in zip(_session(tmp_path / "out.onnx").run(None, feed), _session(src).run(None, feed)):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_bad_inputs_name_what_was_expected(tiny_artifact: Path, artifact_copy: Path, tmp_path: Path):
    with pytest.raises(ArtifactError, match="missing.onnx"):
        convert_graph(tmp_path / "missing.onnx", tmp_path / "out.onnx", PrecisionConfig())
    with pytest.raises(ConfigError, match="text_mask"):
        convert_graph(tiny_artifact / "vision.onnx", tmp_path / "v.onnx", PrecisionConfig(), [{"pixel_values": np.zeros((1, 3, 140, 140), np.float32)}])
    with pytest.raises(ConfigError, match="unknown graph"):
        convert_artifact(artifact_copy, PrecisionConfig(), {"projector": []}, log=lambda _: None)
    with pytest.raises(ConfigError, match="precision"):
        PrecisionConfig(precision="int8")
