"""Int4 weight-only primitives: block-wise RTN against a NumPy reference, MatMulNBits packing, the two ONNX forms
on ONNX Runtime, AWQ against RTN, check-trt's int4 rules, and the int4 parity bars."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from prunert.calibration.awq import ActivationStats, search_scales
from prunert.calibration.weight_only import (INT4_OPSET, matmul_targets, pack_matmulnbits, quantize_blockwise, rewrite,
                                             unpack_matmulnbits)
from prunert.config import PRECISION_TOLERANCES, PRECISIONS, WEIGHT_ONLY_PRECISIONS, ParityTolerances, WeightOnlyConfig
from prunert.errors import ConfigError
from prunert.export.trt_check import TrtCheckConfig, check_trt
from prunert.parity.report import ParityReport


def _reference_rtn(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: per column, per block of K rows, scale = max |w| / 7, q = clip(round(w / scale), -8, 7)."""
    k, n = weight.shape
    blocks = -(-k // block)
    q, scales = np.zeros((k, n), np.int8), np.zeros((blocks, n), np.float32)
    for col in range(n):
        for b in range(blocks):
            rows = weight[b * block : (b + 1) * block, col]
            scale = np.abs(rows).max() / 7 if np.abs(rows).max() > 0 else 1.0
            scales[b, col] = scale
            q[b * block : (b + 1) * block, col] = np.clip(np.rint(rows / np.float32(scale)), -8, 7)
    return q, scales


@pytest.mark.parametrize("k, block", [(96, 32), (80, 32), (64, 128)])  # K a multiple, not a multiple, below one block
def test_rtn_matches_the_numpy_reference_and_packs_losslessly(k: int, block: int) -> None:
    weight = np.random.default_rng(0).normal(size=(k, 12)).astype(np.float32)
    weight[:, 3] = 0  # an all-zero column: scale 1, values 0
    int4 = quantize_blockwise(weight, block)
    q, scales = _reference_rtn(weight, block)
    np.testing.assert_array_equal(int4.values, q)
    np.testing.assert_allclose(int4.scales, scales, rtol=1e-6)
    assert int4.values.min() >= -8 and int4.values.max() <= 7
    per_row_scale = np.repeat(scales, block, axis=0)[:k]
    assert np.all(np.abs(int4.dequantize() - weight) <= per_row_scale / 2 + 1e-6)
    packed, flat = pack_matmulnbits(int4)
    assert packed.dtype == np.uint8 and packed.shape == (12, -(-k // block), block // 2)
    back = unpack_matmulnbits(packed, flat, k, block)
    np.testing.assert_array_equal(back.values, int4.values)
    np.testing.assert_array_equal(back.scales, int4.scales)


def _matmul_model(weight: np.ndarray, opset: int = 20) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:  # the DequantizeLinear op itself, not ORT's DQ + MatMul -> MatMulNBits fusion
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("k, block", [(128, 32), (96, 64)])
def test_matmulnbits_and_dequantize_forms_equal_the_dequantized_matmul(k: int, block: int) -> None:
    rng = np.random.default_rng(1)
    weight, x = rng.normal(size=(k, 24)).astype(np.float32), rng.normal(size=(5, k)).astype(np.float32)
    model = _matmul_model(weight)
    targets = matmul_targets(model)
    int4 = {"w": quantize_blockwise(weight, block)}
    expected = x @ int4["w"].dequantize()  # [5, 24]
    nbits = rewrite(model, int4, {}, targets, "nbits", accuracy_level=0)  # fp32 activations: exact up to rounding
    dq = rewrite(model, int4, {}, targets, "dq", accuracy_level=0)
    assert [n.op_type for n in nbits.graph.node] == ["MatMulNBits"] and [n.op_type for n in dq.graph.node] == ["DequantizeLinear", "MatMul"]
    assert {(o.domain, o.version) for o in dq.opset_import} == {("", INT4_OPSET)}
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in nbits.opset_import}
    assert next(i for i in dq.graph.initializer if i.name == "w_int4").data_type == TensorProto.INT4
    np.testing.assert_allclose(_run(nbits, x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run(dq, x, optimize=False), expected, rtol=1e-4, atol=1e-4)
    # ORT CPU fuses the DQ form into MatMulNBits at its default accuracy level 4 (int8 activations): the same numbers
    nbits_level4 = rewrite(model, int4, {}, targets, "nbits", accuracy_level=4)
    np.testing.assert_allclose(_run(dq, x), _run(nbits_level4, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(nbits_level4, x), expected, rtol=0.05, atol=0.5)


def test_awq_mul_scales_the_activation_and_keeps_the_product() -> None:
    rng = np.random.default_rng(2)
    weight, x = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(3, 64)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    model = _matmul_model(weight)
    int4 = {"w": quantize_blockwise(weight * s[:, None], 32)}
    out = rewrite(model, int4, {"x": 1 / s}, matmul_targets(model), "nbits", accuracy_level=0)
    assert [n.op_type for n in out.graph.node] == ["Mul", "MatMulNBits"]
    np.testing.assert_allclose(_run(out, x), (x / s) @ int4["w"].dequantize(), rtol=1e-4, atol=1e-4)


def _siblings_model(weights: list[np.ndarray], other_k: int) -> onnx.ModelProto:
    """y_i = x @ W_i for each weight (siblings of one activation, e.g. gate/up), a Relu between them, and a matmul
    of another activation (u [.., other_k]) that is nobody's sibling."""
    k = weights[0].shape[0]
    nodes, outputs, inits = [], [], []
    for i, weight in enumerate(weights):
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}"))
        if i == 0:
            nodes.append(helper.make_node("Relu", ["x"], ["r"], name="between"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
    nodes.append(helper.make_node("MatMul", ["u", "w_other"], ["z"], name="other"))
    inits.append(numpy_helper.from_array(np.ones((other_k, 8), np.float32), "w_other"))
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("r", "z")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k]), helper.make_tensor_value_info("u", TensorProto.FLOAT, [None, other_k])]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("widths", [(48, 80), (32, 32, 16)])
def test_nbits_siblings_become_one_matmulnbits_and_a_split(widths: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(widths))
    weights = [rng.normal(size=(64, n)).astype(np.float32) for n in widths]
    model = _siblings_model(weights, other_k=32)
    targets = matmul_targets(model)
    int4 = {t.weight: quantize_blockwise(weight, 32) for t, weight in zip(targets, [*weights, np.ones((32, 8), np.float32)])}
    out = rewrite(model, int4, {}, targets, "nbits", accuracy_level=0)
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits", "Split", "Relu", "MatMulNBits"]  # the other stays alone
    joined = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: helper.get_attribute_value(a) for a in joined.attribute}["N"] == sum(widths)
    x, u = rng.normal(size=(3, 64)).astype(np.float32), rng.normal(size=(3, 32)).astype(np.float32)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "u": u})
    for i in range(len(widths)):  # each sibling's own output, as its own int4 matmul gives it
        np.testing.assert_allclose(got[i], x @ int4[f"w{i}"].dequantize(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[-1], u @ int4["w_other"].dequantize(), rtol=1e-4, atol=1e-4)
    dq = rewrite(model, int4, {}, targets, "dq", accuracy_level=0)  # TensorRT's form keeps one matmul each
    assert [n.op_type for n in dq.graph.node].count("MatMul") == len(widths) + 1


def _norm_matmul_model(weight: np.ndarray, gamma: np.ndarray, extra_reader: bool) -> onnx.ModelProto:
    """y = (h * gamma) @ W, an RMSNorm's last Mul feeding the matmul; extra_reader: z = h * gamma + h too."""
    k = weight.shape[0]
    nodes = [helper.make_node("Mul", ["h", "gamma"], ["x"], name="norm_scale"), helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["x", "h"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(gamma, "gamma")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, k])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("extra_reader", [False, True])
def test_awq_scales_fold_into_the_norm_weight_where_exact(extra_reader: bool) -> None:
    rng = np.random.default_rng(5)
    weight, gamma = rng.normal(size=(64, 16)).astype(np.float32), rng.uniform(0.5, 1.5, size=64).astype(np.float32)
    s = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    h = rng.normal(size=(3, 64)).astype(np.float32)
    model = _norm_matmul_model(weight, gamma, extra_reader)
    int4 = {"w": quantize_blockwise(weight * s[:, None], 32)}
    out = rewrite(model, int4, {"x": 1 / s}, matmul_targets(model), "nbits", accuracy_level=0)
    muls = [n.name for n in out.graph.node if n.name.endswith("_awq_mul")]
    scale_input = next(n for n in out.graph.node if n.name == "norm_scale").input[1]
    folded = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == scale_input)
    if extra_reader:  # x is read by another node: the scales cannot go into gamma
        assert muls == ["x_awq_mul"] and scale_input == "gamma" and np.array_equal(folded, gamma)
    else:  # a rescaled copy (the original gamma may be shared with other norms)
        assert muls == [] and scale_input != "gamma" and np.allclose(folded, gamma / s)
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["y"], {"h": h})[0], ((h * gamma) / s) @ int4["w"].dequantize(), rtol=1e-4, atol=1e-4)


