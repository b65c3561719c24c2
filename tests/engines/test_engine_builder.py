"""build_engines on CPU: without tensorrt / cuda-python it names the missing package; with the fake
backend (test_engine_fake_backend.py) it writes engines into the artifact atomically, records them,
reuses them (manifest and machine caches), replaces superseded ones and reports build failures."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from prunert.config import EngineBuildConfig
from prunert.engines.builder import build_engines
from prunert.engines.cache import machine_engine_path, timing_cache_path
from prunert.engines.profiles import derive_profiles
from prunert.errors import BackendUnavailableError, ConfigError, ExportError
from prunert.manifest import load_manifest, sha256_file

@pytest.fixture
def fake(fake_trt):
    return fake_trt


def quiet(message: str) -> None:
    pass


def test_missing_tensorrt_is_named(monkeypatch, artifact_copy: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # unimportable even where it is installed
    with pytest.raises(BackendUnavailableError) as info:
        build_engines(artifact_copy, EngineBuildConfig(), log=quiet)
    message = str(info.value)
    assert "package tensorrt is not installed" in message
    assert "comes with JetPack" in message and "pypi.nvidia.com" in message and "NGC" in message


def test_missing_cuda_python_is_named(monkeypatch, fake, artifact_copy: Path) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match=r"cuda-python is not installed \(pip install cuda-python"):
        build_engines(artifact_copy, EngineBuildConfig(), log=quiet)


def test_build_records_engines(fake, artifact_copy: Path) -> None:
    trt, _ = fake
    before = load_manifest(artifact_copy)
    messages: list[str] = []
    manifest = build_engines(artifact_copy, EngineBuildConfig(optimization_level=2, workspace_bytes=1 << 28), log=messages.append)
    assert load_manifest(artifact_copy) == manifest  # hashes of the new files verify
    assert [e.graph for e in manifest.engines] == ["vision", "decoder"]
    assert not list(artifact_copy.glob(".staging*")) and not list(artifact_copy.glob(".engine-*"))
    for spec in manifest.engines:
        assert spec.precision == "fp32" and spec.tensorrt_version == "10.3.0"
        assert spec.compute_capability == "8.7" and spec.device_name == "Fake Orin"
        assert spec.file.split("/")[1] == f"{spec.graph}-fp32-{spec.cache_key[:12]}.plan"
        assert spec.onnx_sha256 == before.files[before.graphs[spec.graph].file]
        profiles = derive_profiles(before, spec.graph, EngineBuildConfig())
        assert list(spec.profiles) == [p.to_dict() for p in profiles]
        assert spec.builder["strongly_typed"] is True and spec.builder["optimization_level"] == 2
        assert spec.builder["max_batch"] == 8 and spec.builder["max_seq"] == before.text.max_sequence
        plan = json.loads((artifact_copy / spec.file).read_bytes())
        assert plan["onnx"] == str(artifact_copy / before.graphs[spec.graph].file)  # parsed by path
        assert plan["strongly_typed"] and plan["level"] == 2 and plan["workspace"] == [1 << 28]
        assert plan["cleared"] == ["TF32"] and spec.builder["tf32"] is False
        assert plan["profiles"] == [p["shapes"] for p in spec.profiles]
        assert machine_engine_path(spec.cache_key).read_bytes() == (artifact_copy / spec.file).read_bytes()
    assert len(trt.builds) == 2
    assert any("3-4x" in m for m in messages)
    assert timing_cache_path("10.3.0", "8.7").read_bytes() == b"tt"  # loaded and saved around each build


def test_second_build_is_a_cache_hit(fake, artifact_copy: Path) -> None:
    trt, _ = fake
    first = build_engines(artifact_copy, EngineBuildConfig(), log=quiet)
    messages: list[str] = []
    second = build_engines(artifact_copy, EngineBuildConfig(), log=messages.append)
    assert second == first and len(trt.builds) == 2
    assert sum("up to date" in m for m in messages) == 2


def test_identical_artifact_elsewhere_uses_the_machine_cache(fake, tiny_artifact: Path, tmp_path: Path) -> None:
    trt, _ = fake
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(tiny_artifact, one)
    shutil.copytree(tiny_artifact, two)
    built = build_engines(one, EngineBuildConfig(graphs=("vision",)), log=quiet)
    messages: list[str] = []
    reused = build_engines(two, EngineBuildConfig(graphs=("vision",)), log=messages.append)
    assert len(trt.builds) == 1 and any("reusing this machine's engine" in m for m in messages)
    assert reused.engines[0].cache_key == built.engines[0].cache_key
    assert (two / reused.engines[0].file).read_bytes() == (one / built.engines[0].file).read_bytes()
    machine_copy = machine_engine_path(built.engines[0].cache_key)
    machine_copy.write_bytes(b"torn")  # a damaged machine copy is rebuilt, never installed
    three = tmp_path / "three"
    shutil.copytree(tiny_artifact, three)
    again = build_engines(three, EngineBuildConfig(graphs=("vision",)), log=quiet)
    assert len(trt.builds) == 2 and (three / again.engines[0].file).read_bytes() != b"torn"


def test_rebuild_replaces_superseded_engines(fake, artifact_copy: Path) -> None:
    first = build_engines(artifact_copy, EngineBuildConfig(), log=quiet)
    old_folder = first.engines[0].file.split("/")[0]
    second = build_engines(artifact_copy, EngineBuildConfig(optimization_level=5), log=quiet)
    assert [e.graph for e in second.engines] == ["vision", "decoder"]
    assert all(e.builder["optimization_level"] == 5 for e in second.engines)
    assert not (artifact_copy / old_folder).exists()
    assert not any(name.startswith(old_folder + "/") for name in second.files)
    assert load_manifest(artifact_copy) == second
    # only the decoder changes: the vision engine keeps its folder, the old decoder leaves the manifest
    third = build_engines(artifact_copy, EngineBuildConfig(optimization_level=5, max_seq=40, graphs=("decoder",)), log=quiet)
    assert sorted(e.graph for e in third.engines) == ["decoder", "vision"]
    vision = next(e for e in third.engines if e.graph == "vision")
    assert vision == second.engines[0] and (artifact_copy / vision.file).is_file()
    assert next(e for e in third.engines if e.graph == "decoder").builder["max_seq"] == 40
    assert load_manifest(artifact_copy) == third


def test_engines_for_another_trt_version_stay(monkeypatch, fake, artifact_copy: Path) -> None:
    trt, _ = fake
    build_engines(artifact_copy, EngineBuildConfig(graphs=("vision",)), log=quiet)
    monkeypatch.setattr(trt, "__version__", "10.4.0")
    manifest = build_engines(artifact_copy, EngineBuildConfig(graphs=("vision",)), log=quiet)
    assert sorted(e.tensorrt_version for e in manifest.engines) == ["10.3.0", "10.4.0"]


def test_build_failures_list_tensorrt_errors(fake, artifact_copy: Path) -> None:
    trt, _ = fake
    trt.fail_build = True
    with pytest.raises(ExportError, match=r"could not build an engine from vision.onnx: Error Code 4: Internal Error \(out of memory\)"):
        build_engines(artifact_copy, EngineBuildConfig(graphs=("vision",)), log=quiet)
    assert load_manifest(artifact_copy).engines == ()
    trt.fail_build = False
    import onnx

    path = artifact_copy / "vision.onnx"
    model = onnx.load(path)
    model.graph.node[0].op_type = "PrunertUnsupported"  # the fake parser rejects this op
    onnx.save(model, path)
    data = json.loads((artifact_copy / "manifest.json").read_text())
    data["files"]["vision.onnx"] = sha256_file(path)
    (artifact_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=r"could not parse vision.onnx: In node 0 \(PrunertUnsupported\): UNSUPPORTED_NODE"):
        build_engines(artifact_copy, EngineBuildConfig(graphs=("vision",)), log=quiet)


def test_flags_are_checked_before_building(fake, artifact_copy: Path) -> None:
    trt, _ = fake
    with pytest.raises(ConfigError, match="--max-batch: got 99, expected at most 8"):
        build_engines(artifact_copy, EngineBuildConfig(max_batch=99), log=quiet)
    assert trt.builds == []
