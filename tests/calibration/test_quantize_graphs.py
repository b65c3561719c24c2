"""quantize_graph on the tiny artifact: TensorRT-style symmetric Q/DQ, the selection op left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from prunert.calibration.dataset import collect_feeds, load_calibration_set
from prunert.calibration.drift import ort_session
from prunert.calibration.quantize import quantize_graph, selection_nodes
from prunert.config import CalibrationConfig
from prunert.errors import ExportError
from prunert.export.trt_check import TrtCheckConfig, check_trt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "calibration"
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def feeds(tiny_pipeline):
    return collect_feeds(tiny_pipeline, load_calibration_set(EXAMPLES, None, max_samples=2))


@pytest.fixture(scope="module")
def int8(tiny_artifact, feeds, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    source = onnx.load(str(tiny_artifact / "vision.onnx"))
    exclude = selection_nodes(source)
    summaries = {
        "vision": quantize_graph(tiny_artifact / "vision.onnx", out / "vision.onnx", feeds["vision"], CalibrationConfig(), exclude),
        "decoder": quantize_graph(tiny_artifact / "decoder.onnx", out / "decoder.onnx", feeds["decoder"], CalibrationConfig()),
    }
    return out, summaries, exclude


def _graph_maps(model):
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def _reads_dq(node, producer):
    return [name for name in node.input if name in producer and producer[name].op_type == "DequantizeLinear"]


def test_selection_scope_is_found(tiny_artifact):
    model = onnx.load(str(tiny_artifact / "vision.onnx"), load_external_data=False)
    names = selection_nodes(model)
    ops = {node.op_type for node in model.graph.node if node.name in names}
    assert {"Loop", "TopK", "MatMul"} <= ops
    assert not any(node.op_type == "Conv" for node in model.graph.node if node.name in names)
    assert selection_nodes(onnx.load(str(tiny_artifact / "decoder.onnx"), load_external_data=False)) == set()


def test_int8_vision_is_symmetric_per_channel_qdq(int8):
    out, summaries, exclude = int8
    model = onnx.load(str(out / "vision.onnx"))
    inits = {init.name: init for init in model.graph.initializer}
    qdq = [node for node in model.graph.node if node.op_type in QDQ]
    assert summaries["vision"].qdq_nodes == {op: sum(n.op_type == op for n in qdq) for op in QDQ}
    assert sum(n.op_type == "QuantizeLinear" for n in qdq) > 10
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.data_type == TensorProto.INT8
        assert not numpy_helper.to_array(zero).any()
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    per_channel = [n for n in weight_dq if numpy_helper.to_array(inits[n.input[1]]).size > 1]
    assert per_channel and summaries["vision"].per_channel_weights == len(per_channel)
    for node in per_channel:
        axis = {a.name: a.i for a in node.attribute}["axis"]
        weight = inits[node.input[0]]
        assert weight.data_type == TensorProto.INT8
        assert numpy_helper.to_array(inits[node.input[1]]).shape == (weight.dims[axis],)
    assert summaries["vision"].quantized_nodes["Conv"] == 1
    assert summaries["vision"].external_data is None and summaries["vision"].excluded_nodes == len(exclude)


def test_selection_op_and_loop_stay_fp32(tiny_artifact, int8):
    out, _, exclude = int8
    source = onnx.load(str(tiny_artifact / "vision.onnx"))
    model = onnx.load(str(out / "vision.onnx"))
    producer, consumers = _graph_maps(model)
    kept = {node.name: node for node in model.graph.node if node.name in exclude}
    assert set(kept) == exclude and selection_nodes(model) == exclude  # metadata restored by name
    for node in kept.values():
        assert not _reads_dq(node, producer), node.name
        assert not any(c.op_type == "QuantizeLinear" for out_ in node.output for c in consumers.get(out_, [])), node.name
    source_matmuls = sum(n.op_type == "MatMul" for n in source.graph.node if n.name in exclude)
    assert sum(n.op_type == "MatMul" for n in kept.values()) == source_matmuls > 0
    loop = lambda m: next(n for n in m.graph.node if n.op_type == "Loop")  # noqa: E731
    assert loop(model).attribute[0].g.SerializeToString() == loop(source).attribute[0].g.SerializeToString()
    quantized = [n for n in model.graph.node if n.op_type == "MatMul" and _reads_dq(n, producer)]
    all_matmuls = sum(n.op_type == "MatMul" for n in source.graph.node)
    assert len(quantized) == all_matmuls - source_matmuls  # every MatMul outside the selection op


def test_int8_decoder_quantizes_every_matmul(tiny_artifact, int8):
    out, summaries, _ = int8
    model = onnx.load(str(out / "decoder.onnx"))
    producer, _ = _graph_maps(model)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(_reads_dq(n, producer) for n in matmuls)
    assert summaries["decoder"].quantized_nodes == {"MatMul": len(matmuls)}
    size = lambda p: p.stat().st_size  # noqa: E731
    assert size(out / "decoder.onnx") < 0.7 * size(tiny_artifact / "decoder.onnx")


def test_int8_graphs_pass_check_trt_and_keep_opset(int8):
    out, _, _ = int8
    for name in ("vision.onnx", "decoder.onnx"):
        assert check_trt(out / name, TrtCheckConfig()) == []
        model = onnx.load(str(out / name), load_external_data=False)
        assert {(e.domain or "ai.onnx", e.version) for e in model.opset_import} == {("ai.onnx", 20)}


def test_int8_graphs_run_in_ort_cpu_close_to_fp32(tiny_artifact, int8, feeds):
    out, _, _ = int8
    for graph in ("vision", "decoder"):
        quantized = ort.InferenceSession(str(out / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        reference = ort.InferenceSession(str(tiny_artifact / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        for feed in feeds[graph][:3]:
            got, want = quantized.run(None, feed), reference.run(None, feed)
            assert [g.shape for g in got] == [w.shape for w in want] and [g.dtype for g in got] == [w.dtype for w in want]
            if graph == "decoder":
                a, b = got[0].ravel().astype(np.float64), want[0].ravel().astype(np.float64)
                assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


def test_fp8_vision_is_e4m3_qdq_that_ort_cpu_runs(tiny_artifact, feeds, tmp_path):
    source = onnx.load(str(tiny_artifact / "vision.onnx"))
    config = CalibrationConfig(precision="fp8")
    summary = quantize_graph(tiny_artifact / "vision.onnx", tmp_path / "v.onnx", feeds["vision"], config, selection_nodes(source))
    assert "amax/448" in summary.tool and summary.calibrate_method == "MinMax"
    model = onnx.load(str(tmp_path / "v.onnx"))
    inits = {init.name: init for init in model.graph.initializer}
    qdq = [node for node in model.graph.node if node.op_type in QDQ]
    assert qdq and all(inits[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN for n in qdq)
    weights = [inits[n.input[0]] for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(w.data_type == TensorProto.FLOAT8E4M3FN for w in weights)
    assert check_trt(tmp_path / "v.onnx", TrtCheckConfig()) == []
    visual, kept = ort_session(tmp_path / "v.onnx", "fp8").run(None, feeds["vision"][0])
    assert visual.shape == (1, 16, 64) and np.isfinite(visual).all() and kept.shape == (1, 16)


def test_quantizing_nothing_is_an_error(tiny_artifact, feeds, tmp_path):
    config = CalibrationConfig(op_types=("Gemm",))  # the tiny graphs have none
    with pytest.raises(ExportError, match="no Q/DQ"):
        quantize_graph(tiny_artifact / "decoder.onnx", tmp_path / "d.onnx", feeds["decoder"], config)


def test_external_data_source_gives_external_data_output(tiny_artifact, feeds, tmp_path):
    model = onnx.load(str(tiny_artifact / "decoder.onnx"))
    onnx.save_model(model, str(tmp_path / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data", size_threshold=1024)
    out = tmp_path / "out"
    out.mkdir()
    summary = quantize_graph(tmp_path / "decoder.onnx", out / "decoder.onnx", feeds["decoder"][:3], CalibrationConfig())
    assert summary.external_data == "decoder.onnx.data" and (out / "decoder.onnx.data").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]  # no temp files left
    assert check_trt(out / "decoder.onnx", TrtCheckConfig()) == []
    logits = ort_session(out / "decoder.onnx", "int8").run(None, feeds["decoder"][0])[0]
    assert logits.shape == feeds["decoder"][0]["inputs_embeds"].shape[:2] + (1024,)


def test_excluded_consumer_of_a_quantized_tensor_reads_the_float_tensor(tmp_path):
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4, 8]) for n in ("y", "z")]
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Abs", ["x"], ["z"], name="kept")]
    graph = helper.make_graph(nodes, "g", [x], outputs, initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.save(model, str(tmp_path / "g.onnx"))
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8)).astype(np.float32)} for i in range(3)]
    quantize_graph(tmp_path / "g.onnx", tmp_path / "q.onnx", feeds, CalibrationConfig(), exclude={"kept"})
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    nodes = {node.name: node for node in quantized.graph.node}
    assert list(nodes["kept"].input) == ["x"]  # not the DequantizeLinear output ORT first wired it to
    producer, _ = _graph_maps(quantized)
    assert _reads_dq(nodes["mm"], producer) == list(nodes["mm"].input)
    z = ort.InferenceSession(str(tmp_path / "q.onnx")).run(["z"], feeds[0])[0]
    assert np.array_equal(z, np.abs(feeds[0]["x"]))  # exact: no quantization on the excluded path