def test_awq_lowers_the_output_error_on_outlier_channels() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 128)).astype(np.float32)
    x[:, [5, 40, 77, 100]] *= 40  # a few salient input channels, as LLM activations have
    weights = [rng.normal(size=(128, 64)).astype(np.float32) for _ in range(2)]  # two matmuls reading x
    choice, quantized = search_scales(ActivationStats(np.abs(x).mean(axis=0), x), weights, 32, grid=20)
    rtn = sum(np.square(x @ w - x @ quantize_blockwise(w, 32).dequantize()).sum() for w in weights)
    awq = sum(np.square(x @ w - (x * choice.inverse_scales) @ q.dequantize()).sum() for w, q in zip(weights, quantized))
    assert choice.rtn_error == pytest.approx(rtn, rel=1e-4) and choice.error == pytest.approx(awq, rel=1e-4)
    assert choice.alpha > 0 and awq < 0.7 * rtn


def test_gptq_lowers_the_output_error_on_correlated_activations() -> None:
    from prunert.calibration.gptq import gptq_quantize

    rng = np.random.default_rng(4)
    mix = rng.normal(size=(96, 96)).astype(np.float32)
    x = rng.normal(size=(512, 96)).astype(np.float32) @ mix  # correlated input channels
    weight = rng.normal(size=(96, 48)).astype(np.float32)
    gptq = gptq_quantize(weight, x, 32)
    rtn = quantize_blockwise(weight, 32)
    assert gptq.values.min() >= -8 and gptq.values.max() <= 7 and gptq.scales.shape == rtn.scales.shape
    error = lambda q: float(np.square(x @ weight - x @ q.dequantize()).sum())
    assert error(gptq) < 0.8 * error(rtn)


