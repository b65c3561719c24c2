"""Parity on a prompt of two images (LLaVA-NeXT, Qwen2.5-VL): `prunert parity --image a --image b --prompt ...` PASSes,
each image's stages (pixels, visual tokens before pruning, kept indices and tokens) named "image i: ...", the whole
prompt's token ids, prefill logits and greedy tokens against HF with both images (Qwen2.5-VL: HF's M-RoPE positions
of the two-image prompt). LLaVA-1.5 refuses the second image, and a prompt without placeholders is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from prunert import cli  # noqa: E402
from prunert.parity.report import PASS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PHOTOS = [REPO / "examples" / "images" / f"{name}.jpg" for name in ("chelsea", "astronaut")]
PROMPTS = {"next": "<image>\n<image>\nWhich picture shows the cat?",
           "qwen": "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "Which picture shows the cat?"}
PER_IMAGE = ("visual tokens before pruning", "kept indices", "kept tokens")


@pytest.mark.parametrize("family", sorted(PROMPTS))
def test_two_image_parity_passes(request, capsys, tmp_path: Path, family: str) -> None:
    artifact = request.getfixturevalue(f"{family}_tiny_artifact")
    report = tmp_path / "parity.json"
    code = cli.main(["parity", str(artifact), "--image", str(PHOTOS[0]), "--image", str(PHOTOS[1]), "--prompt", PROMPTS[family],
                     "--out", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == "parity: PASS"
    written = json.loads(report.read_text())
    stages = {check["stage"] for check in written["checks"]}
    assert {f"image {i}: {stage}" for i in (1, 2) for stage in PER_IMAGE} <= stages
    assert {"token ids", "prefill logits", "greedy tokens"} <= stages and not stages & set(PER_IMAGE)
    assert any(stage.startswith("image 2: pixels:") for stage in stages)
    assert all(check["status"] == PASS for check in written["checks"]), out
    assert written["image"] == f"{PHOTOS[0]}, {PHOTOS[1]}"


def test_llava_1_5_parity_refuses_a_second_image(error_line, prunert_main, tiny_artifact: Path, tmp_path: Path) -> None:
    code, out, err = prunert_main("parity", tiny_artifact, "--image", PHOTOS[0], "--image", PHOTOS[1], "--prompt",
                                  "<image>\n<image>\nWhat is it?", "--out", tmp_path / "parity.json")
    assert code == 2 and out == ""
    error_line(err, "2 images, expected at most 1 per prompt", "the llava family takes 1")
    assert not (tmp_path / "parity.json").exists()


def test_parity_prompt_without_placeholder_is_one_error_line(error_line, prunert_main, tiny_artifact: Path, tmp_path: Path) -> None:
    code, out, err = prunert_main("parity", tiny_artifact, "--image", PHOTOS[0], "--prompt", "What is it?",
                                  "--out", tmp_path / "parity.json")
    assert code == 2 and out == ""
    error_line(err, "parity --prompt 'What is it?'", "expected it once per image (1)")
