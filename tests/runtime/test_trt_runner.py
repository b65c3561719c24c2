"""The TensorRT runner on CPU: missing tensorrt / cuda-python are named; with the fake backend
(tests/engines/test_engine_fake_backend.py: device memory = bounds-checked host memory, engine = ONNX
Runtime behind TensorRT's API) the runner matches ONNX Runtime, the device-KV decoder session matches
HostKVSession, and incompatible engines are refused before deserialization. Real-GPU tests live in
tests/engines/test_engine_gpu.py."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prunert.config import EngineBuildConfig
from prunert.errors import ArtifactError, BackendUnavailableError, InputShapeError
from prunert.manifest import EngineSpec, load_manifest
from prunert.runtime import cuda
from prunert.runtime.runner import HostKVSession, OnnxRuntimeRunner

@pytest.fixture
def fake(fake_trt):
    return fake_trt


@pytest.fixture
def built(fake, artifact_copy: Path) -> Path:
    from prunert.engines.builder import build_engines

    build_engines(artifact_copy, EngineBuildConfig(), log=lambda m: None)
    return artifact_copy


def vision_feeds(batch: int, words: int, hidden: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 10 + words)
    return {
        "pixel_values": rng.standard_normal((batch, 3, 140, 140)).astype(np.float32),
        "text_embeds": rng.standard_normal((batch, words, hidden)).astype(np.float32),
        "text_mask": np.ones((batch, words), np.int64),
    }


# ---- without the backend -----------------------------------------------------------------------
def test_runner_names_missing_tensorrt(monkeypatch, tiny_artifact: Path) -> None:
    from prunert.runtime.trt_runner import TensorRTRunner, load_trt_runner

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    manifest = load_manifest(tiny_artifact)
    spec = EngineSpec("vision", "fp32", "x.plan", "0" * 64, "0" * 64, "10.3.0", "8.7", "Orin", (), {}, 1.0)
    for call in (lambda: TensorRTRunner(tiny_artifact / "x.plan", manifest.graphs["vision"], spec),
                 lambda: load_trt_runner(tiny_artifact, "vision")):
        with pytest.raises(BackendUnavailableError, match="package tensorrt is not installed: it comes with JetPack"):
            call()


def test_cuda_wrapper_names_missing_cuda_python(monkeypatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    for call in (cuda.compute_capability, cuda.device_name, cuda.Stream, lambda: cuda.DeviceBuffer(8)):
        with pytest.raises(BackendUnavailableError, match=r"cuda-python is not installed \(pip install cuda-python"):
            call()


def test_cuda_errors_carry_the_cuda_name(fake) -> None:
    _, cudart = fake
    assert cuda.compute_capability() == "8.7" and cuda.device_name() == "Fake Orin" and cuda.device_count() == 1
    cudart.fail_malloc = True
    with pytest.raises(cuda.CudaError, match=r"cudaMalloc\(64 bytes\) failed: cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(64)


def test_cuda_without_a_driver(fake, monkeypatch) -> None:
    """cuda-python raises RuntimeError when libcuda.so.1 cannot be loaded (measured with cuda-python 12.6)."""
    _, cudart = fake

    def no_driver(*args):
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    for name in ("cudaGetDeviceCount", "cudaGetDevice", "cudaMalloc"):
        monkeypatch.setattr(cudart, name, no_driver)
    assert cuda.device_count() == 0
    for call in (cuda.compute_capability, lambda: cuda.DeviceBuffer(8)):
        with pytest.raises(BackendUnavailableError, match="CUDA is not usable on this machine \\(Failed to dlopen libcuda.so.1\\)"):
            call()


def test_import_without_torch_or_backends(python_without, tiny_artifact: Path) -> None:
    result = python_without(
        """
        import prunert.engines.builder, prunert.runtime.trt_runner
        from prunert.config import EngineBuildConfig
        from prunert.engines.profiles import derive_profiles
        from prunert.manifest import load_manifest
        manifest = load_manifest(sys.argv[1])
        print(len(derive_profiles(manifest, "decoder", EngineBuildConfig())))
        assert_no_heavy_modules()
        """,
        tiny_artifact,
        blocked=("torch", "transformers", "tensorrt", "cuda"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


# ---- with the fake backend ---------------------------------------------------------------------
def test_vision_engine_matches_onnxruntime(built: Path) -> None:
    from prunert.runtime.trt_runner import load_trt_runner

    manifest = load_manifest(built)
    runner = load_trt_runner(built, "vision")
    reference = OnnxRuntimeRunner(built / manifest.graphs["vision"].file, manifest.graphs["vision"])
    for batch, words in ((1, 3), (2, 5), (1, 3)):
        feeds = vision_feeds(batch, words, manifest.decoder.hidden_size)
        ours, theirs = runner.infer(feeds), reference.infer(feeds)
        assert ours["kept_indices"].dtype == np.int64
        np.testing.assert_array_equal(ours["kept_indices"], theirs["kept_indices"])
        np.testing.assert_allclose(ours["visual_tokens"], theirs["visual_tokens"], rtol=0, atol=0)
    runner.close()


def test_buffers_are_reused(fake, built: Path) -> None:
    from prunert.runtime.trt_runner import load_trt_runner

    _, cudart = fake
    hidden = load_manifest(built).decoder.hidden_size
    runner = load_trt_runner(built, "vision")
    runner.infer(vision_feeds(2, 5, hidden))
    allocated = cudart.mallocs
    runner.infer(vision_feeds(2, 5, hidden))
    runner.infer(vision_feeds(1, 2, hidden))  # smaller: same buffers
    assert cudart.mallocs == allocated


def test_decoder_session_keeps_kv_on_device(built: Path) -> None:
    """Prefill + 4 decode steps through TensorRTDecoderSession equal HostKVSession on the same engine
    and plain ONNX Runtime, logits and cache alike (batch 2, left padding)."""
    from prunert.runtime.trt_runner import TensorRTDecoderSession, load_trt_runner

    manifest = load_manifest(built)
    layers, hidden = manifest.decoder.num_layers, manifest.decoder.hidden_size
    runner = load_trt_runner(built, "decoder")
    reference = OnnxRuntimeRunner(built / manifest.graphs["decoder"].file, manifest.graphs["decoder"])
    sessions = [runner.decoder_session(layers), HostKVSession(runner, layers), HostKVSession(reference, layers)]
    assert isinstance(sessions[0], TensorRTDecoderSession)
    rng = np.random.default_rng(0)
    batch, prompt = 2, 20
    embeds = rng.standard_normal((batch, prompt, hidden)).astype(np.float32)
    mask = np.ones((batch, prompt), np.int64)
    mask[1, :3] = 0  # left padding
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    for session in sessions:
        session.reset(batch)
    steps = [(embeds, mask, positions)]
    for step in range(4):
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        steps.append((rng.standard_normal((batch, 1, hidden)).astype(np.float32), mask, positions))
    for inputs in steps:
        outs = [session.run(*inputs) for session in sessions]
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)
        np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=1e-5)
    caches = [session.present() for session in sessions]
    assert len(caches[0]) == 2 * layers and caches[0][0].shape == (batch, manifest.decoder.num_kv_heads, prompt + 4, manifest.decoder.head_dim)
    for ours, host, onnx in zip(*caches):
        np.testing.assert_allclose(ours, host, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours, onnx, rtol=0, atol=1e-5)
    sessions[0].reset(1)  # a new, smaller batch reuses the buffers and starts empty
    assert sessions[0].present()[0].shape[2] == 0
    with pytest.raises(InputShapeError, match="reset for batch 1"):
        sessions[0].run(*steps[0])


def test_decoder_session_limits(built: Path) -> None:
    from prunert.runtime.trt_runner import load_trt_runner

    manifest = load_manifest(built)
    session = load_trt_runner(built, "decoder").decoder_session(manifest.decoder.num_layers)
    hidden, top = manifest.decoder.hidden_size, manifest.text.max_sequence
    with pytest.raises(InputShapeError, match="batch 9, expected 1..8"):
        session.reset(9)
    session.reset(1)
    embeds, ones = np.zeros((1, 5, hidden), np.float32), np.ones((1, 6), np.int64)
    with pytest.raises(InputShapeError, match="expected past \\+ sequence = 0 \\+ 5"):
        session.run(embeds, ones, np.zeros((1, 5), np.int64))
    session.run(np.zeros((1, top, hidden), np.float32), np.ones((1, top), np.int64), np.arange(top)[None])
    with pytest.raises(InputShapeError, match=f"exceed the engine's maximum sequence {top}"):
        session.run(np.zeros((1, 1, hidden), np.float32), np.ones((1, top + 1), np.int64), np.array([[top]]))


def test_shapes_outside_every_profile(fake, artifact_copy: Path) -> None:
    from prunert.engines.builder import build_engines
    from prunert.runtime.trt_runner import load_trt_runner

    build_engines(artifact_copy, EngineBuildConfig(max_batch=2, graphs=("vision",)), log=lambda m: None)
    runner = load_trt_runner(artifact_copy, "vision")
    with pytest.raises(InputShapeError, match="no optimization profile holds pixel_values \\[3, 3, 140, 140\\]"):
        runner.infer(vision_feeds(3, 2, load_manifest(artifact_copy).decoder.hidden_size))


def test_incompatible_engine_is_refused_before_deserializing(fake, built: Path) -> None:
    from prunert.runtime.trt_runner import TensorRTRunner, load_trt_runner

    trt, _ = fake
    manifest = load_manifest(built)
    engine = next(e for e in manifest.engines if e.graph == "vision")
    tampered = replace(engine, tensorrt_version="10.0.1")
    with pytest.raises(ArtifactError) as info:
        TensorRTRunner(built / engine.file, manifest.graphs["vision"], tampered)
    assert "built with TensorRT 10.0.1 for compute capability 8.7 (device Fake Orin)" in str(info.value)
    assert "this machine has TensorRT 10.3.0, compute capability 8.7: rebuild with `prunert build ARTIFACT --precision fp32`" in str(info.value)
    assert trt.deserialized == []
    trt.__version__ = "10.4.0"  # this machine moved on: the manifest's engines no longer fit
    with pytest.raises(ArtifactError, match="built with TensorRT 10.3.0 .* this machine has TensorRT 10.4.0"):
        load_trt_runner(built, "vision")
    assert trt.deserialized == []


def test_engine_io_must_have_numpy_types(fake, built: Path) -> None:
    from prunert.runtime.trt_runner import load_trt_runner

    trt, _ = fake
    trt.dtype_overrides["visual_tokens"] = "BF16"
    with pytest.raises(ArtifactError, match="'visual_tokens' has TensorRT dtype BF16, which numpy cannot hold"):
        load_trt_runner(built, "vision")
    trt.dtype_overrides["visual_tokens"] = "HALF"
    with pytest.raises(ArtifactError, match="'visual_tokens' is float16, the manifest says float32"):
        load_trt_runner(built, "vision")


def test_no_engine_for_this_machine(fake, artifact_copy: Path) -> None:
    from prunert.runtime.trt_runner import load_trt_runner

    with pytest.raises(ArtifactError, match=r"no fp32 TensorRT engine for graph 'decoder'.*`prunert build ARTIFACT --precision fp32`"):
        load_trt_runner(artifact_copy, "decoder")
