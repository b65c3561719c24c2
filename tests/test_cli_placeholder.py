"""The CLI reads the image placeholder from the manifest (`run --prompt`, `calibrate --prompts`), and
`run`'s summary line says "up to N" where N varies per image (family_config max_visual_tokens).

The tiny LLaVA artifact is reshaped through its manifest (a placeholder around the image token, a
per-image N range) so no other family is exported here; tests/parity runs the real Qwen2.5-VL one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from prunert import cli
from prunert.manifest import MANIFEST_NAME, load_manifest

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
EXAMPLES = REPO / "examples" / "calibration"
WRAPPED = "[IMG]<image>[/IMG]"  # a placeholder that is more than the image token, as Qwen2.5-VL's


def _edit_manifest(artifact: Path, edit) -> None:
    path = artifact / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_kept_summary_fixed_and_varying_n(tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact)
    assert cli._kept_summary(manifest) == "kept 16/100 visual tokens (resprune)"
    varying = replace(manifest, family_config={**manifest.family_config, "min_visual_tokens": 16, "max_visual_tokens": 113})
    assert cli._kept_summary(varying) == "kept 16 of up to 113 visual tokens, N varies per image (resprune)"


def test_run_summary_when_n_varies_per_image(capsys, artifact_copy: Path) -> None:
    _edit_manifest(artifact_copy, lambda data: data["family_config"].update(min_visual_tokens=16, max_visual_tokens=100))
    code, _, err = _main(capsys, "run", artifact_copy, "--image", PHOTO, "--prompt", "<image> What is it?", "--max-new-tokens", "2")
    assert code == 0, err
    assert "kept 16 of up to 100 visual tokens, N varies per image (resprune); onnxruntime fp32" in err
    assert "16/100" not in err


def test_run_prompt_needs_the_manifest_placeholder(error_line, capsys, artifact_copy: Path) -> None:
    _edit_manifest(artifact_copy, lambda data: data["text"].update(image_placeholder=WRAPPED))
    code, out, err = _main(capsys, "run", artifact_copy, "--image", PHOTO, "--prompt", "<image> What is it?")
    assert code == 2 and out == ""
    error_line(err, "prompt '<image> What is it?'", f"image placeholder {WRAPPED!r} 0 times", "expected exactly once")
    code, out, err = _main(capsys, "run", artifact_copy, "--image", PHOTO, "--prompt", f"{WRAPPED} What is it?", "--max-new-tokens", "2")
    assert code == 0, err
    assert "kept 16/100 visual tokens (resprune)" in err


def test_calibrate_prompts_file_needs_the_manifest_placeholder(error_line, capsys, artifact_copy: Path, tmp_path: Path) -> None:
    _edit_manifest(artifact_copy, lambda data: data["text"].update(image_placeholder=WRAPPED))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{WRAPPED} fine\n# comment\n<image> only the token\n")
    before = sorted(p.name for p in artifact_copy.iterdir())
    code, out, err = _main(capsys, "calibrate", artifact_copy, "--images", EXAMPLES, "--prompts", prompts, "--precision", "int8")
    assert code == 2 and out == ""
    error_line(err, f"calibration prompts '{prompts}' line 3", f"image placeholder {WRAPPED!r} 0 times")
    assert sorted(p.name for p in artifact_copy.iterdir()) == before  # nothing written


def test_calibration_builtin_prompts_get_the_manifest_placeholder(artifact_copy: Path) -> None:
    from prunert.calibration.dataset import collect_feeds
    from prunert.runtime import VLMPipeline

    _edit_manifest(artifact_copy, lambda data: data["text"].update(image_placeholder=WRAPPED))
    calibration = cli._sample_set(artifact_copy, None, None, 2)  # the bundled images, built-in prompts
    assert calibration.builtin_prompts
    assert all(p.startswith(WRAPPED) for p in calibration.prompts_for(WRAPPED))
    pipe = VLMPipeline(artifact_copy)
    tokenize = pipe.tokenize
    seen: list[str] = []
    pipe.tokenize = lambda prompts: seen.extend(prompts) or tokenize(prompts)
    feeds = collect_feeds(pipe, calibration, decode_steps=0, decode_samples=0)
    assert len(feeds["vision"]) == 2 and seen and all(p.count(WRAPPED) == 1 for p in seen)
