"""`prunert run` / `prunert inspect`: success output, and every bad input (image, prompt, artifact,
flags) -> exactly one `prunert: error: ...` line naming the input, exit 2, no traceback, nothing written.

Export-side bad input is in tests/export/test_export.py, parity exit codes in tests/parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from prunert import cli
from prunert.manifest import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PHOTO_2 = REPO / "examples" / "images" / "coffee.jpg"
PROMPT = "<image>\nWhat is in the picture?"


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- success


def test_run_subprocess_prints_answer_and_summary(cli_subprocess, tiny_artifact: Path) -> None:
    result = cli_subprocess("run", tiny_artifact, "--image", PHOTO, "--prompt", PROMPT, "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "kept 16/100 visual tokens (resprune)" in result.stderr
    assert "synthetic checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_batch_prints_one_line_per_image(prunert_main, tiny_artifact: Path) -> None:
    """A batch is one --prompt per --image (one --prompt with several --image is one prompt about all of them)."""
    code, out, err = prunert_main("run", tiny_artifact, "--image", PHOTO, "--image", PHOTO_2, "--prompt", PROMPT, "--prompt", PROMPT,
                                  "--max-new-tokens", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"[{PHOTO}] ") and lines[1].startswith(f"[{PHOTO_2}] ")


def test_run_streaming_matches_no_stream(prunert_main, tiny_artifact: Path) -> None:
    args = ["run", tiny_artifact, "--image", PHOTO, "--prompt", PROMPT, "--max-new-tokens", "8"]
    code, streamed, _ = prunert_main(*args)
    assert code == 0
    code, plain, _ = prunert_main(*args, "--no-stream")
    assert code == 0
    assert streamed == plain


def test_inspect_table_and_json(prunert_main, tiny_artifact: Path) -> None:
    code, out, _ = prunert_main("inspect", tiny_artifact)
    assert code == 0
    assert "K=16 of N=100" in out and "SYNTHETIC" in out and "past_key_values.1.value" in out
    code, out, _ = prunert_main("inspect", tiny_artifact, "--json")
    assert code == 0
    assert json.loads(out) == json.loads((tiny_artifact / MANIFEST_NAME).read_text())


# ---------------------------------------------------------------------------------------- images


def _bad_image(kind: str, root: Path) -> Path:
    path = root / {"missing": "missing.jpg", "not-image": "notes.jpg", "directory": "folder.png"}.get(kind, f"{kind}.png")
    if kind == "not-image":
        path.write_text("this is not a JPEG")
    elif kind == "truncated":
        path.write_bytes(PHOTO.read_bytes()[:2000])
    elif kind == "directory":
        path.mkdir()
    elif kind == "grayscale":
        Image.new("L", (64, 64), 128).save(path)
    elif kind == "rgba":
        Image.new("RGBA", (64, 64), (1, 2, 3, 128)).save(path)
    elif kind == "tiny":
        Image.new("RGB", (8, 8)).save(path)
    elif kind == "sliver":
        Image.new("RGB", (500, 4)).save(path)
    return path


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("missing", "not found"),
        ("not-image", "not a recognised image"),
        ("truncated", "could not be read"),
        ("directory", "not a regular file"),
        ("tiny", "too small"),
        ("sliver", "too small"),
    ],
)
def test_run_rejects_bad_image(error_line, prunert_main, tmp_path: Path, tiny_artifact: Path, kind: str, needle: str) -> None:
    image = _bad_image(kind, tmp_path)
    before = _snapshot(tiny_artifact)
    code, out, err = prunert_main("run", tiny_artifact, "--image", image, "--prompt", PROMPT)
    assert code == 2
    error_line(err, f"image '{image}'", needle)
    assert out == ""
    assert _snapshot(tiny_artifact) == before


def test_run_rejects_bad_image_in_a_batch(error_line, prunert_main, tmp_path: Path, tiny_artifact: Path) -> None:
    image = _bad_image("tiny", tmp_path)
    code, _, err = prunert_main("run", tiny_artifact, "--image", PHOTO, "--image", image, "--prompt", PROMPT, "--prompt", PROMPT)
    assert code == 2
    error_line(err, str(image), "too small")


def test_run_missing_image_subprocess(error_line, cli_subprocess, tiny_artifact: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    result = cli_subprocess("run", tiny_artifact, "--image", missing, "--prompt", PROMPT)
    assert result.returncode == 2
    error_line(result.stderr, str(missing), "not found")
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompt, needle",
    [
        ("<image> <image> what is it?", "2 times"),
        ("river " * 60, "expected at most 48"),  # no placeholder: the chat template's prompt, still bounded
        ("<image>\n" + "river " * 60, "expected at most 48"),
    ],
)
def test_run_rejects_bad_prompt(error_line, prunert_main, tiny_artifact: Path, prompt: str, needle: str) -> None:
    code, out, err = prunert_main("run", tiny_artifact, "--image", PHOTO, "--prompt", prompt)
    assert code == 2
    line = error_line(err, "prompt ", needle)
    assert repr(prompt[:20])[:-1] in line  # names the prompt
    assert out == ""


def test_run_prompt_error_subprocess(error_line, cli_subprocess, tiny_artifact: Path) -> None:
    result = cli_subprocess("run", tiny_artifact, "--image", PHOTO, "--prompt", "<image><image>")
    assert result.returncode == 2
    error_line(result.stderr, "'<image><image>'", "2 times", "expected at most once")


# ---------------------------------------------------------------------------------------- artifacts


def _tamper(kind: str, artifact: Path) -> str:
    """Damage the artifact copy; returns a string the error message must contain."""
    manifest_path = artifact / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    if kind == "missing-file":
        (artifact / "decoder.onnx").unlink()
        return "'decoder.onnx' listed in manifest.json is missing"
    if kind == "changed-byte":
        path = artifact / "embed_tokens.npy"
        blob = bytearray(path.read_bytes())
        blob[-5] ^= 0x01
        path.write_bytes(bytes(blob))
        return "'embed_tokens.npy' sha256"
    if kind == "changed-tokenizer":
        path = artifact / "tokenizer.json"
        path.write_text(path.read_text().replace('"<image>"', '"<imagf>"', 1))
        return "'tokenizer.json' sha256"
    if kind == "unknown-key":
        data["calibration"] = {"foo": 1}
    elif kind == "unknown-nested-key":
        data["budget"]["ratio"] = 0.5
    elif kind == "missing-key":
        del data["text"]["eos_token_ids"]
    elif kind == "newer-schema":
        data["schema_version"] = 99
    elif kind == "older-schema":
        data["schema_version"] = 1
    elif kind == "no-manifest":
        manifest_path.unlink()
        return "no manifest.json"
    elif kind == "bad-json":
        manifest_path.write_text("{ truncated")
        return "not valid JSON"
    manifest_path.write_text(json.dumps(data))
    return {
        "unknown-key": "unknown key(s) ['calibration']",
        "unknown-nested-key": "unknown key(s) ['ratio'] in 'manifest.budget'",
        "missing-key": "missing key 'eos_token_ids'",
        "newer-schema": "schema_version 99 is newer",
        "older-schema": "schema_version 1 is older",
    }[kind]


ARTIFACT_DAMAGE = [
    "older-schema",
    "missing-file",
    "changed-byte",
    "changed-tokenizer",
    "unknown-key",
    "unknown-nested-key",
    "missing-key",
    "newer-schema",
    "no-manifest",
    "bad-json",
]


@pytest.mark.parametrize("command", ["run", "inspect"])
@pytest.mark.parametrize("kind", ARTIFACT_DAMAGE)
def test_damaged_artifact_is_rejected(error_line, prunert_main, artifact_copy: Path, kind: str, command: str) -> None:
    needle = _tamper(kind, artifact_copy)
    before = _snapshot(artifact_copy)
    extra = ["--image", PHOTO, "--prompt", PROMPT] if command == "run" else []
    code, out, err = prunert_main(command, artifact_copy, *extra)
    assert code == 2
    error_line(err, f"artifact '{artifact_copy}'", needle)
    assert out == ""
    assert _snapshot(artifact_copy) == before


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_damaged_artifact_subprocess(error_line, cli_subprocess, artifact_copy: Path, command: str) -> None:
    needle = _tamper("changed-byte", artifact_copy)
    extra = ["--image", PHOTO, "--prompt", PROMPT] if command == "run" else []
    result = cli_subprocess(command, artifact_copy, *extra)
    assert result.returncode == 2
    error_line(result.stderr, str(artifact_copy), needle, "re-export")
    assert result.stdout == ""


def test_newer_schema_subprocess(error_line, cli_subprocess, artifact_copy: Path) -> None:
    _tamper("newer-schema", artifact_copy)
    result = cli_subprocess("inspect", artifact_copy)
    assert result.returncode == 2
    error_line(result.stderr, "schema_version 99", "upgrade prunert")


def test_not_an_artifact_directory(error_line, prunert_main, tmp_path: Path) -> None:
    code, _, err = prunert_main("inspect", tmp_path / "nowhere")
    assert code == 2
    error_line(err, str(tmp_path / "nowhere"), "not a directory")


def test_inspect_no_verify_skips_hashes(prunert_main, artifact_copy: Path) -> None:
    _tamper("changed-byte", artifact_copy)
    code, out, _ = prunert_main("inspect", artifact_copy, "--no-verify")
    assert code == 0 and "K=16" in out


# ---------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--backend", "tensorrt"], "--backend 'tensorrt'"),
    ],
)
def test_run_rejects_bad_flags(error_line, prunert_main, tiny_artifact: Path, flags: list[str], needle: str) -> None:
    code, _, err = prunert_main("run", tiny_artifact, "--image", PHOTO, "--prompt", PROMPT, *flags)
    assert code == 2
    error_line(err, needle)


def test_run_rejects_image_prompt_count_mismatch(error_line, prunert_main, tiny_artifact: Path) -> None:
    images = ["--image", PHOTO, "--image", PHOTO_2, "--image", PHOTO]
    code, _, err = prunert_main("run", tiny_artifact, *images, "--prompt", PROMPT, "--prompt", PROMPT)
    assert code == 2
    error_line(err, "--image/--prompt", "3 images and 2 prompts")


def test_run_no_verify_skips_the_hash_check(capsys, artifact_copy: Path) -> None:
    path = artifact_copy / "preprocessor_config.json"
    path.write_text(path.read_text() + "\n")  # same content for the runtime, different sha256
    args = ["run", str(artifact_copy), "--image", str(PHOTO), "--prompt", "<image> What is it?", "--max-new-tokens", "2"]
    assert cli.main(args) == 2
    assert "sha256" in capsys.readouterr().err
    assert cli.main([*args, "--no-verify"]) == 0
