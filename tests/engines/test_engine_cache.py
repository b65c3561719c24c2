"""Engine cache keys (every component counts, nothing else does), cache locations, and finding the engine
for this machine in a manifest, with the messages that say how to rebuild."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest

from prunert.artifact_update import ArtifactUpdate
from prunert.config import EngineBuildConfig
from prunert.engines.cache import (
    check_engine_compatible,
    engine_cache_key,
    find_engine,
    graph_digest,
    graph_sha256s,
    machine_engine_path,
    select_engine,
    timing_cache_path,
)
from prunert.engines.profiles import derive_profiles
from prunert.errors import ArtifactError
from prunert.manifest import EngineSpec, Manifest, load_manifest

SHA_A, SHA_B = "a" * 64, "b" * 64
SETTINGS = {"precision": "fp32", "strongly_typed": True, "workspace_bytes": 1 << 30, "optimization_level": 3}


@pytest.fixture(scope="module")
def manifest(tiny_artifact: Path) -> Manifest:
    return load_manifest(tiny_artifact)


@pytest.fixture(scope="module")
def parts(manifest: Manifest) -> dict:
    profiles = derive_profiles(manifest, "decoder", EngineBuildConfig())
    return {"onnx_sha256s": [SHA_A], "profiles": profiles, "builder_settings": SETTINGS,
            "tensorrt_version": "10.3.0", "compute_capability": "8.7"}


def test_key_is_stable(parts: dict) -> None:
    key = engine_cache_key(**parts)
    assert len(key) == 64 and int(key, 16) >= 0
    assert engine_cache_key(**copy.deepcopy(parts)) == key
    as_dicts = {**parts, "profiles": [p.to_dict() for p in parts["profiles"]]}
    assert engine_cache_key(**as_dicts) == key  # Profile objects or their manifest dicts
    reordered = {**parts, "builder_settings": dict(reversed(list(SETTINGS.items())))}
    assert engine_cache_key(**reordered) == key  # dict order is irrelevant
    shapes = parts["profiles"][0].shapes
    flipped = [replace(parts["profiles"][0], shapes=dict(reversed(list(shapes.items())))), parts["profiles"][1]]
    assert engine_cache_key(**{**parts, "profiles": flipped}) == key


def test_key_changes_with_every_component(parts: dict) -> None:
    key = engine_cache_key(**parts)
    first = parts["profiles"][0]
    wider = dict(first.shapes)
    low, opt, high = wider["inputs_embeds"]
    wider["inputs_embeds"] = (low, opt, (high[0], high[1] - 1, high[2]))
    changes = {
        "onnx": {"onnx_sha256s": [SHA_B]},
        "external data": {"onnx_sha256s": [SHA_A, SHA_B]},
        "profile shape": {"profiles": [replace(first, shapes=wider), parts["profiles"][1]]},
        "profile order": {"profiles": list(reversed(parts["profiles"]))},
        "profile count": {"profiles": parts["profiles"][:1]},
        "workspace": {"builder_settings": {**SETTINGS, "workspace_bytes": 2 << 30}},
        "level": {"builder_settings": {**SETTINGS, "optimization_level": 4}},
        "new setting": {"builder_settings": {**SETTINGS, "max_batch": 4}},
        "tensorrt": {"tensorrt_version": "10.3.1"},
        "tensorrt major": {"tensorrt_version": "11.4.1"},
        "compute capability": {"compute_capability": "9.0"},
    }
    keys = {name: engine_cache_key(**{**parts, **change}) for name, change in changes.items()}
    for name, other in keys.items():
        assert other != key, name
    assert len(set(keys.values())) == len(keys)


def test_cache_locations(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNERT_CACHE", str(tmp_path / "cache"))
    assert timing_cache_path("10.3.0", "8.7") == tmp_path / "cache" / "tensorrt" / "timing-trt10.3.0-sm87.cache"
    assert timing_cache_path("10.3.0", "8.7") != timing_cache_path("10.3.0", "9.0")
    assert timing_cache_path("10.3.0", "8.7") != timing_cache_path("11.4.1", "8.7")
    assert machine_engine_path("ab" * 32) == tmp_path / "cache" / "engines" / f"{'ab' * 32}.plan"
    monkeypatch.delenv("PRUNERT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert timing_cache_path("10.3.0", "8.7") == tmp_path / "home" / ".cache" / "prunert" / "tensorrt" / "timing-trt10.3.0-sm87.cache"


def test_graph_digests(manifest: Manifest) -> None:
    spec = manifest.graphs["decoder"]
    assert graph_sha256s(manifest, spec) == [manifest.files[spec.file]]
    assert graph_digest(manifest, spec) == manifest.files[spec.file]
    with_data = replace(spec, external_data="decoder.onnx.data")
    listed = replace(manifest, files={**manifest.files, "decoder.onnx.data": SHA_B})
    assert graph_sha256s(listed, with_data) == [manifest.files[spec.file], SHA_B]
    assert graph_digest(listed, with_data) not in (SHA_B, manifest.files[spec.file])
    with pytest.raises(ArtifactError, match="decoder.onnx.data"):
        graph_sha256s(manifest, with_data)


def engine(manifest: Manifest, graph: str, trt: str = "10.3.0", cc: str = "8.7", precision: str = "fp32", **kw) -> EngineSpec:
    fields = dict(
        graph=graph, precision=precision, file=f"{graph}-{precision}-{trt}-{cc}.plan", cache_key=f"{graph}{trt}{cc}".ljust(64, "0"),
        onnx_sha256=graph_digest(manifest, manifest.graphs[graph]), tensorrt_version=trt, compute_capability=cc,
        device_name="Orin" if cc == "8.7" else "H100", profiles=({"name": "p", "shapes": {}},), builder=dict(SETTINGS),
        build_seconds=1.5,
    )
    return EngineSpec(**{**fields, **kw})


def commit(directory: Path, engines: list[EngineSpec]) -> Manifest:
    """Engines with dummy .plan files, committed the way the builder does."""
    with ArtifactUpdate(directory, "engines") as update:
        listed = []
        for spec in engines:
            (update.staging / spec.file).write_bytes(b"plan " + spec.file.encode())
            listed.append(replace(spec, file=update.file(spec.file)))
        return update.commit(lambda m: replace(m, engines=m.engines + tuple(listed)))


def test_find_engine(artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    orin, orin_new, h100 = engine(manifest, "decoder"), engine(manifest, "decoder", file="newer.plan"), engine(manifest, "decoder", cc="9.0")
    updated = commit(artifact_copy, [orin, h100, engine(manifest, "vision"), orin_new])
    assert load_manifest(artifact_copy) == updated  # listed files verify
    found = find_engine(updated, "decoder", "fp32", "10.3.0", "8.7")
    assert found is not None and found.file.endswith("/newer.plan")  # the newest wins
    assert find_engine(updated, "decoder", "fp32", "10.3.0", "9.0").device_name == "H100"
    assert find_engine(updated, "vision", "fp32", "10.3.0", "8.7").graph == "vision"
    assert find_engine(updated, "decoder", "fp32", "10.4.0", "8.7") is None
    assert find_engine(updated, "decoder", "fp32", "10.3.0", "8.9") is None
    assert find_engine(updated, "decoder", "fp16", "10.3.0", "8.7") is None  # no fp16 variant at all
    stale = replace(updated, files={**updated.files, manifest.graphs["decoder"].file: SHA_B})
    assert find_engine(stale, "decoder", "fp32", "10.3.0", "8.7") is None  # built from another graph


def test_compatibility_message(manifest: Manifest) -> None:
    spec = engine(manifest, "decoder", precision="fp32")
    check_engine_compatible(spec, "10.3.0", "8.7")
    for trt, cc in (("10.4.0", "8.7"), ("10.3.0", "9.0")):
        with pytest.raises(ArtifactError) as info:
            check_engine_compatible(spec, trt, cc)
        message = str(info.value)
        assert "built with TensorRT 10.3.0 for compute capability 8.7 (device Orin)" in message
        assert f"this machine has TensorRT {trt}, compute capability {cc}" in message
        assert message.endswith("rebuild with `prunert build ARTIFACT --precision fp32`")


def test_select_engine_explains(artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    with pytest.raises(ArtifactError, match=r"no fp32 TensorRT engine for graph 'vision'.*`prunert build ARTIFACT --precision fp32`"):
        select_engine(manifest, "vision", "fp32", "10.3.0", "8.7")
    with pytest.raises(ArtifactError, match="prunert convert ARTIFACT --precision fp16"):
        select_engine(manifest, "vision", "fp16", "10.3.0", "8.7")
    updated = commit(artifact_copy, [engine(manifest, "vision", trt="10.3.0", cc="9.0")])
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10.3.0 for compute capability 9.0 \(device H100\); this machine has TensorRT 10.3.0, compute capability 8.7"):
        select_engine(updated, "vision", "fp32", "10.3.0", "8.7")
    assert select_engine(updated, "vision", "fp32", "10.3.0", "9.0").device_name == "H100"
    stale = replace(updated, files={**updated.files, manifest.graphs["vision"].file: SHA_B})
    with pytest.raises(ArtifactError, match="older fp32 vision graph"):
        select_engine(stale, "vision", "fp32", "10.3.0", "9.0")
