"""The fused decoder's shared-buffer session: the same logits as the standard graph's numpy round trip, step by
step, with the KV cache written in place (one buffer per tensor for the whole generation), and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prunert.config import FUSED_DECODER
from prunert.errors import InputShapeError
from prunert.runtime.pipeline import make_runner
from prunert.runtime.runner import HostKVSession
from prunert.runtime.shared_kv import SharedBufferKVSession, left_padding, shift_rows

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["<image>\nWhat is in the cup?", "<image> a cat?"]


@pytest.fixture(scope="module")
def prefill_inputs(tiny_pipeline):
    from prunert.runtime.image import load_image

    image = load_image(REPO / "examples" / "images" / "coffee.jpg")
    vision = tiny_pipeline.encode_images([image, image], PROMPTS)
    embeds, mask, positions = tiny_pipeline.splice(tiny_pipeline.tokenize(PROMPTS), vision.visual_tokens)
    assert (mask[:, 0] == 0).any()  # the prompts differ in length: one row is left-padded
    return embeds, mask, positions


def test_the_cpu_pipeline_runs_the_fused_decoder_in_place(tiny_pipeline) -> None:
    assert tiny_pipeline.decoder.spec.file == "decoder_fused.onnx"
    assert isinstance(tiny_pipeline.decoder.decoder_session(tiny_pipeline.manifest.decoder.num_layers), SharedBufferKVSession)


def test_fused_session_equals_the_standard_graph_step_by_step(tiny_pipeline, prefill_inputs, greedy_steps) -> None:
    layers, table = tiny_pipeline.manifest.decoder.num_layers, tiny_pipeline.artifact.embeddings
    standard = make_runner(tiny_pipeline.artifact, "decoder", "onnxruntime")
    ref, ref_cache, mask = greedy_steps(HostKVSession(standard, layers), table, *prefill_inputs)
    fused = SharedBufferKVSession(tiny_pipeline.decoder, layers)
    ours, ours_cache, _ = greedy_steps(fused, table, *prefill_inputs)
    real = mask.astype(bool)
    for step, (a, b) in enumerate(zip(ours, ref)):
        rows = real[:, : prefill_inputs[1].shape[1]] if step == 0 else real[:, -1:]  # padded query rows are undefined
        np.testing.assert_allclose(a[rows], b[rows], atol=2e-4, rtol=0)
        assert (a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).all()
    assert not real.all()  # one row is left-padded: the session holds it from slot 0, rotated at its own positions
    for a, b in zip(ours_cache, ref_cache):  # past_key_values order: key, value per layer; in the host's layout
        assert a.shape == b.shape
        np.testing.assert_allclose(a.transpose(0, 2, 1, 3)[real], b.transpose(0, 2, 1, 3)[real], atol=2e-4, rtol=0)
        assert not a.transpose(0, 2, 1, 3)[~real].any()  # padded slots of present() are zeros


def test_the_cache_is_one_buffer_written_in_place(tiny_pipeline, prefill_inputs) -> None:
    layers = tiny_pipeline.manifest.decoder.num_layers
    session = SharedBufferKVSession(tiny_pipeline.decoder, layers)
    embeds, mask, positions = prefill_inputs
    session.reset(2)
    buffers = list(session.buffers)
    capacity = tiny_pipeline.decoder.spec.dim_ranges["cache"][2]
    assert capacity == tiny_pipeline.manifest.text.max_sequence
    assert [list(b.shape) for b in buffers] == [[2, tiny_pipeline.manifest.decoder.num_kv_heads, capacity, tiny_pipeline.manifest.decoder.head_dim]] * 2 * layers
    pointers = [b.ctypes.data for b in buffers]
    session.run(embeds, mask, positions)
    before = session.present()[0].copy()  # [B, H, L, hd]
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    session.run(embeds[:, -1:], mask, positions[:, -1:] + 1)
    assert [b.ctypes.data for b in session.buffers] == pointers  # no new cache tensors: the same memory, written in place
    after = session.present()[0]
    assert after.shape[2] == before.shape[2] + 1
    np.testing.assert_array_equal(after[:, :, :-1], before)  # earlier rows untouched
    session.reset(2)  # same batch: the buffers are reused
    assert [b.ctypes.data for b in session.buffers] == pointers and session.present()[0].shape[2] == 0


def test_shape_errors_name_the_cache(tiny_pipeline, prefill_inputs) -> None:
    session = SharedBufferKVSession(tiny_pipeline.decoder, tiny_pipeline.manifest.decoder.num_layers)
    embeds, mask, positions = prefill_inputs
    session.reset(2)
    with pytest.raises(InputShapeError, match=r"input 'attention_mask': got \(2, 3\), expected \(2, \d+\) \(cached 0 \+ new \d+ positions\)"):
        session.run(embeds, mask[:, :3], positions)
    with pytest.raises(InputShapeError, match="input 'inputs_embeds': got dtype float64"):
        session.run(embeds.astype(np.float64), mask, positions)
    holes = mask.copy()
    holes[1, -2] = 0  # a zero after a one: not left padding
    with pytest.raises(InputShapeError, match=r"input 'attention_mask': row 1 of the prefill is not left-padded"):
        session.run(embeds, holes, positions)
    capacity = session.capacity
    long = np.zeros((2, capacity + 1, embeds.shape[2]), np.float32)
    with pytest.raises(InputShapeError, match=rf"exceed the KV cache's {capacity} \(the artifact's max_sequence\)"):
        session.run(long, np.ones((2, capacity + 1), np.int64), np.zeros((2, capacity + 1), np.int64))


def test_a_variant_without_the_fused_form_runs_the_standard_decoder(tiny_artifact, tmp_path) -> None:
    """A manifest whose fp32 graphs lack decoder_fused (artifacts exported before it) runs decoder.onnx."""
    import dataclasses
    import shutil

    from prunert.manifest import MANIFEST_NAME, hash_directory, load_manifest
    from prunert.runtime import VLMPipeline

    copy = tmp_path / "old"
    shutil.copytree(tiny_artifact, copy)
    manifest = load_manifest(copy)
    graphs = {name: spec for name, spec in manifest.graphs.items() if name != FUSED_DECODER}
    for name in ("decoder_fused.onnx", "decoder_fused.onnx.data"):
        (copy / name).unlink()
    (copy / MANIFEST_NAME).unlink()
    (copy / MANIFEST_NAME).write_text(dataclasses.replace(manifest, graphs=graphs, files=hash_directory(copy)).to_json())
    pipe = VLMPipeline(copy)
    assert pipe.decoder.spec.file == "decoder.onnx"
    assert isinstance(pipe.decoder.decoder_session(manifest.decoder.num_layers), HostKVSession)


def test_rows_are_shifted_by_their_own_padding() -> None:
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], np.int64)  # [3, 4]
    pad = left_padding(mask)
    assert pad.tolist() == [2, 0, 1]
    x = np.arange(3 * 4 * 2).reshape(3, 4, 2)  # [B, S, D]
    aligned = shift_rows(x, -pad, axis=1)
    for row, p in enumerate(pad):
        assert aligned[row, : 4 - p].tolist() == x[row, p:].tolist()  # the real tokens from slot 0
    assert shift_rows(aligned, pad, axis=1).tolist() == x.tolist()
    positions = np.stack([np.arange(12).reshape(3, 4)] * 3)  # [3, B, S] (M-RoPE)
    moved = shift_rows(positions, -pad, axis=-1)
    assert moved[:, 0, :2].tolist() == positions[:, 0, 2:].tolist() and (moved[:, 1] == positions[:, 1]).all()
    assert shift_rows(x, np.zeros(3, np.int64), axis=1) is x
