"""`prunert check-trt`: each rule fires exactly once on a tiny hand-built graph, stays quiet on the
clean variant, and every graph prunert exports passes. No TensorRT needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prunert import cli
from prunert.config import DEFAULT_OPSET
from prunert.errors import ArtifactError, ConfigError
from prunert.export.trt_check import (
    MODEL_NODE,
    TrtCheckConfig,
    TrtIssue,
    check_target,
    check_trt,
    load_model,
    op_histogram,
    op_table,
)

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


# ---------------------------------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, inits=(), opset=20, functions=(), extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions), ir_version=10)


def _vi(name, dtype=F, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, shape)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _one(model, config=TrtCheckConfig()) -> TrtIssue:
    issues = check_trt(model, config)
    assert len(issues) == 1, [issue.line() for issue in issues]
    return issues[0]


def _clean(model, config=TrtCheckConfig()) -> None:
    assert check_trt(model, config) == [], [issue.line() for issue in check_trt(model, config)]


def _unary(op, dtype=F, **attrs):
    return _model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [_vi("x", dtype)], [_vi("y", dtype)])


def _topk(k_values=(2,), sorted_=1, k_from_input=False, k_constant_node=False):
    nodes, inits, inputs = [], [], [_vi("x")]
    if k_from_input:
        inputs.append(_vi("k", I64, (1,)))
    elif k_constant_node:
        nodes.append(helper.make_node("Constant", [], ["k"], name="kc", value=_i64("kv", k_values)))
    else:
        inits.append(_i64("k", k_values))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=sorted_))
    return _model(nodes, inputs, [_vi("v", F, None), _vi("i", I64, None)], inits)


def _reduce(op, axes_from_input=False, folded=False):
    nodes, inits, inputs = [], [], [_vi("x")]
    if axes_from_input:
        inputs.append(_vi("axes", I64, (1,)))
    elif folded:  # axes = a + b, both initializers: constant, but not an initializer
        inits += [_i64("a", [0]), _i64("b", [1])]
        nodes.append(helper.make_node("Add", ["a", "b"], ["axes"], name="fold"))
    else:
        inits.append(_i64("axes", [1]))
    nodes.append(helper.make_node(op, ["x", "axes"], ["y"], name="red"))
    return _model(nodes, inputs, [_vi("y", F, None)], inits)


def _counter_loop(scan=False, trip=None, trip_input=False, cond_from_counter=None, use_iter=False, grow=False):
    """prunert's while_loop pattern by default: no trip count, cond computed from a carried counter,
    carried values of fixed shape, no scan outputs. With a trip count the body passes cond through."""
    if cond_from_counter is None:
        cond_from_counter = trip is None and not trip_input
    cond_node = (helper.make_node("Less", ["c_out", "limit"], ["cond_out"], name="lt") if cond_from_counter
                 else helper.make_node("Identity", ["cond_in"], ["cond_out"], name="pass"))
    body_nodes = [helper.make_node("Add", ["c_in", "one"], ["c_out"], name="inc"), cond_node,
                  helper.make_node("Identity", ["s_in"], ["s_mid"], name="id")]
    if grow:
        body_nodes.append(helper.make_node("Concat", ["s_mid", "s_mid"], ["s_out"], name="grow", axis=0))
    else:
        body_nodes.append(helper.make_node("Identity", ["s_mid"], ["s_out"], name="keep"))
    outputs = [_vi("cond_out", BOOL, ()), _vi("c_out", I64, ()), _vi("s_out", F, (8,) if grow else (4,))]
    if scan:
        body_nodes.append(helper.make_node("Mul", ["s_mid", "two"], ["scan_out"], name="scan"))
        outputs.append(_vi("scan_out", F, (4,)))
    if use_iter:
        body_nodes.append(helper.make_node("Cast", ["i"], ["i_f"], name="use_i", to=F))
    body = helper.make_graph(
        body_nodes, "body",
        [_vi("i", I64, ()), _vi("cond_in", BOOL, ()), _vi("c_in", I64, ()), _vi("s_in", F, (4,))],
        outputs,
        initializer=[_i64("one", 1), _i64("limit", 5), numpy_helper.from_array(np.float32(2.0), "two")],
    )
    inits = [numpy_helper.from_array(np.array(True), "cond0"), _i64("c0", 0)]
    inputs = [_vi("s0", F, (4,))]
    if trip_input:
        inputs.append(_vi("trip", I64, ()))
    elif trip is not None:
        inits.append(_i64("trip", trip))
    trip_name = "trip" if trip_input or trip is not None else ""
    loop_outputs = ["c_last", "s_last"] + (["scanned"] if scan else [])
    loop = helper.make_node("Loop", [trip_name, "cond0", "c0", "s0"], loop_outputs, name="loop", body=body)
    graph_outputs = [_vi("s_last", F, None)] + ([_vi("scanned", F, None)] if scan else [])
    return _model([loop], inputs, graph_outputs, inits)


# ---------------------------------------------------------------------------------------- clean graphs


def test_clean_graph_with_int64_io_and_int64_max_slice_end_passes() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Slice", ["h", "start", "end", "axes"], ["s"], name="slice"),
        helper.make_node("Cast", ["ids"], ["ids_f"], name="cast", to=F),
        helper.make_node("ArgMax", ["s"], ["idx"], name="argmax", axis=1),
    ]
    inits = [numpy_helper.from_array(np.ones((3, 3), np.float32), "w"), _i64("start", [1]),
             _i64("end", [np.iinfo(np.int64).max]), _i64("axes", [1])]
    model = _model(nodes, [_vi("x"), _vi("ids", I64, (2,))], [_vi("idx", I64, None), _vi("ids_f", F, (2,))], inits)
    _clean(model)
    assert op_histogram(model) == {"MatMul": 1, "Slice": 1, "Cast": 1, "ArgMax": 1}


# ---------------------------------------------------------------------------------------- rule 1: opset, domains


def test_opset_above_target_is_one_model_issue_and_config_respected() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="n")], [_vi("x")], [_vi("y")], opset=21)
    issue = _one(model)
    assert (issue.node, issue.op) == (MODEL_NODE, "opset")
    assert "opset 21" in issue.why and "9..20" in issue.why
    _clean(model, TrtCheckConfig(max_opset=21))
    low = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], opset=8)
    assert _one(low).node == MODEL_NODE


def test_contrib_and_custom_domain_ops_are_issues() -> None:
    model = _model(
        [helper.make_node("FastGelu", ["x"], ["y"], name="fg", domain="com.microsoft")],
        [_vi("x")], [_vi("y")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    issue = _one(model)
    assert (issue.node, issue.op) == ("fg", "FastGelu") and "com.microsoft" in issue.why and "contrib" in issue.why
    custom = _model(
        [helper.make_node("aten_foo", ["x"], ["y"], name="foo", domain="pkg.onnxscript.torch_lib")],
        [_vi("x")], [_vi("y")], extra_opsets=[helper.make_opsetid("pkg.onnxscript.torch_lib", 1)])
    assert "custom-domain op" in _one(custom).why


def test_local_function_bodies_are_checked_instead_of_flagged() -> None:
    def model_with(op):
        body = [helper.make_node(op, ["a"], ["b"], name="inner")]
        function = helper.make_function("local", "wrap", ["a"], ["b"], body, [helper.make_opsetid("", 20)])
        call = helper.make_node("wrap", ["x"], ["y"], name="call", domain="local")
        return _model([call], [_vi("x")], [_vi("y", F, None)], functions=[function],
                      extra_opsets=[helper.make_opsetid("local", 1)])

    _clean(model_with("Relu"))
    issue = _one(model_with("NonZero"))
    assert (issue.node, issue.op) == ("call/wrap/inner", "NonZero")


# ---------------------------------------------------------------------------------------- rule 2: op table


def test_unsupported_and_unknown_ops() -> None:
    issue = _one(_model([helper.make_node("Det", ["x"], ["y"], name="det")], [_vi("x", F, (3, 3))], [_vi("y", F, ())]))
    assert (issue.node, issue.op, issue.why) == ("det", "Det", "not supported by TensorRT's ONNX parser")
    unique = _one(_model([helper.make_node("Unique", ["x"], ["y"], name="u")], [_vi("x")], [_vi("y", F, None)]))
    assert "data-dependent" in unique.why  # one issue, not two
    assert "not in TensorRT's ONNX operator table" in _one(_unary("SomeFutureOp")).why


def test_ops_newer_than_the_target_tensorrt() -> None:
    model = _model([helper.make_node("HannWindow", ["n"], ["w"], name="hann")], [_vi("n", I64, ())], [_vi("w", F, None)])
    issue = _one(model)
    assert issue.op == "HannWindow" and "only from 10.4" in issue.why
    _clean(model, TrtCheckConfig(trt_version="10.4"))


def test_attribute_and_output_restrictions() -> None:
    scatter = _model(
        [helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="sc", reduction="add")],
        [_vi("x", F, (4,)), _vi("idx", I64, (1, 1)), _vi("upd", F, (1,))], [_vi("y", F, (4,))])
    assert _one(scatter).why == "attribute reduction=add: TensorRT requires reduction=none"
    norm = _model(
        [helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean", "inv"], name="ln")],
        [_vi("x"), _vi("s", F, (3,))], [_vi("y"), _vi("mean", F, None), _vi("inv", F, None)])
    assert "only the first 1 output" in _one(norm).why
    used_one = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln")],
                      [_vi("x"), _vi("s", F, (3,))], [_vi("y")])
    _clean(used_one)


# ---------------------------------------------------------------------------------------- rule 3: TopK


def test_topk_sorted_zero() -> None:
    issue = _one(_topk(sorted_=0))
    assert (issue.node, issue.op, issue.why) == ("topk", "TopK", "attribute sorted=0: TensorRT requires sorted=1")


def test_topk_k_must_be_build_time_constant() -> None:
    issue = _one(_topk(k_from_input=True))
    assert (issue.node, issue.op) == ("topk", "TopK") and issue.why.startswith("K must be a build-time constant")
    _clean(_topk(k_from_input=True), TrtCheckConfig(allow_dynamic_topk_k=True))


def test_topk_k_limit_from_initializer_and_constant_node() -> None:
    _clean(_topk(k_values=(3840,)))
    assert _one(_topk(k_values=(3841,))).why == "K=3841 exceeds TensorRT's TopK limit of 3840"
    assert "K=4000" in _one(_topk(k_values=(4000,), k_constant_node=True)).why
    _clean(_topk(k_values=(4000,)), TrtCheckConfig(max_topk=4096))


# ---------------------------------------------------------------------------------------- rule 4: weights inputs


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare", "ReduceMax", "CumSum"])
def test_axes_computed_at_run_time(op: str) -> None:
    _clean(_reduce(op))
    issue = _one(_reduce(op, axes_from_input=True))
    assert (issue.node, issue.op) == ("red", op)
    assert "input 'axes' is computed at run time" in issue.why and "initializer" in issue.why


def test_axes_folded_from_constants_need_folding_or_the_flag() -> None:
    issue = _one(_reduce("ReduceSumSquare", folded=True))
    assert "computed from constants, not an initializer" in issue.why
    _clean(_reduce("ReduceSumSquare", folded=True), TrtCheckConfig(assume_constant_folding=True))


def test_version_gated_weights_rules() -> None:
    assert "TensorRT >= 10.8 accepts a tensor" in _one(_reduce("CumSum", axes_from_input=True)).why
    _clean(_reduce("CumSum", axes_from_input=True), TrtCheckConfig(trt_version="10.8"))
    squeeze = _model([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")],
                     [_vi("x", F, (1, 3)), _vi("axes", I64, (1,))], [_vi("y", F, None)])
    assert _one(squeeze).op == "Squeeze"
    _clean(squeeze, TrtCheckConfig(trt_version="10.7"))


# ---------------------------------------------------------------------------------------- rule 5: data-dependent shapes


@pytest.mark.parametrize("op, inputs", [("NonZero", ["x"]), ("NonMaxSuppression", ["boxes", "scores"])])
def test_data_dependent_output_shapes(op: str, inputs: list[str]) -> None:
    shapes = {"x": (2, 3), "boxes": (1, 4, 4), "scores": (1, 1, 4)}
    model = _model([helper.make_node(op, inputs, ["y"], name="dds")], [_vi(n, F, shapes[n]) for n in inputs],
                   [_vi("y", I64, None)])
    issue = _one(model)
    assert (issue.node, issue.op) == ("dds", op) and issue.why.startswith("data-dependent output shape")


# ---------------------------------------------------------------------------------------- rule 6: Loop


def test_prunert_while_loop_pattern_is_clean() -> None:
    _clean(_counter_loop())


def test_loop_scan_outputs_without_trip_count() -> None:
    issue = _one(_counter_loop(scan=True))
    assert (issue.node, issue.op) == ("loop", "Loop") and "scan output(s) of dynamic length: no trip count" in issue.why


def test_loop_scan_outputs_with_run_time_trip_count() -> None:
    assert "trip count 'trip' is computed at run time" in _one(_counter_loop(scan=True, trip_input=True)).why


def test_loop_scan_outputs_with_fixed_trip_count() -> None:
    _clean(_counter_loop(scan=True, trip=5))  # cond passed through: runs exactly 5 times
    assert "can stop early" in _one(_counter_loop(scan=True, trip=5, cond_from_counter=True)).why
    assert "no trip count" in _one(_counter_loop(scan=True, trip=np.iinfo(np.int64).max)).why  # INT_MAX = none


def test_loop_iteration_counter_without_trip_count() -> None:
    issue = _one(_counter_loop(use_iter=True))
    assert "iteration counter 'i'" in issue.why
    _clean(_counter_loop(use_iter=True, trip=5))


def test_loop_carried_shape_change() -> None:
    issue = _one(_counter_loop(grow=True))
    assert "'s_in' changes shape across iterations ([4] -> [8])" in issue.why


def test_subgraphs_are_walked_with_path_names() -> None:
    inner = helper.make_graph([helper.make_node("NonZero", ["x"], ["nz"], name="nz_node")], "then",
                              [], [_vi("nz", I64, None)])
    other = helper.make_graph([helper.make_node("Shape", ["x"], ["sh"], name="shape")], "else", [], [_vi("sh", I64, None)])
    model = _model([helper.make_node("If", ["c"], ["out"], name="if0", then_branch=inner, else_branch=other)],
                   [_vi("x"), _vi("c", BOOL, ())], [_vi("out", I64, None)])
    issue = _one(model)
    assert (issue.node, issue.op) == ("if0/then_branch/nz_node", "NonZero")


def test_loop_body_sees_outer_initializers_as_weights() -> None:
    model = _counter_loop()
    body = model.graph.node[0].attribute[0].g
    body.node.append(helper.make_node("ReduceSum", ["s_mid", "outer_axes"], ["r"], name="inner_reduce"))
    model.graph.initializer.append(_i64("outer_axes", [0]))
    _clean(model)
    body.node.append(helper.make_node("ReduceSum", ["s_mid", "c_in"], ["r2"], name="bad_reduce"))
    assert _one(model).node == "loop/body/bad_reduce"


# ---------------------------------------------------------------------------------------- rule 7: integer data


def test_integer_data_into_float_only_layers() -> None:
    model = _model([helper.make_node("MatMul", ["a", "b"], ["c"], name="imm")], [_vi("a", I64), _vi("b", I64, (3, 2))],
                   [_vi("c", I64, None)])
    issue = _one(model)
    assert (issue.node, issue.op) == ("imm", "MatMul")
    assert issue.why == "int64 input 'a': TensorRT's MatMul takes floating-point data only"  # input 1 never reached
    cumsum = _model([helper.make_node("CumSum", ["m", "axis"], ["pos"], name="cs")], [_vi("m", I64)],
                    [_vi("pos", I64, None)], [_i64("axis", 1)])
    assert _one(cumsum).why.startswith("int64 input 'm'")


def test_integer_pow_is_version_gated() -> None:
    model = _model([helper.make_node("Pow", ["a", "e"], ["c"], name="pw")], [_vi("a"), _vi("e", I64, ())],
                   [_vi("c", F, None)])
    assert "before TensorRT 10.8" in _one(model).why
    _clean(model, TrtCheckConfig(trt_version="10.8"))


# ---------------------------------------------------------------------------------------- data file, config, loading


def test_data_file_is_consistent_with_config_and_notes_its_source() -> None:
    table = op_table()
    assert "onnx-tensorrt" in table["source"]["table"] and "10." in table["source"]["table"]
    defaults = TrtCheckConfig()
    assert table["ops"]["TopK"]["max_k"] == defaults.max_topk == 3840
    assert table["opset"]["max"] == defaults.max_opset == DEFAULT_OPSET and table["opset"]["min"] == defaults.min_opset
    assert table["trt_version_default"] == defaults.trt_version
    assert not set(table["ops"]) & set(table["unsupported"])
    known = set(table["keys"])
    for op, entry in table["ops"].items():
        assert set(entry) <= known | {"max_k"}, op
        for rule in entry.get("attributes", {}).values():
            assert rule["default"] in rule["allowed"], op  # a node without the attribute passes


def test_cli_help_states_the_config_defaults() -> None:
    helps = {action.dest: action.help for action in _subparser("check-trt")._actions}
    defaults = TrtCheckConfig()
    assert f"{defaults.max_opset})" in helps["max_opset"] and f"{defaults.max_topk})" in helps["max_topk"]
    assert f"{defaults.trt_version})" in helps["trt_version"]


def _subparser(name: str):
    parser = cli.build_parser()
    choices = next(action for action in parser._actions if getattr(action, "choices", None)).choices
    return choices[name]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        TrtCheckConfig(trt_version="ten")
    with pytest.raises(ConfigError):
        TrtCheckConfig(max_opset=8)


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    (tmp_path / "notes.onnx").write_text("not a protobuf at all\n")
    with pytest.raises(ArtifactError, match="not an ONNX model"):
        load_model(tmp_path / "notes.onnx")


def test_path_load_skips_external_data(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", F, (2, 64))],
                   [_vi("y", F, (2, 64))], [weight])
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").write_bytes(b"")  # weights gone: only the graph is read
    assert check_trt(tmp_path / "m.onnx") == []


# ---------------------------------------------------------------------------------------- exported graphs


def test_every_exported_graph_passes(tiny_artifact: Path) -> None:
    results = check_target(tiny_artifact)
    assert {result.label for result in results} == {"vision.onnx", "decoder.onnx"}
    for result in results:
        assert result.ok, [issue.line() for issue in result.issues]
    vision = next(result for result in results if result.label == "vision.onnx")
    assert {"Loop", "TopK", "ReduceSum"} <= set(vision.op_counts)  # the selection op's loop and top-K are in


# ---------------------------------------------------------------------------------------- CLI


def test_cli_good_file_prints_ok_summary(prunert_main, tmp_path: Path) -> None:
    onnx.save_model(_topk(), tmp_path / "good.onnx")
    code, out, err = prunert_main("check-trt", tmp_path / "good.onnx")
    assert code == 0, err
    assert out.startswith(f"OK  {tmp_path / 'good.onnx'}: 1 nodes, 1 op types (TopK 1); TensorRT >= 10.3, opset <= 20")


def test_cli_bad_file_prints_one_line_per_problem(prunert_main, tmp_path: Path) -> None:
    model = _topk(sorted_=0, k_values=(5000,))
    onnx.save_model(model, tmp_path / "bad.onnx")
    code, out, err = prunert_main("check-trt", tmp_path / "bad.onnx")
    assert code == 1
    assert out.splitlines() == [
        "topk  TopK  attribute sorted=0: TensorRT requires sorted=1",
        "topk  TopK  K=5000 exceeds TensorRT's TopK limit of 3840",
    ]
    assert err.startswith("FAIL  ") and "2 problem(s)" in err
    code, out, _ = prunert_main("check-trt", tmp_path / "bad.onnx", "--max-topk", "8192")
    assert code == 1 and len(out.splitlines()) == 1


@pytest.mark.parametrize("name, content, needle", [("missing.onnx", None, "no such file"),
                                                  ("notes.onnx", "hello\n", "not an ONNX model")])
def test_cli_bad_input_exits_2(prunert_main, error_line, tmp_path: Path, name: str, content, needle: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    code, out, err = prunert_main("check-trt", tmp_path / name)
    assert code == 2 and out == ""
    error_line(err, needle, name)


def test_cli_artifact_dir_checks_every_manifest_graph(cli_subprocess, tiny_artifact: Path) -> None:
    result = cli_subprocess("check-trt", tiny_artifact)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["OK  decoder.onnx", "OK  vision.onnx"]


def test_module_does_not_import_torch() -> None:
    code = "import sys, prunert.export.trt_check, prunert.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0
