"""Runtime image loading and CLIP preprocessing: parity with HF's CLIP image processor, bad input, no torch."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunert.errors import ConfigError, ImageError
from prunert.adapters.llava.host import ImagePreprocessConfig, center_crop, preprocess, resize_output_size
from prunert.runtime.image import MAX_IMAGE_PIXELS, check_image, decode_image_bytes, load_image

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


def test_grayscale_png_is_replicated(tmp_path):
    """HF's do_convert_rgb, llama.cpp and ollama: grayscale becomes three equal channels (it was refused before)."""
    path = _save(tmp_path, "gray.png", Image.new("L", (64, 48), 128))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((3, 5)) == (128, 128, 128)


def test_rgba_png_is_composited_on_white(tmp_path):
    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[:, :16] = (10, 20, 30, 0)  # fully transparent: white
    pixels[:, 16:] = (10, 20, 30, 255)  # opaque: itself
    pixels[:8] = (200, 100, 0, 128)  # half: 200 * 128/255 + 255 * 127/255, ...
    image = load_image(_save(tmp_path, "rgba.png", Image.fromarray(pixels, "RGBA")))
    assert image.mode == "RGB"
    assert image.getpixel((2, 20)) == (255, 255, 255)
    assert image.getpixel((20, 20)) == (10, 20, 30)
    assert image.getpixel((2, 2)) == (227, 177, 127)


def test_grayscale_alpha_and_transparent_palette_are_composited(tmp_path):
    assert load_image(_save(tmp_path, "la.png", Image.new("LA", (32, 32), (0, 0)))).getpixel((1, 1)) == (255, 255, 255)
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    image.paste(1, (16, 0, 32, 32))
    converted = load_image(_save(tmp_path, "trans.png", image, transparency=0))
    assert converted.getpixel((1, 1)) == (255, 255, 255) and converted.getpixel((20, 1)) == (255, 0, 0)


def test_sixteen_bit_grayscale_keeps_its_top_bits(tmp_path):
    """A 16-bit PNG: Pillow's own conversion clips every value above 255 to white; stb_image (llama.cpp) shifts."""
    pixels = np.repeat(np.array([[0, 65535, 30000, 255]] * 16, np.uint16), 16, axis=1)  # [16, 64]
    image = load_image(_save(tmp_path, "gray16.png", Image.fromarray(pixels)))
    assert [image.getpixel((x, 0))[0] for x in (0, 16, 32, 48)] == [0, 255, 117, 0]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "1"])
def test_conversion_matches_hf_convert_to_rgb(mode):
    image_transforms = pytest.importorskip("transformers.image_transforms")
    rng = np.random.default_rng(9)
    image = Image.fromarray(rng.integers(0, 256, (24, 40, 4), np.uint8), "RGBA").convert(mode)
    ours = np.asarray(check_image(image, "mem"))
    theirs = np.asarray(image_transforms.convert_to_rgb(image))
    np.testing.assert_array_equal(ours, theirs)


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
    assert check_image(Image.new("L", (32, 32)), "mem").mode == "RGB"
    with pytest.raises(ImageError, match="'mem'.*expected a PIL.Image.Image"):
        check_image(np.zeros((32, 32, 3), np.uint8), "mem")
    with pytest.raises(ImageError, match="too small"):
        preprocess([_noise(30, 30, seed=6)], ImagePreprocessConfig(min_side=31))
    with pytest.raises(ImageError, match="no images"):
        preprocess([], ImagePreprocessConfig())


# ------------------------------------------------------------------------------- bytes from a server


def png_bomb(width: int, height: int, complete: bool = True) -> bytes:
    """A valid 8-bit grayscale PNG of width x height black pixels: a few hundred KB that decode to width * height
    bytes (complete=False: only the first rows' data, for sizes too big to compress in a test)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(width + 1)  # filter byte 0 + the row's pixels
    data = b"".join(packer.compress(row) for _ in range(height if complete else 16)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def test_decode_image_bytes_converts_and_orients():
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    image = decode_image_bytes(_encoded(rgba))
    assert image.mode == "RGB" and image.size == (40, 30) and image.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    _noise(60, 40, seed=8).save(buffer, "JPEG", exif=exif)
    assert decode_image_bytes(buffer.getvalue()).size == (40, 60)


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "no data"),
        (b"this is not a picture", "not a recognised image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", "not a recognised image"),  # Pillow reads EPS, not from bytes
        (_encoded(_noise(64, 64, seed=1))[:300], "could not be read"),
        (_encoded(_noise(8, 8, seed=1)), "too small"),
    ],
    ids=["empty", "text", "eps", "truncated", "tiny"],
)
def test_decode_image_bytes_refuses(data, needle):
    with pytest.raises(ImageError, match=needle) as info:
        decode_image_bytes(data, "messages[0].content[1]")
    assert str(info.value).startswith("messages[0].content[1]: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("side", [8193, 100_000], ids=["over-ours", "over-pillows"])
def test_decompression_bomb_is_refused_before_decoding(monkeypatch, tmp_path, side):
    """The pixel limit is checked from the header: no pixel is decoded (Image.load would fail the test)."""
    bomb = png_bomb(side, side, complete=side < 10_000)
    assert len(bomb) < 200_000 and side * side > MAX_IMAGE_PIXELS

    def no_decoding(self):
        raise AssertionError("the bomb was decoded")

    Image.init()  # Pillow's plugins load (and draw) before the patch
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageError, match=f"at most {MAX_IMAGE_PIXELS:,} pixels"):
        decode_image_bytes(bomb)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    _raises_with_path(path, "decompression bomb")


def test_png_bomb_helper_is_a_real_image():
    """The bomb above is a valid PNG: at a size under the limit the same construction decodes."""
    assert decode_image_bytes(png_bomb(64, 48)).size == (64, 48)


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
