"""The fused decoder graph (prunert.export.fused_decoder): ONNX Runtime's fused ops, the KV cache in one buffer per
tensor, equal to the torch decoder on a left-padded batch for every family, at fp32 and fp16."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest

from prunert.adapters import resolve_source
from prunert.export.fused_decoder import build_fused_decoder
from prunert.export.fused_validate import validate_fused_decoder
from prunert.export.graphs import decoder_dims, decoder_module
from prunert.export.pipeline import load_export_adapter
from prunert.manifest import KV_SHARED_BUFFER

FAMILIES = ["llava-tiny", "llava-next-tiny", "qwen2.5-vl-tiny"]
CAPACITY = 40


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    adapter = load_export_adapter(resolve_source(f"synthetic:{request.param}"))
    path = tmp_path_factory.mktemp(request.param) / "decoder_fused.onnx"
    return request.param, adapter, path, build_fused_decoder(adapter, CAPACITY, path)


def test_fused_graph_equals_the_torch_decoder(built) -> None:
    _, adapter, path, spec = built
    worst = validate_fused_decoder(decoder_module(adapter).eval(), path, spec, decoder_dims(adapter), tuple(adapter.position_ids_leading_dims))
    assert worst < 1e-4


def test_the_graph_is_fused_and_keeps_no_cache_copy(built) -> None:
    preset, adapter, path, spec = built
    layers = adapter.text_backbone().config.num_hidden_layers
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["SimplifiedLayerNormalization"] == 1
    assert ops["MatMul"] == 5 * layers + 1  # fused QKV, o, gate, up, down; lm_head
    assert ops["Split"] == (3 * layers if preset.startswith("qwen") else 0)  # M-RoPE: q/k/v and the halves of q and k; none in the MLP
    kv_inputs = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    readers = [node for node in model.graph.node if kv_inputs & set(node.input)]
    assert {node.op_type for node in readers} == {"GroupQueryAttention"}  # nothing else reads (or copies) the cache
    assert spec.kv_cache == KV_SHARED_BUFFER and spec.dim_ranges == {"cache": (1, CAPACITY, CAPACITY)}
    assert spec.input("past_key_values.0.key").shape[2] == spec.outputs[1].shape[2] == "cache"
    rotary_inside = [any(a.name == "do_rotary" and a.i == 1 for a in n.attribute) for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    sections = adapter.decoder_rope().sections
    assert rotary_inside == [not sections] * layers and (("Cos" in ops) == bool(sections))  # M-RoPE: rotated before attention
    assert len(model.graph.node) < (12 if not sections else 40) * layers + 20


@pytest.mark.parametrize("preset", ["llava-tiny", "qwen2.5-vl-tiny"])
def test_fp16_form_loads_and_runs_in_a_fresh_process(preset: str, tmp_path: Path) -> None:
    """export --dtype fp16 builds it in float16 (KV buffers float16, I/O float32). A separate process: an ONNX Runtime
    optimizer once crashed on the M-RoPE prelude's Transpose in float16 (segfault at session creation)."""
    script = f"""
import numpy as np
from prunert.adapters import resolve_source
from prunert.config import RuntimeConfig
from prunert.export.fused_decoder import build_fused_decoder
from prunert.export.pipeline import load_export_adapter
from prunert.runtime.runner import OnnxRuntimeRunner
adapter = load_export_adapter(resolve_source("synthetic:{preset}"), "fp16")
spec = build_fused_decoder(adapter, 16, __import__("pathlib").Path(r"{tmp_path}") / "f.onnx", "float16")
assert spec.input("past_key_values.0.key").dtype == "float16" and spec.input("inputs_embeds").dtype == "float32"
session = OnnxRuntimeRunner(__import__("pathlib").Path(r"{tmp_path}") / "f.onnx", spec, runtime=RuntimeConfig(threads=1)).decoder_session(
    adapter.text_backbone().config.num_hidden_layers)
session.reset(1)
lead = tuple(adapter.position_ids_leading_dims)
positions = np.zeros((*lead, 1, 3), np.int64) + np.arange(3)
logits = session.run(np.ones((1, 3, spec.input("inputs_embeds").shape[2]), np.float32), np.ones((1, 3), np.int64), positions)
assert logits.dtype == np.float32 and np.isfinite(logits).all()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-2000:])


def test_check_trt_skips_the_onnx_runtime_form(tiny_artifact: Path, prunert_main) -> None:
    code, out, err = prunert_main("check-trt", str(tiny_artifact))
    assert code == 0, err
    assert "vision.onnx" in out and "decoder.onnx" in out and "decoder_fused" not in out + err
