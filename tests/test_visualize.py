"""`prunert visualize`: the kept-patch overlay PNG (size, brightness of kept vs pruned patches, one panel
per artifact), the model-view crop geometry, bad input -> one `prunert: error:` line, and no torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunert import cli
from prunert.errors import ConfigError
from prunert.runtime import VLMPipeline
from prunert.adapters.llava.host import ImagePreprocessConfig, LlavaHostAdapter, preprocess_one
from prunert.visualize import (
    PAD,
    _font,
    auto_scale,
    panel_title,
    patch_box,
    patch_grid,
    render_kept_patches,
    single_patch_grid,
    title_height,
    visualize,
)

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is the astronaut holding?"
GRID = 10  # llava-tiny: 140 px / 14 px patches
CROP = 140


def _brightness(pixels: np.ndarray, box: tuple[int, int, int, int], inset: int) -> float:
    """Mean grey level inside a patch box, `inset` px in from its edges (away from the outline)."""
    left, top, right, bottom = box
    return float(pixels[top + inset : bottom - inset, left + inset : right - inset].mean())


def _kept(artifact: Path, image) -> np.ndarray:
    return np.asarray(VLMPipeline(artifact).encode_images([image], [PROMPT]).kept_indices)[0]


# ---------------------------------------------------------------------------------------- geometry


def test_patch_grid_square_and_not() -> None:
    assert patch_grid(576) == 24 and patch_grid(100) == 10 and patch_grid(1) == 1
    for bad in (0, 577, 50, -4):
        with pytest.raises(ConfigError, match="not a perfect square"):
            patch_grid(bad)


def test_patch_boxes_tile_the_crop() -> None:
    covered = np.zeros((336, 336), int)
    for i in range(24 * 24):
        left, top, right, bottom = patch_box(i, 24, 336, 336)
        assert (right - left, bottom - top) == (14, 14)
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()
    assert patch_box(25, 24, 336, 336) == (14, 14, 28, 28)  # row-major: row 1, col 1


def test_model_view_is_the_unnormalised_preprocess_crop() -> None:
    """Same resize + center crop as the model's input: normalising the view gives pixel_values."""
    image = Image.open(PHOTO).convert("RGB").crop((0, 40, 512, 400))  # not square: exercises the crop
    cfg = ImagePreprocessConfig.clip_defaults(140)
    view = LlavaHostAdapter({}, 100).model_view(image, cfg.to_hf_dict())
    assert view.size == (140, 140) and view.mode == "RGB"
    expected = preprocess_one(image, cfg)  # [3, H, W]
    ours = (np.asarray(view, np.float32) / 255 - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    np.testing.assert_allclose(ours.transpose(2, 0, 1), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------- rendering


def test_render_kept_patches_brightens_kept_dims_pruned() -> None:
    rng = np.random.default_rng(0)
    crop = Image.fromarray(rng.integers(150, 250, (CROP, CROP, 3), dtype=np.uint8), "RGB")
    kept = [0, 11, 55, 99]
    panel = render_kept_patches(crop, kept, GRID, "test: kept 4 of 100", scale=1)
    band = panel.height - CROP
    assert panel.width == CROP and band > 0
    picture = np.asarray(panel.convert("L"), np.float32)[band:]
    source = np.asarray(crop.convert("L"), np.float32)
    kept_means = [_brightness(picture, patch_box(i, GRID, CROP, CROP), 2) for i in kept]
    pruned_means = [_brightness(picture, patch_box(i, GRID, CROP, CROP), 2) for i in range(GRID * GRID) if i not in kept]
    assert min(kept_means) > max(pruned_means) + 30
    for i in kept:  # kept patches are the photo, untouched inside the outline
        left, top, right, bottom = patch_box(i, GRID, CROP, CROP)
        np.testing.assert_array_equal(picture[top + 1 : bottom - 1, left + 1 : right - 1], source[top + 1 : bottom - 1, left + 1 : right - 1])


def test_render_rejects_out_of_grid_indices() -> None:
    crop = Image.new("RGB", (CROP, CROP), (200, 200, 200))
    with pytest.raises(ConfigError, match="kept indices"):
        render_kept_patches(crop, [0, 100], GRID, "t")


# ---------------------------------------------------------------------------------------- end to end


def test_visualize_writes_png_of_expected_size(tiny_artifact: Path, tmp_path: Path, tiny_settings: dict) -> None:
    out = visualize([tiny_artifact], PHOTO, PROMPT, tmp_path / "new" / "dir" / "overlay.png", scale=1)
    assert out.is_file() and out.parent.is_dir()
    assert not [p for p in out.parent.iterdir() if p.name != "overlay.png"]  # no temp file left behind
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        size = png.size
    title = panel_title("resprune", tiny_settings["budget"], tiny_settings["num_visual_tokens"], PROMPT, synthetic=True)
    band = title_height(title, CROP, _font())
    assert size == (CROP + 2 * PAD, band + CROP + 2 * PAD)


def test_visualize_kept_patches_brighter_than_pruned(tiny_artifact: Path, tmp_path: Path) -> None:
    """On a flat bright photo every kept patch is brighter than every pruned one; the kept set is the pipeline's."""
    rng = np.random.default_rng(1)
    photo = tmp_path / "bright.png"
    Image.fromarray(rng.integers(160, 240, (180, 240, 3), dtype=np.uint8), "RGB").save(photo)
    out = visualize([tiny_artifact], photo, PROMPT, tmp_path / "o.png", scale=2)
    side = CROP * 2
    with Image.open(out) as png:
        grey = np.asarray(png.convert("L"), np.float32)
    picture = grey[grey.shape[0] - PAD - side : grey.shape[0] - PAD, PAD : PAD + side]
    kept = set(_kept(tiny_artifact, Image.open(photo).convert("RGB")).tolist())
    assert len(kept) == 16
    means = {i: _brightness(picture, patch_box(i, GRID, side, side), 3) for i in range(GRID * GRID)}
    assert min(means[i] for i in kept) > max(means[i] for i in means if i not in kept) + 30


def test_two_artifacts_two_panels(tiny_artifact: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    shutil.copytree(tiny_artifact, second)
    out = visualize([tiny_artifact, second], PHOTO, PROMPT, tmp_path / "two.png", scale=1)
    with Image.open(out) as png:
        grey = np.asarray(png.convert("L"), np.float32)
    assert grey.shape[1] == 2 * CROP + 3 * PAD
    left = grey[-PAD - CROP : -PAD, PAD : PAD + CROP]
    right = grey[-PAD - CROP : -PAD, 2 * PAD + CROP : 2 * PAD + 2 * CROP]
    np.testing.assert_array_equal(left, right)  # same artifact, same kept patches
    assert (grey[:, PAD + CROP : 2 * PAD + CROP] == 255).all()  # white gap between the panels


def test_auto_scale_zooms_small_models_only() -> None:
    assert auto_scale((336, 336)) == 1
    assert auto_scale((140, 140)) == 3


# ---------------------------------------------------------------------------------------- CLI


def test_cli_visualize(capsys, tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli" / "v.png"
    code = cli.main(["visualize", str(tiny_artifact), str(tiny_artifact), "--image", str(PHOTO), "--prompt", PROMPT, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out}" in captured.out
    with Image.open(out) as png:
        assert png.width == 2 * CROP * auto_scale((CROP, CROP)) + 3 * PAD


@pytest.mark.parametrize("kind", ["missing", "not_image", "tiny"])
def test_cli_visualize_bad_image(kind: str, error_line, capsys, tiny_artifact: Path, tmp_path: Path) -> None:
    image = tmp_path / f"{kind}.png"
    if kind == "not_image":
        image.write_text("not an image")
    elif kind == "tiny":
        Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / "o.png"
    code = cli.main(["visualize", str(tiny_artifact), "--image", str(image), "--prompt", PROMPT, "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, f"image '{image}'")
    assert not out.exists()


def test_cli_visualize_missing_artifact_subprocess(error_line, cli_subprocess, tiny_artifact: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    out = tmp_path / "o.png"
    result = cli_subprocess("visualize", tiny_artifact, missing, "--image", PHOTO, "--prompt", PROMPT, "--out", out)
    assert result.returncode == 2
    error_line(result.stderr, f"artifact '{missing}'")
    assert not out.exists()


def test_cli_visualize_bad_prompt_and_out(error_line, capsys, tiny_artifact: Path, tmp_path: Path) -> None:
    code = cli.main(["visualize", str(tiny_artifact), "--image", str(PHOTO), "--prompt", "<image> twice <image>", "--out", str(tmp_path / "o.png")])
    assert code == 2
    error_line(capsys.readouterr().err, "prompt '<image> twice <image>'", "2 times")
    code = cli.main(["visualize", str(tiny_artifact), "--image", str(PHOTO), "--prompt", PROMPT, "--out", str(tmp_path)])
    assert code == 2
    error_line(capsys.readouterr().err, "is a directory")


def test_non_square_token_count_is_a_config_error(artifact_copy: Path, tmp_path: Path, error_line, capsys) -> None:
    import json

    from prunert.manifest import MANIFEST_NAME

    path = artifact_copy / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["budget"]["num_visual_tokens"] = 98
    path.write_text(json.dumps(manifest))
    code = cli.main(["visualize", str(artifact_copy), "--image", str(PHOTO), "--prompt", PROMPT, "--out", str(tmp_path / "o.png")])
    assert code == 2
    error_line(capsys.readouterr().err, "98 visual tokens is not a perfect square")


def test_single_patch_grid_of_a_llava_artifact(tiny_artifact: Path) -> None:
    from prunert.manifest import load_manifest

    assert single_patch_grid(load_manifest(tiny_artifact), tiny_artifact) == GRID


@pytest.mark.parametrize("shape", ["tiled", "dynamic"])
def test_artifact_without_one_fixed_grid_is_refused_up_front(
    shape: str, tiny_artifact: Path, artifact_copy: Path, tmp_path: Path, error_line, capsys
) -> None:
    """Tiles (LLaVA-NeXT-like inputs) or a per-image patch count (Qwen2.5-VL-like): refused from the manifest alone,
    before any graph runs or the image is read; a real NeXT / Qwen artifact is refused in tests/parity."""
    import json

    from prunert.manifest import MANIFEST_NAME

    path = artifact_copy / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    text_inputs = manifest["graphs"]["vision"]["inputs"][1:]
    if shape == "tiled":
        manifest["source"]["family"] = "llava_next"
        images = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 5, 3, 56, 56]},
                  {"name": "tile_mask", "dtype": "bool", "shape": ["batch", 5]}]
    else:
        manifest["source"]["family"] = "qwen2_5_vl"
        images = [{"name": "pixel_values", "dtype": "float32", "shape": ["patches", 1176]}]
    manifest["graphs"]["vision"]["inputs"] = images + text_inputs
    path.write_text(json.dumps(manifest))
    out = tmp_path / "o.png"
    missing_image = tmp_path / "not-read.jpg"  # the artifact is refused first
    code = cli.main(["visualize", str(artifact_copy), "--image", str(missing_image), "--prompt", PROMPT, "--out", str(out)])
    assert code == 2
    family = manifest["source"]["family"]
    error_line(capsys.readouterr().err, f"artifact '{artifact_copy}' ({family} family)", "pixel_values",
               "supports a single fixed patch grid (LLaVA-1.5-style artifacts", "only")
    assert not out.exists()
    code = cli.main(["visualize", str(tiny_artifact), str(artifact_copy), "--image", str(PHOTO), "--prompt", PROMPT, "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, f"artifact '{artifact_copy}'", "single fixed patch grid")
    assert not out.exists()


# ---------------------------------------------------------------------------------------- no torch

def test_cli_visualize_without_torch(python_without, tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "nt" / "v.png"
    code = """
        from prunert import cli

        artifact, photo, prompt, out = sys.argv[1:5]
        code = cli.main(["visualize", artifact, "--image", photo, "--prompt", prompt, "--out", out])
        assert_no_heavy_modules()
        print(f"CODE {code}")
        """
    result = python_without(code, tiny_artifact, PHOTO, PROMPT, out, blocked=("torch", "transformers", "matplotlib"))
    assert result.returncode == 0, result.stderr
    assert "CODE 0" in result.stdout, result.stdout + result.stderr
    assert out.is_file()
