"""Budget control at real resolutions: `prunert export --min-pixels / --max-pixels` (Qwen2.5-VL's smart_resize range,
recorded in the manifest's family_config and the artifact's preprocessor_config.json, re-applied by parity) and
`prunert inspect A --image x.jpg` (an image's visual tokens before and after pruning, every family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from prunert.adapters.qwen2_5_vl import IMAGE_PLACEHOLDER  # noqa: E402
from prunert.manifest import load_manifest  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
QWEN = "synthetic:qwen2.5-vl-tiny"
UNIT = 28 * 28  # pixels of one merged token
MAX_PIXELS = 256 * UNIT  # 4x the tiny preset's 64 tokens: 512 x 512 -> 448 x 448, 16 x 16 merged tokens


@pytest.fixture(scope="module")
def wide_artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path) -> Path:
    from prunert import cli

    out = tmp_path_factory.mktemp("qwen-pixels") / "k16-256"
    assert cli.main(["export", "--model", QWEN, "--budget", "16", "--max-pixels", str(MAX_PIXELS), "--out", str(out),
                     "--max-prompt-tokens", "64", "--max-new-tokens", "8"]) == 0
    return out


def test_max_pixels_is_recorded_in_manifest_and_preprocessor(wide_artifact: Path) -> None:
    manifest = load_manifest(wide_artifact)
    assert manifest.family_config["pixel_range"] == {"min_pixels": 4 * UNIT, "max_pixels": MAX_PIXELS}
    config = json.loads((wide_artifact / "preprocessor_config.json").read_text())
    assert (config["min_pixels"], config["max_pixels"]) == (16 * UNIT, MAX_PIXELS)  # min raised to K = 16 tokens
    low, opt, high = manifest.graphs["vision"].dim_ranges["merged"]
    assert (low, opt) == (16, 256) and high >= 256 and manifest.budget.num_visual_tokens == high


def test_inspect_image_counts_tokens_before_and_after(prunert_main, wide_artifact: Path) -> None:
    code, out, err = prunert_main("inspect", wide_artifact, "--image", IMAGES / "astronaut.jpg", "--image", IMAGES / "chelsea.jpg")
    assert code == 0, err
    assert out.splitlines() == [f"{IMAGES / 'astronaut.jpg'} (512 x 512): 256 visual tokens before pruning, 16 after (resprune, K=16)",
                                f"{IMAGES / 'chelsea.jpg'} (451 x 300): 176 visual tokens before pruning, 16 after (resprune, K=16)"]
    code, out, _ = prunert_main("inspect", wide_artifact, "--image", IMAGES / "astronaut.jpg", "--json")
    assert code == 0 and json.loads(out)["images"][0] == {"image": str(IMAGES / "astronaut.jpg"), "width": 512, "height": 512,
                                                          "visual_tokens": 256, "kept": 16, "budget": 16, "method": "resprune"}


def test_inspect_image_on_llava(prunert_main, tiny_artifact: Path, tiny_settings: dict) -> None:
    n, k = load_manifest(tiny_artifact).budget.num_visual_tokens, tiny_settings["budget"]
    code, out, err = prunert_main("inspect", tiny_artifact, "--image", IMAGES / "chelsea.jpg")
    assert code == 0, err
    assert out.strip().endswith(f": {n} visual tokens before pruning, {k} after (resprune, K={k})")


def test_inspect_image_errors_are_one_line(prunert_main, error_line, tiny_artifact: Path, tmp_path: Path) -> None:
    code, _, err = prunert_main("inspect", tiny_artifact, "--image", tmp_path / "missing.jpg")
    assert code == 2
    error_line(err, "missing.jpg")


def test_parity_passes_at_the_exported_pixel_range(prunert_main, wide_artifact: Path, tmp_path: Path) -> None:
    """Parity runs HF's processor with the artifact's range (family_config's record): P = 1,024 patches, 16 x 16 windows."""
    code, out, _ = prunert_main("parity", wide_artifact, "--image", IMAGES / "astronaut.jpg", "--prompt", IMAGE_PLACEHOLDER + "What is it?",
                                "--out", tmp_path / "parity.json")
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == "parity: PASS"
    checks = {check["stage"]: check for check in json.loads((tmp_path / "parity.json").read_text())["checks"]}
    assert checks["pixels:window_gather"]["status"] == "PASS" and "visual tokens before pruning" in checks


@pytest.mark.parametrize("flags, needles", [
    (["--min-pixels", "0"], ["--min-pixels: got 0, expected a pixel count >= 1"]),
    (["--min-pixels", "9000", "--max-pixels", "8000"], ["got 9000 > 8000, expected min <= max"]),
    (["--max-pixels", "100"], ["--max-pixels: got 100, expected >= 784"]),
])
def test_bad_pixel_range_is_one_line(prunert_main, error_line, tmp_path: Path, flags: list[str], needles: list[str]) -> None:
    code, _, err = prunert_main("export", "--model", QWEN, "--budget", "16", *flags, "--out", tmp_path / "a")
    assert code == 2
    error_line(err, *needles)
    assert not (tmp_path / "a").exists()


def test_fixed_resolution_family_refuses_a_pixel_range(prunert_main, error_line, tmp_path: Path) -> None:
    code, _, err = prunert_main("export", "--model", "synthetic:llava-tiny", "--budget", "16", "--max-pixels", "200000",
                                "--out", tmp_path / "a")
    assert code == 2
    error_line(err, "--min-pixels / --max-pixels: the llava family resizes every image to a fixed resolution")