def test_lm_head_fp32_keeps_the_vocab_matmul_and_shared_weights_stay_float() -> None:
    model = _matmul_model(np.ones((32, 1000), np.float32))
    assert [t.weight for t in matmul_targets(model)] == ["w"]
    assert matmul_targets(model, skip_columns=(1000,)) == []


def _int4_graph(feeds_into: str = "MatMul", dtype: int = TensorProto.INT4, zero: int | None = None, block: int = 32) -> onnx.ModelProto:
    import ml_dtypes

    kind = ml_dtypes.int4 if dtype == TensorProto.INT4 else ml_dtypes.uint4
    inits = [numpy_helper.from_array(np.zeros((64, 8), kind), "q"), numpy_helper.from_array(np.ones((2, 8), np.float32), "s")]
    inputs = ["q", "s"]
    if zero is not None:
        inits.append(numpy_helper.from_array(np.full((2, 8), zero, kind), "z"))
        inputs.append("z")
    dq = helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", axis=0, block_size=block)
    use = helper.make_node(feeds_into, ["x", "w"] if feeds_into == "MatMul" else ["w", "w"], ["y"], name="use")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([dq, use], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])


def test_check_trt_allows_int4_weights_only_in_int4_variants() -> None:
    model = _int4_graph()
    plain = check_trt(model, TrtCheckConfig())
    assert any("int4 weight-only variant" in issue.why for issue in plain)  # the rule is gated
    assert any(issue.op == "opset" for issue in plain)  # opset 21 > 20 outside int4 graphs
    assert check_trt(model, TrtCheckConfig().for_int4()) == []
    assert TrtCheckConfig().for_int4().max_opset == 21


