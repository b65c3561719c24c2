"""The CLI reads the image placeholder from the manifest (`run --prompt`, `calibrate --prompts`), and
`run`'s summary line names each image's own N (k/N per image).

The tiny LLaVA artifact is reshaped through its manifest (a placeholder around the image token) so no
other family is exported here; tests/parity runs the real Qwen2.5-VL and LLaVA-NeXT ones."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

from prunert import cli
from prunert.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
EXAMPLES = REPO / "examples" / "calibration"
WRAPPED = "[IMG]<image>[/IMG]"  # a placeholder that is more than the image token, as Qwen2.5-VL's


def test_kept_summary_names_each_images_own_n(prunert_main, artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    results = [types.SimpleNamespace(kept_per_image=(np.arange(16),), tokens_per_image=(100,)),
               types.SimpleNamespace(kept_per_image=(np.arange(12), np.arange(16)), tokens_per_image=(54, 64))]  # masked slots left out
    assert cli._kept_summary(manifest, results) == "kept 16/100, 12/54, 16/64 visual tokens (resprune)"
    code, _, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", "<image> What is it?", "--max-new-tokens", "2")
    assert code == 0, err
    assert "kept 16/100 visual tokens (resprune); onnxruntime fp32" in err


def test_run_prompt_needs_the_manifest_placeholder(edit_manifest, error_line, prunert_main, artifact_copy: Path) -> None:
    edit_manifest(artifact_copy, lambda data: data["text"].update(image_placeholder=WRAPPED))
    code, out, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", f"{WRAPPED} What is {WRAPPED}?")
    assert code == 2 and out == ""
    error_line(err, f"image placeholder {WRAPPED!r} 2 times", "expected at most once")
    # none: the chat template places the image, and LLaVA's default renders <image>, not this manifest's placeholder
    code, out, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", "<image> What is it?")
    assert code == 2 and out == ""
    error_line(err, "chat template (the llava family's default)", f"0 image placeholders {WRAPPED!r}")
    code, out, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", f"{WRAPPED} What is it?", "--max-new-tokens", "2")
    assert code == 0, err
    assert "kept 16/100 visual tokens (resprune)" in err


def test_calibrate_prompts_file_needs_the_manifest_placeholder(edit_manifest, error_line, prunert_main, artifact_copy: Path, tmp_path: Path) -> None:
    edit_manifest(artifact_copy, lambda data: data["text"].update(image_placeholder=WRAPPED))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{WRAPPED} fine\n# comment\n<image> only the token\n")
    before = sorted(p.name for p in artifact_copy.iterdir())
    code, out, err = prunert_main("calibrate", artifact_copy, "--images", EXAMPLES, "--prompts", prompts, "--precision", "int8")
    assert code == 2 and out == ""
    error_line(err, f"calibration prompts '{prompts}' line 3", f"image placeholder {WRAPPED!r} 0 times")
    assert sorted(p.name for p in artifact_copy.iterdir()) == before  # nothing written


def test_calibration_builtin_prompts_get_the_manifest_placeholder(edit_manifest, artifact_copy: Path) -> None:
    from prunert.calibration.dataset import collect_feeds
    from prunert.runtime import VLMPipeline

    edit_manifest(artifact_copy, lambda data: data["text"].update(image_placeholder=WRAPPED))
    calibration = cli._sample_set(artifact_copy, None, None, 2)  # the bundled images, built-in prompts
    assert calibration.builtin_prompts
    assert all(p.startswith(WRAPPED) for p in calibration.prompts_for(WRAPPED))
    pipe = VLMPipeline(artifact_copy)
    tokenize = pipe.tokenize
    seen: list[str] = []
    pipe.tokenize = lambda prompts: seen.extend(prompts) or tokenize(prompts)
    feeds = collect_feeds(pipe, calibration, decode_steps=0, decode_samples=0)
    assert len(feeds["vision"]) == 2 and seen and all(p.count(WRAPPED) == 1 for p in seen)
