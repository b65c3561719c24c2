"""The one decode loop (prunert.runtime.decode.decode_steps) and the KV cache found by its declared names
(prunert.runtime.runner.cache_names), not by position in the decoder's inputs and outputs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from prunert.errors import ArtifactError
from prunert.manifest import GraphSpec, TensorSpec
from prunert.runtime.decode import decode_steps, greedy, table_embedder
from prunert.runtime.pipeline import VLMPipeline
from prunert.runtime.runner import HostKVSession, Runner, cache_names

VOCAB, HIDDEN, LAYERS = 6, 2, 2


class ScriptedSession:
    """Logits that make token `script[row][call]` win on decoder call `call` (call 0: the prefill's)."""

    def __init__(self, script: list[list[int]]):
        self.script, self.calls, self.live, self.kept = script, [], list(range(len(script))), []

    def logits(self, call: int) -> np.ndarray:
        out = np.zeros((len(self.live), VOCAB), np.float32)
        for i, row in enumerate(self.live):
            tokens = self.script[row]
            out[i, tokens[min(call, len(tokens) - 1)]] = 1.0
        return out

    def run(self, embeds, mask, positions):
        self.calls.append((embeds.copy(), mask.copy(), positions.copy()))
        return self.logits(len(self.calls))[:, None]  # [B, 1, V]

    def keep(self, rows, trim=0):  # DecoderSession.keep: finished rows leave
        self.kept.append((list(rows), trim))
        self.live = [self.live[i] for i in rows]


def _steps(script, steps, eos=(5,), pad=0):
    session = ScriptedSession(script)
    mask, positions = np.ones((len(script), 3), np.int64), np.full((len(script), 1), 3)
    table = np.arange(VOCAB * HIDDEN, dtype=np.float32).reshape(VOCAB, HIDDEN)
    out = list(decode_steps(session, session.logits(0), mask, positions, table_embedder(table), greedy, steps, eos, pad))
    return out, session


def test_eos_finishes_its_row_and_pads_it_after() -> None:
    out, session = _steps([[1, 5, 2, 2], [3, 4, 4, 1]], steps=4)
    assert [s.tokens.tolist() for s in out] == [[1, 3], [5, 4], [0, 4], [0, 1]]  # row 0: EOS at step 1, then pad
    assert [s.active.tolist() for s in out] == [[True, True], [True, True], [False, True], [False, True]]
    assert [s.last.tolist() for s in out] == [[False, False], [True, False], [False, False], [False, True]]
    assert len(session.calls) == 3  # n steps, n - 1 decoder calls: step 0 chose from the prefill
    assert session.kept == [([1], 0)]  # row 0 left the session after its EOS (no padding column to trim)
    assert [c[1].shape for c in session.calls] == [(2, 4), (1, 5), (1, 6)]  # one column longer each call, row 0 gone
    assert [c[2][:, 0].tolist() for c in session.calls] == [[3, 3], [4], [5]]  # positions one further
    np.testing.assert_array_equal(session.calls[2][0][:, 0], [[8, 9]])  # step 2 runs only row 1's token 4, embedded
    assert not out[2].logits[0].any() and out[2].logits[1].argmax() == 4  # a finished row's logits are zeros


def test_all_rows_finished_stops_early() -> None:
    out, session = _steps([[5, 1], [2, 5]], steps=10)
    assert len(out) == 2 and len(session.calls) == 1
    assert out[-1].last.tolist() == [False, True] and out[0].last.tolist() == [True, False]


def test_without_eos_every_step_runs() -> None:
    """The benchmarks' mode: a fixed number of decoder calls, EOS ignored."""
    out, session = _steps([[5, 5, 5]], steps=3, eos=())
    assert [s.tokens.tolist() for s in out] == [[5], [5], [5]] and len(session.calls) == 2
    assert out[-1].last.tolist() == [True]


# ---- the KV cache by name ----------------------------------------------------------------------
def _decoder_spec(reorder: bool) -> GraphSpec:
    """A decoder spec whose inputs and outputs are not in the export's order when `reorder`."""
    past = [TensorSpec(f"past_key_values.{i}.{kind}", "float32", ("batch", 1, "past", HIDDEN)) for i in range(LAYERS) for kind in ("key", "value")]
    present = [TensorSpec(f"present.{i}.{kind}", "float32", ("batch", 1, "total", HIDDEN)) for i in range(LAYERS) for kind in ("key", "value")]
    host = [TensorSpec("inputs_embeds", "float32", ("batch", "sequence", HIDDEN)), TensorSpec("attention_mask", "int64", ("batch", "total")),
            TensorSpec("position_ids", "int64", ("batch", "sequence"))]
    logits = TensorSpec("logits", "float32", ("batch", "sequence", VOCAB))
    if reorder:
        return GraphSpec("decoder.onnx", (past[2], host[0], *past[:2], host[1], past[3], host[2]), (present[3], logits, *present[:3][::-1]))
    return GraphSpec("decoder.onnx", (*host, *past), (logits, *present))


class TaggingDecoder(Runner):
    """present.X = past.X with one position appended whose value tags X (layer * 2 + kind)."""

    def _run(self, feeds):
        batch, steps = feeds["inputs_embeds"].shape[:2]
        out = {"logits": np.zeros((batch, steps, VOCAB), np.float32)}
        for i in range(LAYERS):
            for k, kind in enumerate(("key", "value")):
                past = feeds[f"past_key_values.{i}.{kind}"]
                out[f"present.{i}.{kind}"] = np.concatenate([past, np.full((batch, 1, 1, HIDDEN), 2 * i + k, np.float32)], axis=2)
        return out


@pytest.mark.parametrize("reorder", [False, True])
def test_cache_names_pair_past_and_present_by_name(reorder: bool) -> None:
    names = cache_names(_decoder_spec(reorder), LAYERS)
    assert [p.removeprefix("past_key_values.") for p in names.past] == [p.removeprefix("present.") for p in names.present]
    assert set(names.past) == {f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")}


@pytest.mark.parametrize("reorder", [False, True])
def test_host_session_feeds_each_past_its_own_present(reorder: bool) -> None:
    session = HostKVSession(TaggingDecoder(_decoder_spec(reorder)), LAYERS)
    session.reset(1)
    for step in range(2):
        session.run(np.zeros((1, 1, HIDDEN), np.float32), np.ones((1, step + 1), np.int64), np.full((1, 1), step))
    tags = {name: cache[0, 0, :, 0].tolist() for name, cache in zip(session.past_names, session.present())}
    assert tags == {f"past_key_values.{i}.{kind}": [2 * i + k] * 2 for i in range(LAYERS) for k, kind in enumerate(("key", "value"))}


def test_run_decoder_returns_present_in_past_order() -> None:
    spec = _decoder_spec(reorder=True)
    pipe = SimpleNamespace(decoder=TaggingDecoder(spec))
    past = [np.zeros((1, 1, 0, HIDDEN), np.float32) for _ in range(2 * LAYERS)]
    _, present = VLMPipeline.run_decoder(pipe, np.zeros((1, 1, HIDDEN), np.float32), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64), past)
    names = cache_names(spec)
    assert [p[0, 0, 0, 0] for p in present] == [int(n.split(".")[1]) * 2 + (n.endswith("value")) for n in names.past]


def test_cache_names_refuse_unpaired_tensors() -> None:
    spec = _decoder_spec(reorder=False)
    broken = GraphSpec(spec.file, spec.inputs, spec.outputs[:-1] + (TensorSpec("present.9.value", "float32", spec.outputs[-1].shape),))
    with pytest.raises(ArtifactError, match=r"missing \['present.1.value'\], unpaired \['present.9.value'\]"):
        cache_names(broken)
    with pytest.raises(ArtifactError, match="4 past_key_values.\\* inputs, expected 6"):
        cache_names(spec, num_layers=3)


def _reordered_onnx_decoder(path) -> GraphSpec:
    """A one-layer ONNX decoder whose outputs are declared (present.0.value, logits, present.0.key): each present
    appends the step's embeddings to its past, the value + 100, so key and value are told apart by content."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def value(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, list(shape))

    kv = ("batch", 1, "past", HIDDEN)
    inputs = [value("inputs_embeds", TensorProto.FLOAT, ("batch", "sequence", HIDDEN)), value("attention_mask", TensorProto.INT64, ("batch", "total")),
              value("position_ids", TensorProto.INT64, ("batch", "sequence")), value("past_key_values.0.key", TensorProto.FLOAT, kv),
              value("past_key_values.0.value", TensorProto.FLOAT, kv)]
    present = ("batch", 1, "total", HIDDEN)
    outputs = [value("present.0.value", TensorProto.FLOAT, present), value("logits", TensorProto.FLOAT, ("batch", "sequence", VOCAB)),
               value("present.0.key", TensorProto.FLOAT, present)]
    nodes = [helper.make_node("Unsqueeze", ["inputs_embeds", "one"], ["step"]),  # [B, 1, S, D]
             helper.make_node("Add", ["step", "hundred"], ["step_value"]),
             helper.make_node("Concat", ["past_key_values.0.key", "step"], ["present.0.key"], axis=2),
             helper.make_node("Concat", ["past_key_values.0.value", "step_value"], ["present.0.value"], axis=2),
             helper.make_node("MatMul", ["inputs_embeds", "head"], ["logits"])]
    weights = [numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array(100.0, np.float32), "hundred"),
               numpy_helper.from_array(np.ones((HIDDEN, VOCAB), np.float32), "head")]
    model = helper.make_model(helper.make_graph(nodes, "decoder", inputs, outputs, weights), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    spec = lambda v: TensorSpec(v.name, "int64" if v.type.tensor_type.elem_type == TensorProto.INT64 else "float32",  # noqa: E731
                                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
    return GraphSpec(path.name, tuple(map(spec, inputs)), tuple(map(spec, outputs)))


def test_bound_session_takes_the_cache_by_name_from_a_reordered_graph(tmp_path) -> None:
    """IOBinding returns outputs in the order bound; the cache must be taken by name, not as outputs[1:]."""
    from prunert.runtime.runner import OnnxRuntimeRunner, OrtBoundKVSession

    spec = _reordered_onnx_decoder(tmp_path / "decoder.onnx")
    runner = OnnxRuntimeRunner(tmp_path / "decoder.onnx", spec)
    caches = []
    for session in (OrtBoundKVSession(runner, 1), HostKVSession(runner, 1)):
        session.reset(1)
        for step in range(2):
            embeds = np.full((1, 1, HIDDEN), step + 1, np.float32)
            logits = session.run(embeds, np.ones((1, step + 1), np.int64), np.full((1, 1), step))
            assert logits.shape == (1, 1, VOCAB)
        caches.append(dict(zip(session.past_names, session.present())))
    for cache in caches:
        assert cache["past_key_values.0.key"][0, 0, :, 0].tolist() == [1.0, 2.0]
        assert cache["past_key_values.0.value"][0, 0, :, 0].tolist() == [101.0, 102.0]