@pytest.mark.parametrize("model, needle", [
    (_int4_graph(dtype=TensorProto.UINT4), "symmetric INT4 weights only"),
    (_int4_graph(zero=1), "zero point 'z' is not a constant 0"),
    (_int4_graph(feeds_into="Add"), "not only a MatMul's weight input"),
])
def test_check_trt_int4_rules_reject_what_tensorrt_rejects(model: onnx.ModelProto, needle: str) -> None:
    issues = check_trt(model, TrtCheckConfig().for_int4())
    assert any(needle in issue.why for issue in issues), issues


def test_check_trt_int4_needs_tensorrt_10() -> None:
    issues = check_trt(_int4_graph(), TrtCheckConfig(trt_version="9.3").for_int4())
    assert any("needs TensorRT >= 10.0" in issue.why for issue in issues)


def test_int4_parity_bars_live_with_the_other_precisions() -> None:
    assert "int4" in PRECISIONS and WEIGHT_ONLY_PRECISIONS == ("int4",)
    bars = ParityTolerances.for_precision("int4")
    assert bars.kept_min_overlap == 1.0 and bars.tokens_min_cosine == ParityTolerances().tokens_min_cosine  # vision stays fp32
    assert bars.logits_max_kl == PRECISION_TOLERANCES["int4"]["logits_max_kl"] and bars.logits_max_abs is None
    assert ParityTolerances.for_precision("fp16").logits_max_kl is None  # reported, not a bound, elsewhere
    report = ParityReport.__new__(ParityReport)
    report.checks = []
    logits = np.zeros((1, 3, 8), np.float32)
    other = logits.copy()
    other[0, -1, 0] = 5.0
    report.add_kl("prefill logits", logits, other, bars.logits_max_kl)
    assert report.checks[-1].status == "FAIL" and report.checks[-1].bound == f"<= {bars.logits_max_kl:g}"


@pytest.mark.parametrize("field, value, needle", [
    ("block_size", 48, "--block-size: got 48, expected one of [32, 64, 128]"),
    ("precision", "int3", "--weights: got 'int3', expected one of ['int4']"),
    ("algo", "sq", "--algo: got 'sq', expected one of ['rtn', 'awq', 'gptq']"),
    ("gptq_damp", 0.0, "gptq_damp: got 0.0"),
    ("graphs", ("vision",), "--graphs: got ['vision'], expected ['decoder']"),
    ("lm_head", "int8", "--lm-head: got 'int8'"),
])
def test_weight_only_config_validates(field: str, value, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        WeightOnlyConfig(**{field: value})
    assert needle in str(caught.value)


def test_fp16_graphs_get_fp16_scales_and_statistics() -> None:
    """An fp16 export: AWQ's probe outputs take the activation's type, the int4 scales and Muls the weights' (W4A16)."""
    from prunert.calibration.awq import activation_stats

    rng = np.random.default_rng(6)
    weight, gamma = rng.normal(size=(64, 16)).astype(np.float16), rng.uniform(0.5, 1.5, size=64).astype(np.float16)
    nodes = [helper.make_node("Mul", ["h", "gamma"], ["x"], name="norm_scale"), helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT16, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(gamma, "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    targets = matmul_targets(model)
    assert targets[0].dtype == TensorProto.FLOAT16
    h = rng.normal(size=(5, 64)).astype(np.float16)
    stats = activation_stats(model, None, {"x": TensorProto.FLOAT16}, [{"h": h}], rows=8)
    np.testing.assert_allclose(stats["x"].mean_abs, np.abs((h * gamma).astype(np.float32)).mean(axis=0), rtol=1e-2)
    for form in ("nbits", "dq"):
        out = rewrite(model, {"w": quantize_blockwise(weight, 32)}, {}, targets, form, accuracy_level=0)
        scale = next(i for i in out.graph.initializer if i.name.endswith("_scale"))
        assert scale.data_type == TensorProto.FLOAT16
        assert _run_fp16(out, h).dtype == np.float16


def _run_fp16(model: onnx.ModelProto, h: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]
