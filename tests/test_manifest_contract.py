"""manifest.json is the whole, contained contract (issue 10, section 2): every path it names resolves inside the
artifact directory and is listed in `files` with a sha256, every listed file is present, and a manifest nested
100k deep is one error line. Checked with and without --no-verify (which skips only the hashing), through
`prunert inspect` and `prunert run` in-process; nothing outside the directory is read, nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from prunert import cli
from prunert.errors import ArtifactError
from prunert.manifest import MANIFEST_NAME, load_manifest, referenced_files, sha256_file

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"
COMMANDS = {"inspect": [], "run": ["--image", str(PHOTO), "--prompt", PROMPT, "--max-new-tokens", "2"]}


def _cli(main, command: str, artifact: Path, *extra: str) -> tuple[int, str, str]:
    return main(command, artifact, *COMMANDS[command], *extra)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _outside_copy(artifact: Path, name: str) -> Path:
    """A copy of one of the artifact's files next to (outside) the artifact directory."""
    target = artifact.parent / f"outside-{name}"
    target.write_bytes((artifact / name).read_bytes())
    return target


def _point(data: dict[str, Any], key: str, name: str, listed_as: Path | None = None) -> None:
    """Set the manifest key (dotted; "files" adds a files entry) to name; list name in files with listed_as's sha256."""
    if key != "files":
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = name
    if listed_as is not None:
        data["files"][name] = sha256_file(listed_as)


def _variant(data: dict[str, Any]) -> dict[str, Any]:
    """An fp16 variant entry whose graphs are the fp32 ones (a variant may point at top-level fp32 files)."""
    return {"precision": "fp16", "graphs": json.loads(json.dumps(data["graphs"])), "tool": "test", "settings": {}}


def _engine(file: str) -> dict[str, Any]:
    return {"graph": "vision", "precision": "fp32", "file": file, "cache_key": "0" * 64, "onnx_sha256": "0" * 64,
            "tensorrt_version": "10.3", "compute_capability": "8.7", "device_name": "test", "profiles": [], "builder": {},
            "build_seconds": 1.0}


# ------------------------------------------------------------------------------------ containment


def _escape(kind: str, artifact: Path, edit) -> tuple[str, str]:
    """Point one manifest path out of the directory (the target exists and is hashed correctly); -> (key, path)."""
    tokenizer_outside = _outside_copy(artifact, "tokenizer.json")
    if kind == "tokenizer-dotdot":
        name, key, listed = f"../{tokenizer_outside.name}", "text.tokenizer", tokenizer_outside
    elif kind == "tokenizer-etc":
        name, key, listed = "../../../../../../../../etc/hostname", "text.tokenizer", None
    elif kind == "tokenizer-absolute":
        name, key, listed = str(tokenizer_outside), "text.tokenizer", tokenizer_outside
    elif kind == "tokenizer-is-the-manifest":
        name, key, listed = f"./{MANIFEST_NAME}", "text.tokenizer", None
    elif kind == "preprocessor-symlink":
        outside = _outside_copy(artifact, "preprocessor_config.json")
        os.symlink(outside, artifact / "linked.json")
        name, key, listed = "linked.json", "image_preprocessor", outside
    elif kind == "embeddings-symlinked-folder":
        outside = _outside_copy(artifact, "embed_tokens.npy")
        os.symlink(outside.parent, artifact / "shared")
        name, key, listed = f"shared/{outside.name}", "text.embeddings", outside
    elif kind == "vision-graph-dotdot":
        outside = _outside_copy(artifact, "vision.onnx")
        name, key, listed = f"../{outside.name}", "graphs.vision.file", outside
    elif kind == "external-data-dotdot":
        name, key, listed = f"../{tokenizer_outside.name}", "graphs.decoder.external_data", tokenizer_outside
    elif kind == "files-key-absolute":
        name, key, listed = str(tokenizer_outside), "files", tokenizer_outside
    elif kind == "variant-graph-absolute":
        outside = _outside_copy(artifact, "vision.onnx")
        edit(artifact, lambda data: data["variants"].update(fp16=_variant(data)))
        name, key, listed = str(outside), "variants.fp16.graphs.vision.file", outside
    elif kind == "engine-dotdot":
        edit(artifact, lambda data: data.update(engines=[_engine("engines/x.plan")]))
        name, key, listed = f"../{tokenizer_outside.name}", "engines", tokenizer_outside
    else:
        raise AssertionError(kind)
    if key == "engines":
        edit(artifact, lambda data: (data["engines"][0].update(file=name), _point(data, "files", name, listed)))
        return "engines[0].file", name
    edit(artifact, lambda data: _point(data, key, name, listed))
    return (f"files[{name!r}]" if key == "files" else key), name


