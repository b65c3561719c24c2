"""Real TensorRT engines on a CUDA GPU (marked `gpu`; skipped unless tensorrt imports and a CUDA device
exists): fp32 engines of the tiny artifact against ONNX Runtime on CPU, the device-KV decoder session
against HostKVSession over the same engine, cache hits, and a tampered engine record refused."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prunert.config import EngineBuildConfig, ParityTolerances
from prunert.errors import ArtifactError
from prunert.manifest import Manifest, load_manifest
from prunert.runtime.runner import HostKVSession, OnnxRuntimeRunner


def _skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    try:
        from prunert.runtime import cuda

        if cuda.device_count() < 1:
            return "no CUDA device"
    except Exception as exc:  # cuda-python missing or no driver
        return f"CUDA unavailable: {exc}"
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]
TOL = ParityTolerances.for_precision("fp32")


@pytest.fixture(scope="module")
def gpu_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, float]:
    from prunert.engines.builder import build_engines

    directory = tmp_path_factory.mktemp("gpu") / "tiny"
    shutil.copytree(tiny_artifact, directory)
    start = time.perf_counter()
    manifest = build_engines(directory, EngineBuildConfig(precision="fp32", workspace_bytes=1 << 30), log=print)
    return directory, manifest, time.perf_counter() - start


@pytest.fixture(scope="module")
def runners(gpu_artifact):
    from prunert.runtime.trt_runner import load_trt_runner

    directory, manifest, _ = gpu_artifact
    trt = {graph: load_trt_runner(directory, graph, "fp32") for graph in ("vision", "decoder")}
    ort = {graph: OnnxRuntimeRunner(directory / manifest.graphs[graph].file, manifest.graphs[graph]) for graph in ("vision", "decoder")}
    yield trt, ort
    for runner in trt.values():
        runner.close()


def test_engines_recorded_for_this_gpu(gpu_artifact) -> None:
    import tensorrt

    from prunert.runtime import cuda

    directory, manifest, _ = gpu_artifact
    assert load_manifest(directory) == manifest
    assert sorted(e.graph for e in manifest.engines) == ["decoder", "vision"]
    for engine in manifest.engines:
        assert engine.tensorrt_version == tensorrt.__version__
        assert engine.compute_capability == cuda.compute_capability()
        assert engine.device_name == cuda.device_name()
        assert (directory / engine.file).stat().st_size > 0 and engine.build_seconds > 0


def test_engine_profiles_match_the_manifest(gpu_artifact, runners) -> None:
    from prunert.engines.profiles import Profile

    _, manifest, _ = gpu_artifact
    trt, _ = runners
    for graph, runner in trt.items():
        recorded = [Profile.from_dict(p) for p in next(e for e in manifest.engines if e.graph == graph).profiles]
        assert [p.shapes for p in runner.profiles] == [p.shapes for p in recorded]
        assert [p.name for p in runner.profiles] == [p.name for p in recorded]


@pytest.mark.parametrize("batch, words", [(1, 3), (2, 5), (3, 1)])
def test_vision_engine_matches_onnxruntime(gpu_artifact, runners, batch: int, words: int) -> None:
    _, manifest, _ = gpu_artifact
    trt, ort = runners
    rng = np.random.default_rng(batch * 7 + words)
    feeds = {
        "pixel_values": rng.standard_normal((batch, 3, 140, 140)).astype(np.float32),
        "text_embeds": rng.standard_normal((batch, words, manifest.decoder.hidden_size)).astype(np.float32),
        "text_mask": np.ones((batch, words), np.int64),
    }
    ours, reference = trt["vision"].infer(feeds), ort["vision"].infer(feeds)
    assert ours["kept_indices"].shape == (batch, manifest.budget.budget) and ours["kept_indices"].dtype == np.int64
    for row in range(batch):
        assert set(ours["kept_indices"][row].tolist()) == set(reference["kept_indices"][row].tolist())
    np.testing.assert_array_equal(ours["kept_indices"], reference["kept_indices"])  # ascending, so equal arrays
    assert np.abs(ours["visual_tokens"] - reference["visual_tokens"]).max() <= TOL.tokens_max_abs


def _prompt(manifest: Manifest, batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, length, manifest.decoder.hidden_size)).astype(np.float32)
    mask = np.ones((batch, length), np.int64)
    if batch > 1:
        mask[1, :4] = 0  # left padding, as the pipeline batches prompts
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return embeds, mask, positions


def test_decoder_engine_matches_onnxruntime(gpu_artifact, runners) -> None:
    """Prefill (context profile, empty past) then one decode step (generation profile)."""
    _, manifest, _ = gpu_artifact
    trt, ort = runners
    dec = manifest.decoder
    embeds, mask, positions = _prompt(manifest, 2, 24)
    empty = [np.zeros((2, dec.num_kv_heads, 0, dec.head_dim), np.float32) for _ in range(2 * dec.num_layers)]
    names = [t.name for t in manifest.graphs["decoder"].inputs]
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **dict(zip(names[3:], empty))}
    ours, reference = trt["decoder"].infer(feeds), ort["decoder"].infer(feeds)
    for name in reference:
        assert ours[name].shape == reference[name].shape, name
        assert np.abs(ours[name] - reference[name]).max() <= TOL.logits_max_abs, name
    present = [reference[t.name] for t in manifest.graphs["decoder"].outputs[1:]]
    step = {
        "inputs_embeds": np.random.default_rng(1).standard_normal((2, 1, dec.hidden_size)).astype(np.float32),
        "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
        "position_ids": positions[:, -1:] + 1,
        **dict(zip(names[3:], present)),
    }
    ours, reference = trt["decoder"].infer(step), ort["decoder"].infer(step)
    assert ours["logits"].shape == (2, 1, dec.vocab_size)
    for name in reference:
        assert np.abs(ours[name] - reference[name]).max() <= TOL.logits_max_abs, name


def test_device_kv_decode_equals_host_kv(gpu_artifact, runners) -> None:
    from prunert.runtime.trt_runner import TensorRTDecoderSession

    _, manifest, _ = gpu_artifact
    trt, ort = runners
    layers, hidden = manifest.decoder.num_layers, manifest.decoder.hidden_size
    device = trt["decoder"].decoder_session(layers)
    assert isinstance(device, TensorRTDecoderSession)
    sessions = [device, HostKVSession(trt["decoder"], layers), HostKVSession(ort["decoder"], layers)]
    embeds, mask, positions = _prompt(manifest, 2, 20, seed=3)
    for session in sessions:
        session.reset(2)
    outs = [session.run(embeds, mask, positions) for session in sessions]
    rng = np.random.default_rng(4)
    for _ in range(4):
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)
        assert np.abs(outs[0] - outs[2]).max() <= TOL.logits_max_abs
        token = rng.standard_normal((2, 1, hidden)).astype(np.float32)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        outs = [session.run(token, mask, positions) for session in sessions]
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)
    assert np.abs(outs[0] - outs[2]).max() <= TOL.logits_max_abs
    caches = [session.present() for session in sessions]
    assert caches[0][0].shape == (2, manifest.decoder.num_kv_heads, 24, manifest.decoder.head_dim)
    for ours, host, reference in zip(*caches):
        np.testing.assert_allclose(ours, host, rtol=0, atol=1e-5)
        assert np.abs(ours - reference).max() <= TOL.logits_max_abs


def test_second_build_is_a_cache_hit(gpu_artifact, tiny_artifact: Path, tmp_path: Path) -> None:
    from prunert.engines.builder import build_engines

    directory, manifest, first_seconds = gpu_artifact
    messages: list[str] = []
    again = build_engines(directory, EngineBuildConfig(precision="fp32", workspace_bytes=1 << 30), log=messages.append)
    assert again == manifest
    assert sum("up to date" in m for m in messages) == 2
    elsewhere = tmp_path / "copy"
    shutil.copytree(tiny_artifact, elsewhere)
    messages.clear()
    start = time.perf_counter()
    copied = build_engines(elsewhere, EngineBuildConfig(precision="fp32", workspace_bytes=1 << 30), log=messages.append)
    assert sum("reusing this machine's engine" in m for m in messages) == 2
    assert time.perf_counter() - start < max(5.0, first_seconds)
    assert sorted(e.cache_key for e in copied.engines) == sorted(e.cache_key for e in manifest.engines)


def test_tampered_engine_spec_is_refused(gpu_artifact) -> None:
    from prunert.runtime.trt_runner import TensorRTRunner

    directory, manifest, _ = gpu_artifact
    engine = next(e for e in manifest.engines if e.graph == "vision")
    for tampered in (replace(engine, tensorrt_version="9.9.9"), replace(engine, compute_capability="1.0")):
        with pytest.raises(ArtifactError) as info:
            TensorRTRunner(directory / engine.file, manifest.graphs["vision"], tampered)
        assert "rebuild with `prunert build ARTIFACT --precision fp32`" in str(info.value)
        assert f"built with TensorRT {tampered.tensorrt_version} for compute capability {tampered.compute_capability}" in str(info.value)
