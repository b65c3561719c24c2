"""Schema 3 (variants, engines), reading schema 2, and atomic additions to an artifact."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from prunert.artifact_update import STAGING_DIR, ArtifactUpdate
from prunert.config import SCHEMA_VERSION
from prunert.errors import ArtifactError
from prunert.manifest import MANIFEST_NAME, EngineSpec, VariantSpec, load_manifest


def _variant(update: ArtifactUpdate, manifest, precision: str = "fp16") -> VariantSpec:
    graphs = {name: replace(spec, file=update.file(Path(spec.file).name), external_data=None) for name, spec in manifest.graphs.items()}
    return VariantSpec(precision=precision, graphs=graphs, tool="test", settings={"why": "test"})


def _stage_graphs(update: ArtifactUpdate, directory: Path, manifest) -> None:
    for spec in manifest.graphs.values():
        (update.staging / Path(spec.file).name).write_bytes((directory / spec.file).read_bytes())


def test_variant_commit_is_listed_hashed_and_resolvable(artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    with ArtifactUpdate(artifact_copy, "fp16") as update:
        _stage_graphs(update, artifact_copy, manifest)
        update.commit(lambda m: replace(m, variants={"fp16": _variant(update, m)}))
    reread = load_manifest(artifact_copy)  # verifies every sha256, the new files included
    assert reread.schema_version == SCHEMA_VERSION
    spec = reread.graph_spec("vision", "fp16")
    assert spec.file.startswith("fp16-") and spec.file in reread.files
    assert (artifact_copy / spec.file).is_file()
    assert not (artifact_copy / STAGING_DIR).exists()
    assert reread.graph_spec("vision") == manifest.graphs["vision"]


def test_update_folders_and_manifest_follow_the_umask(artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    previous = os.umask(0o027)
    try:
        with ArtifactUpdate(artifact_copy, "fp16") as update:
            assert stat.S_IMODE(update.staging.stat().st_mode) == 0o750
            _stage_graphs(update, artifact_copy, manifest)
            update.commit(lambda m: replace(m, variants={"fp16": _variant(update, m)}))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((artifact_copy / update.folder).stat().st_mode) == 0o750
    assert stat.S_IMODE((artifact_copy / MANIFEST_NAME).stat().st_mode) == 0o640  # was a fixed 0o644


def test_missing_variant_names_the_command_that_makes_it(tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    with pytest.raises(ArtifactError, match="prunert calibrate ARTIFACT --images DIR --precision int8"):
        manifest.graph_spec("vision", "int8")
    with pytest.raises(ArtifactError, match="prunert convert ARTIFACT --precision fp16"):
        manifest.graph_spec("decoder", "fp16")


def test_replacing_a_variant_drops_the_old_folder(artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    folders = []
    for _ in range(2):
        current = load_manifest(artifact_copy)
        old = [Path(s.file).parent.as_posix() for v in current.variants.values() for s in v.graphs.values()]
        with ArtifactUpdate(artifact_copy, "fp16") as update:
            _stage_graphs(update, artifact_copy, manifest)
            update.commit(lambda m: replace(m, variants={"fp16": _variant(update, m)}), drop=old)
            folders.append(update.folder)
    assert not (artifact_copy / folders[0]).exists() and (artifact_copy / folders[1]).is_dir()
    reread = load_manifest(artifact_copy)
    assert not any(name.startswith(folders[0]) for name in reread.files)


def test_failure_before_commit_leaves_nothing(artifact_copy: Path) -> None:
    before = (artifact_copy / MANIFEST_NAME).read_text()
    with pytest.raises(RuntimeError):
        with ArtifactUpdate(artifact_copy, "int8") as update:
            (update.staging / "vision.onnx").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert (artifact_copy / MANIFEST_NAME).read_text() == before
    assert not (artifact_copy / STAGING_DIR).exists()
    assert not list(artifact_copy.glob("int8-*"))


def test_commit_that_names_unstaged_files_is_refused(artifact_copy: Path) -> None:
    before = (artifact_copy / MANIFEST_NAME).read_text()
    with pytest.raises(ArtifactError, match="which .files. does not list with a sha256"):
        with ArtifactUpdate(artifact_copy, "fp16") as update:
            update.commit(lambda m: replace(m, variants={"fp16": _variant(update, m)}))  # nothing staged
    assert (artifact_copy / MANIFEST_NAME).read_text() == before
    assert not list(artifact_copy.glob("fp16-*"))


def test_engine_records_round_trip(artifact_copy: Path) -> None:
    with ArtifactUpdate(artifact_copy, "engines") as update:
        (update.staging / "vision.plan").write_bytes(b"engine bytes")
        engine = EngineSpec(graph="vision", precision="fp32", file=update.file("vision.plan"), cache_key="ab" * 32,
                            onnx_sha256="cd" * 32, tensorrt_version="10.3.0", compute_capability="8.7", device_name="Orin",
                            profiles=({"name": "default", "shapes": {"pixel_values": [[1, 3, 8, 8]] * 3}},),
                            builder={"precision": "fp32"}, build_seconds=1.5)
        update.commit(lambda m: replace(m, engines=(engine,)))
    assert load_manifest(artifact_copy).engines == (engine,)


def test_schema_2_manifest_reads_without_variants(artifact_copy: Path) -> None:
    path = artifact_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.pop("variants"), data.pop("engines")
    data["schema_version"] = 2
    path.write_text(json.dumps(data))
    manifest = load_manifest(artifact_copy)
    assert manifest.variants == {} and manifest.engines == ()
    data["variants"] = {}
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema_version 2 has no"):
        load_manifest(artifact_copy)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("variants", {"fp16": {"precision": "fp16", "graphs": {}, "tool": "t"}}, "missing key 'settings'"),
        ("variants", {"fp16": {"precision": "fp16", "graphs": {}, "tool": "t", "settings": {}, "extra": 1}}, "unknown key"),
        ("engines", [{"graph": "vision"}], "missing key"),
        ("engines", {"graph": "vision"}, "expected tuple"),
    ],
)
def test_bad_variant_or_engine_records_are_rejected(artifact_copy: Path, field: str, value, needle: str) -> None:
    path = artifact_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=needle):
        load_manifest(artifact_copy, verify_hashes=False)