ESCAPES = ["tokenizer-dotdot", "tokenizer-etc", "tokenizer-absolute", "tokenizer-is-the-manifest", "preprocessor-symlink", "embeddings-symlinked-folder",
           "vision-graph-dotdot", "external-data-dotdot", "files-key-absolute", "variant-graph-absolute", "engine-dotdot"]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ESCAPES)
def test_a_path_out_of_the_artifact_is_refused(edit_manifest, error_line, prunert_main, artifact_copy: Path, kind: str, command: str, verify: bool) -> None:
    key, name = _escape(kind, artifact_copy, edit_manifest)
    before = _snapshot(artifact_copy)
    code, out, err = _cli(prunert_main, command, artifact_copy, *([] if verify else ["--no-verify"]))
    assert code == 2 and out == ""
    error_line(err, f"artifact '{artifact_copy}'", f"'{key}'", json.dumps(name), "expected a file inside the artifact directory")
    assert _snapshot(artifact_copy) == before


def test_parity_refuses_a_path_out_of_the_artifact(edit_manifest, error_line, capsys, artifact_copy: Path) -> None:
    key, name = _escape("vision-graph-dotdot", artifact_copy, edit_manifest)
    code = cli.main(["parity", str(artifact_copy), "--image", str(PHOTO), "--prompt", PROMPT])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    error_line(captured.err, f"'{key}'", json.dumps(name), "expected a file inside the artifact directory")
    assert not (artifact_copy / "parity.json").exists()


def test_a_symlink_loop_is_refused(edit_manifest, error_line, prunert_main, artifact_copy: Path) -> None:
    os.symlink("loop-b", artifact_copy / "loop-a")
    os.symlink("loop-a", artifact_copy / "loop-b")
    edit_manifest(artifact_copy, lambda data: _point(data, "text.tokenizer", "loop-a", artifact_copy / "tokenizer.json"))
    code, _, err = _cli(prunert_main, "inspect", artifact_copy, "--no-verify")
    assert code == 2
    error_line(err, "'text.tokenizer' is \"loop-a\"", "never resolves")


def test_a_symlink_inside_the_directory_is_fine(edit_manifest, artifact_copy: Path) -> None:
    os.symlink("tokenizer.json", artifact_copy / "tokenizer-link.json")
    edit_manifest(artifact_copy, lambda data: _point(data, "text.tokenizer", "tokenizer-link.json", artifact_copy / "tokenizer.json"))
    assert load_manifest(artifact_copy).text.tokenizer == "tokenizer-link.json"


# ------------------------------------------------------------------------------ listed in `files`


