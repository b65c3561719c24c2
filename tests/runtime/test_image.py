"""Runtime image loading and CLIP preprocessing: parity with HF's CLIP image processor, bad input, no torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunert.errors import ConfigError, ImageError
from prunert.adapters.llava.host import ImagePreprocessConfig, center_crop, preprocess, resize_output_size
from prunert.runtime.image import check_image, load_image

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO / "examples" / "images").glob("*.jpg"))
MAX_ABS = 1e-4

# (width, height): square, landscape, portrait, odd sizes, smaller than the crop, extreme aspect ratios
NOISE_SIZES = [(336, 336), (640, 480), (480, 640), (337, 451), (451, 337), (101, 77), (77, 101), (999, 17), (20, 700)]

CONFIGS = {
    "clip336": ImagePreprocessConfig.clip_defaults(336),
    "clip140": ImagePreprocessConfig.clip_defaults(140),
    # crop larger than the resized image -> HF zero-pads
    "pad": ImagePreprocessConfig(shortest_edge=100, crop_height=141, crop_width=140),
    "no_resize": ImagePreprocessConfig(do_resize=False, crop_height=141, crop_width=139),
    "fixed_hw": ImagePreprocessConfig.from_hf_dict({"size": {"height": 150, "width": 130}, "crop_size": 128}),
    "odd_bilinear": ImagePreprocessConfig(
        shortest_edge=141, crop_height=139, crop_width=141, resample=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5,) * 3
    ),
    "no_rescale": ImagePreprocessConfig(shortest_edge=64, crop_height=64, crop_width=64, do_rescale=False),
}


@pytest.fixture(scope="module")
def hf_processor():
    """Build HF's CLIP image processor (the PIL backend without torchvision) from our config's HF dict."""
    transformers = pytest.importorskip("transformers")
    try:
        cls = transformers.CLIPImageProcessorPil
    except AttributeError:  # older transformers: the numpy/PIL class is CLIPImageProcessor itself
        cls = transformers.CLIPImageProcessor
    cache: dict[str, object] = {}

    def get(cfg: ImagePreprocessConfig):
        key = repr(cfg)
        if key not in cache:
            cache[key] = cls.from_dict(cfg.to_hf_dict())
        return cache[key]

    return get


def _hf_pixels(hf_processor, images: list[Image.Image], cfg: ImagePreprocessConfig) -> np.ndarray:
    out = hf_processor(cfg)(images=images, return_tensors="np")["pixel_values"]
    return np.asarray(out, dtype=np.float32)  # [B, 3, H, W]


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    assert diff <= MAX_ABS, f"max abs diff vs HF: {diff}"


# ------------------------------------------------------------------------------------------- HF parity


def test_bundled_photos_exist():
    names = {p.name for p in PHOTOS}
    assert len(PHOTOS) >= 2, names
    assert (REPO / "examples" / "images" / "SOURCES.md").is_file()
    for path in PHOTOS:
        assert path.stat().st_size <= 250_000, path
        image = load_image(path)
        assert image.mode == "RGB"
    assert any(load_image(p).size[0] != load_image(p).size[1] for p in PHOTOS), "want a non-square photo"


@pytest.mark.parametrize("cfg_name", ["clip336", "clip140"])
def test_bundled_photos_match_hf(hf_processor, cfg_name):
    cfg = CONFIGS[cfg_name]
    images = [load_image(p) for p in PHOTOS]
    ours = preprocess(images, cfg)
    assert ours.shape == (len(images), 3, cfg.crop_height, cfg.crop_width)
    _assert_close(ours, _hf_pixels(hf_processor, images, cfg))


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_noise_images_match_hf(hf_processor, cfg_name):
    cfg = CONFIGS[cfg_name]
    images = [_noise(w, h, seed) for seed, (w, h) in enumerate(NOISE_SIZES)]
    ours = preprocess(images, cfg)
    _assert_close(ours, _hf_pixels(hf_processor, images, cfg))


def test_matches_hf_dict_config(hf_processor):
    """The llava-hf preprocessor_config.json, parsed by us and by HF."""
    d = {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    }
    cfg = ImagePreprocessConfig.from_hf_dict(d)
    assert cfg == ImagePreprocessConfig.clip_defaults(336)
    image = _noise(500, 333, seed=7)
    _assert_close(preprocess([image], cfg), _hf_pixels(hf_processor, [image], cfg))


# ------------------------------------------------------------------------------------ resize/crop rules


def test_resize_rounding_truncates_like_hf():
    assert resize_output_size(300, 451, 336) == (336, 505)  # 336 * 451 / 300 = 505.12
    assert resize_output_size(451, 300, 336) == (505, 336)
    assert resize_output_size(400, 600, 336) == (336, 504)
    assert resize_output_size(17, 999, 140) == (140, 8227)  # 8227.06
    assert resize_output_size(50, 50, 336) == (336, 336)


def test_center_crop_offsets_and_padding():
    pixels = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7, 1)  # [H, W, C]
    crop = center_crop(pixels, 2, 3)
    np.testing.assert_array_equal(crop[..., 0], pixels[1:3, 2:5, 0])  # floor((5-2)/2)=1, floor((7-3)/2)=2
    padded = center_crop(pixels, 8, 4)  # taller than the image: pad ceil(3/2)=2 rows on top
    assert padded.shape == (8, 4, 1)
    np.testing.assert_array_equal(padded[2:7, :, 0], pixels[:, 1:5, 0])
    assert not padded[:2].any() and not padded[7:].any()


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_hf_dict_round_trip(cfg_name):
    cfg = CONFIGS[cfg_name]
    d = cfg.to_hf_dict()
    assert d["image_processor_type"] == "CLIPImageProcessor" and d["do_convert_rgb"] is True
    assert ImagePreprocessConfig.from_hf_dict(d, min_side=cfg.min_side) == cfg


def test_from_hf_dict_defaults_and_int_sizes():
    assert ImagePreprocessConfig.from_hf_dict({}) == ImagePreprocessConfig()
    cfg = ImagePreprocessConfig.from_hf_dict({"size": 140, "crop_size": 140})
    assert cfg == ImagePreprocessConfig.clip_defaults(140)
    cfg = ImagePreprocessConfig.clip_defaults(336)
    assert cfg.image_mean == (0.48145466, 0.4578275, 0.40821073) and cfg.resample == 3


@pytest.mark.parametrize(
    "d", [{"size": {"shortest_edge": 336, "longest_edge": 600}}, {"resample": "bicubic"}, {"image_mean": [0.5, 0.5]}]
)
def test_from_hf_dict_rejects_unsupported(d):
    with pytest.raises(ConfigError):
        ImagePreprocessConfig.from_hf_dict(d)


# ------------------------------------------------------------------------------------------ bad input


def _save(tmp_path: Path, name: str, image: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _raises_with_path(path: Path, *words: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path):
    _raises_with_path(tmp_path / "nope.jpg", "not found")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    _raises_with_path(path, "not a recognised image")


def test_truncated_jpeg(tmp_path):
    path = _save(tmp_path, "cut.jpg", _noise(64, 64, seed=1))
    path.write_bytes(path.read_bytes()[:300])
    _raises_with_path(path)


def test_grayscale_png(tmp_path):
    path = _save(tmp_path, "gray.png", Image.new("L", (64, 64), 128))
    _raises_with_path(path, "'L'", "grayscale", "RGB", "convert('RGB')")


def test_rgba_png(tmp_path):
    path = _save(tmp_path, "rgba.png", Image.new("RGBA", (64, 64), (1, 2, 3, 4)))
    _raises_with_path(path, "'RGBA'", "alpha", "RGB")


def test_grayscale_alpha_png(tmp_path):
    _raises_with_path(_save(tmp_path, "la.png", Image.new("LA", (64, 64))), "'LA'", "alpha")


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 255, 255] * 128)
    path = _save(tmp_path, "trans.png", image, transparency=0)
    _raises_with_path(path, "'P'", "transparency")


def test_tiny_image(tmp_path):
    path = _save(tmp_path, "tiny.png", _noise(8, 8, seed=2))
    _raises_with_path(path, "8x8", "16")


def test_palette_and_cmyk_are_converted(tmp_path):
    rgb = _noise(40, 30, seed=3)
    palette = _save(tmp_path, "pal.png", rgb.convert("P"))
    cmyk = _save(tmp_path, "cmyk.jpg", rgb.convert("CMYK"))
    for path in (palette, cmyk):
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (40, 30)


def test_exif_orientation_is_applied(tmp_path):
    image = _noise(60, 40, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, "rotated.jpg", image, exif=exif)
    assert load_image(path).size == (40, 60)


def test_check_image_in_memory():
    assert check_image(_noise(32, 32, seed=5), "mem").mode == "RGB"
    with pytest.raises(ImageError, match="'mem'.*grayscale"):
        check_image(Image.new("L", (32, 32)), "mem")
    with pytest.raises(ImageError, match="too small"):
        preprocess([_noise(30, 30, seed=6)], ImagePreprocessConfig(min_side=31))
    with pytest.raises(ImageError, match="no images"):
        preprocess([], ImagePreprocessConfig())


# --------------------------------------------------------------------------------------- import hygiene


def test_import_without_torch_or_transformers():
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked import: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from prunert.adapters.llava.host import ImagePreprocessConfig, preprocess
        from prunert.runtime.image import load_image

        photo = sys.argv[1]
        pixels = preprocess([load_image(photo)], ImagePreprocessConfig.clip_defaults(140))
        assert pixels.shape == (1, 3, 140, 140), pixels.shape
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        assert not heavy, heavy
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", code, str(PHOTOS[0])], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
