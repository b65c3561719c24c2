"""Decoder sessions: the IOBinding session (cache kept as OrtValues) equals the numpy round trip, step
by step; host inputs are checked; GPU backends and precisions fail clearly where they are absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prunert.errors import ArtifactError, BackendUnavailableError, ConfigError, InputShapeError
from prunert.runtime.pipeline import make_runner
from prunert.runtime.runner import HostKVSession, OrtBoundKVSession

PROMPT = "<image>\nWhat is in the cup?"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefill_inputs(tiny_pipeline):
    from prunert.runtime.image import load_image

    image = load_image(REPO / "examples" / "images" / "coffee.jpg")
    vision = tiny_pipeline.encode_images([image, image], [PROMPT, "<image> a cat?"])
    return tiny_pipeline.splice(tiny_pipeline.tokenize([PROMPT, "<image> a cat?"]), vision.visual_tokens)


@pytest.fixture(scope="module")
def standard_decoder(tiny_pipeline):
    """The standard-op decoder graph (TensorRT's and the GPU backends' form) on ONNX Runtime CPU."""
    return make_runner(tiny_pipeline.artifact, "decoder", "onnxruntime")


def test_bound_session_equals_host_round_trip(tiny_pipeline, standard_decoder, prefill_inputs, greedy_steps) -> None:
    layers = tiny_pipeline.manifest.decoder.num_layers
    assert isinstance(standard_decoder.decoder_session(layers), HostKVSession)  # CPU default for this graph (see runner.py)
    bound = OrtBoundKVSession(standard_decoder, layers)  # what ort-cuda uses, here with CPU OrtValues
    table = tiny_pipeline.artifact.embeddings
    ours, ours_cache, _ = greedy_steps(bound, table, *prefill_inputs)
    ref, ref_cache, _ = greedy_steps(HostKVSession(standard_decoder, layers), table, *prefill_inputs)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    assert [c.shape for c in ours_cache] == [c.shape for c in ref_cache]
    total = prefill_inputs[1].shape[1] + 4
    assert ours_cache[0].shape[2] == total
    for a, b in zip(ours_cache, ref_cache):
        np.testing.assert_array_equal(a, b)


def test_bound_session_checks_host_inputs(tiny_pipeline, standard_decoder, prefill_inputs) -> None:
    embeds, mask, positions = prefill_inputs
    session = OrtBoundKVSession(standard_decoder, tiny_pipeline.manifest.decoder.num_layers)
    session.reset(2)
    with pytest.raises(InputShapeError, match="input 'inputs_embeds': got dtype float64"):
        session.run(embeds.astype(np.float64), mask, positions)
    with pytest.raises(InputShapeError, match="input 'attention_mask'"):
        session.run(embeds, mask[:, 1:], positions)


def test_gpu_backends_name_the_missing_package(tiny_artifact) -> None:
    from prunert.runtime import Artifact
    from prunert.runtime.pipeline import make_runner

    artifact = Artifact(tiny_artifact)
    for backend in ("ort-cuda", "ort-trt"):
        with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
            make_runner(artifact, "vision", backend)
    with pytest.raises(ConfigError, match="--backend 'cuda': unknown; expected one of"):
        make_runner(artifact, "vision", "cuda")
    with pytest.raises(ConfigError, match="--precision: got 'fp64'"):
        make_runner(artifact, "vision", "onnxruntime", precision="fp64")
    with pytest.raises(ArtifactError, match="artifact .*: manifest.json: no int8 graphs .*prunert calibrate"):
        make_runner(artifact, "vision", "onnxruntime", precision="int8")


def test_trt_provider_profiles_span_the_manifest(tiny_artifact, monkeypatch, tmp_path) -> None:
    """ort-trt's explicit profile shapes: one range per input covering both decoder profiles."""
    from prunert.manifest import load_manifest
    from prunert.runtime.ort_gpu import trt_provider_options

    monkeypatch.setenv("PRUNERT_CACHE", str(tmp_path))
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    options = trt_provider_options(manifest, "decoder", "fp32", "ab" * 32)
    low = dict(item.split(":") for item in options["trt_profile_min_shapes"].split(","))
    high = dict(item.split(":") for item in options["trt_profile_max_shapes"].split(","))
    past_low, past_high = low["past_key_values.0.key"].split("x"), high["past_key_values.0.key"].split("x")
    assert past_low[2] == "0" and int(past_high[2]) == manifest.text.max_sequence - 1
    assert int(high["inputs_embeds"].split("x")[1]) == manifest.text.max_sequence
    assert options["trt_engine_cache_path"].startswith(str(tmp_path)) and not options["trt_int8_enable"]