@pytest.mark.parametrize("key", ["graphs.vision.file", "graphs.decoder.external_data", "text.tokenizer", "text.embeddings",
                                 "image_preprocessor", "variants.fp16.graphs.vision.file", "engines[0].file"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_file_not_listed_in_files_is_never_loaded(edit_manifest, error_line, prunert_main, artifact_copy: Path, key: str, command: str) -> None:
    """The file is present and intact but unlisted (no sha256): refused even with --no-verify."""
    source = {"graphs.vision.file": "vision.onnx", "text.tokenizer": "tokenizer.json", "text.embeddings": "embed_tokens.npy",
              "image_preprocessor": "preprocessor_config.json"}.get(key, "vision.onnx")
    name = f"unlisted-{source}"
    (artifact_copy / name).write_bytes((artifact_copy / source).read_bytes())

    def change(data: dict[str, Any]) -> None:
        if key.startswith("variants"):
            data["variants"]["fp16"] = _variant(data)
        if key.startswith("engines"):
            data["engines"] = [_engine(name)]
            return
        _point(data, key, name)

    edit_manifest(artifact_copy, change)
    for extra in ([], ["--no-verify"]):
        code, out, err = _cli(prunert_main, command, artifact_copy, *extra)
        assert code == 2 and out == ""
        error_line(err, f"'{key}' names '{name}'", "'files' does not list")


def test_every_path_the_runtime_opens_is_referenced(tiny_artifact: Path) -> None:
    """The exported manifest lists every file it points at, and points at every file it lists but none other."""
    manifest = load_manifest(tiny_artifact)
    names = {name for _, name in referenced_files(manifest)}
    assert names == set(manifest.files) == {"vision.onnx", "decoder.onnx", "decoder_fused.onnx", "decoder_fused.onnx.data", "tokenizer.json",
                                            "embed_tokens.npy", "preprocessor_config.json"}


@pytest.mark.parametrize("digest", [5, "abc", "Z" * 64, None])
def test_a_files_entry_that_is_not_a_sha256_is_refused(edit_manifest, error_line, prunert_main, artifact_copy: Path, digest: Any) -> None:
    edit_manifest(artifact_copy, lambda data: data["files"].update({"vision.onnx": digest}))
    code, _, err = _cli(prunert_main, "inspect", artifact_copy)
    assert code == 2
    error_line(err, "'files['vision.onnx']'", "expected a sha256")


@pytest.mark.parametrize("shape", [[1, 16, 1.5], [1, None, 64], [1, -3, 64], [1, "", 64], [1, [16], 64], [True, 16, 64]])
def test_a_tensor_dim_that_is_no_size_is_refused(edit_manifest, error_line, prunert_main, artifact_copy: Path, shape: list[Any]) -> None:
    edit_manifest(artifact_copy, lambda data: data["graphs"]["vision"]["outputs"][0].update(shape=shape))
    code, _, err = _cli(prunert_main, "inspect", artifact_copy)
    assert code == 2
    error_line(err, "'manifest.graphs.vision' tensor 'visual_tokens'", "expected sizes >= 0 or symbolic dim names")


# ------------------------------------------------------------------------------ --no-verify and broken files


@pytest.mark.parametrize("name", ["vision.onnx", "decoder.onnx", "tokenizer.json", "embed_tokens.npy", "preprocessor_config.json"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_verify_still_refuses_a_missing_file(error_line, prunert_main, artifact_copy: Path, name: str, command: str) -> None:
    (artifact_copy / name).unlink()
    code, out, err = _cli(prunert_main, command, artifact_copy, "--no-verify")
    assert code == 2 and out == ""
    error_line(err, f"artifact '{artifact_copy}'", f"file '{name}' listed in manifest.json is missing")


def test_a_listed_directory_is_not_a_file(error_line, prunert_main, artifact_copy: Path) -> None:
    (artifact_copy / "tokenizer.json").unlink()
    (artifact_copy / "tokenizer.json").mkdir()
    code, _, err = _cli(prunert_main, "run", artifact_copy, "--no-verify")
    assert code == 2
    error_line(err, "file 'tokenizer.json' listed in manifest.json is missing")


# ------------------------------------------------------------------------------ JSON nested too deeply


DEEP = 100_000


@pytest.mark.parametrize("where", ["top-level", "family_config"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_manifest_nested_100k_deep_is_one_line(error_line, prunert_main, artifact_copy: Path, where: str, command: str) -> None:
    path = artifact_copy / MANIFEST_NAME
    deep = "[" * DEEP + "]" * DEEP
    text = deep if where == "top-level" else path.read_text().replace('"family_config": {', f'"family_config": {{"deep": {deep}, ', 1)
    assert text != path.read_text()
    path.write_text(text)
    code, _, err = _cli(prunert_main, command, artifact_copy, "--no-verify")
    assert code == 2
    error_line(err, f"artifact '{artifact_copy}'", "manifest.json is nested too deeply")


def test_a_manifest_nested_deeper_than_any_real_one_is_refused(edit_manifest, error_line, artifact_copy: Path) -> None:
    """Deep enough to parse, too deep for anything prunert writes: refused before it reaches recursive code."""
    edit_manifest(artifact_copy, lambda data: data["family_config"].update(deep=json.loads("[" * 500 + "]" * 500)))
    with pytest.raises(ArtifactError, match="nested too deeply"):
        load_manifest(artifact_copy)


def test_a_huge_integer_is_not_a_traceback(error_line, prunert_main, artifact_copy: Path) -> None:
    path = artifact_copy / MANIFEST_NAME
    path.write_text(path.read_text().replace('"opset": 20', '"opset": ' + "9" * 5000, 1))
    code, _, err = _cli(prunert_main, "inspect", artifact_copy)
    assert code == 2
    error_line(err, "manifest.json is not valid JSON")
