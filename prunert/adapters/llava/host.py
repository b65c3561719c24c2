"""LLaVA-1.5 host side (numpy + Pillow): CLIP preprocessing, the model's view of an image, and 1-D positions
of the spliced sequence.

`preprocess` reproduces Hugging Face's `CLIPImageProcessorPil` (the backend transformers falls back to
without torchvision) step for step: shortest-edge resize with Pillow, center crop (zero-padding when
the image is smaller than the crop), rescale, normalize, HWC -> CHW. Rounding and crop offsets follow
`transformers.image_transforms.get_resize_output_image_size` and `center_crop`. LLaVA-NeXT reuses it per tile.

This module must never import torch or transformers, not even indirectly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from prunert.errors import ConfigError, ImageError
from prunert.runtime.host import HostAdapter, SpliceLayout
from prunert.runtime.image import DEFAULT_MIN_SIDE, check_image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
PIL_RESAMPLE_CODES = frozenset(range(6))  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """CLIP image preprocessing settings. Defaults are those of HF's `CLIPImageProcessor`.

    shortest_edge:  resize so the shorter side has this many pixels, keeping the aspect ratio.
    resize_hw:      if set, resize to exactly (height, width) instead (HF `size={"height","width"}`).
    crop_height/crop_width: center-crop size, i.e. the model's input size.
    resample:       Pillow resample code (3 = bicubic, what CLIP uses).
    min_side:       runtime policy, not part of the HF format: images whose shorter side is below
                    this are rejected as tiny.
    """

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = PIL_BICUBIC
    min_side: int = DEFAULT_MIN_SIDE
    resize_hw: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("shortest_edge", "crop_height", "crop_width", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"image preprocessing {name}: got {value!r}, expected an int >= 1")
        if self.resize_hw is not None and (len(self.resize_hw) != 2 or min(self.resize_hw) < 1):
            raise ConfigError(f"image preprocessing resize_hw: got {self.resize_hw!r}, expected (height, width) >= 1")
        if self.resample not in PIL_RESAMPLE_CODES or isinstance(self.resample, bool):
            raise ConfigError(f"image preprocessing resample: got {self.resample!r}, expected a Pillow code 0..5")
        if not self.rescale_factor > 0:
            raise ConfigError(f"image preprocessing rescale_factor: got {self.rescale_factor}, expected > 0")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"image preprocessing {name}: got {value!r}, expected 3 values (R, G, B)")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"image preprocessing image_std: got {self.image_std!r}, expected non-zero values")

    @classmethod
    def clip_defaults(cls, image_size: int) -> ImagePreprocessConfig:
        """The settings LLaVA-1.5 uses: shortest edge = crop = image_size, OpenAI CLIP mean/std, bicubic."""
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], min_side: int = DEFAULT_MIN_SIDE) -> ImagePreprocessConfig:
        """Parse a Hugging Face `preprocessor_config.json` dict (CLIPImageProcessor format).

        Missing keys take HF's CLIP defaults; keys that do not affect pixels (processor_class, ...) are ignored.
        """
        base = cls()
        shortest_edge, resize_hw = _parse_size(d.get("size"), base.shortest_edge)
        crop_height, crop_width = _parse_crop_size(d.get("crop_size"), (base.crop_height, base.crop_width))
        return cls(
            shortest_edge=shortest_edge,
            crop_height=crop_height,
            crop_width=crop_width,
            do_resize=bool(d.get("do_resize", base.do_resize)),
            do_center_crop=bool(d.get("do_center_crop", base.do_center_crop)),
            do_rescale=bool(d.get("do_rescale", base.do_rescale)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", base.do_normalize)),
            image_mean=_parse_triple(d.get("image_mean", base.image_mean), "image_mean"),
            image_std=_parse_triple(d.get("image_std", base.image_std), "image_std"),
            resample=_parse_resample(d.get("resample", base.resample)),
            min_side=min_side,
            resize_hw=resize_hw,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A CLIPImageProcessor-compatible `preprocessor_config.json` dict (min_side is not included)."""
        if self.resize_hw is None:
            size: dict[str, int] = {"shortest_edge": self.shortest_edge}
        else:
            size = {"height": self.resize_hw[0], "width": self.resize_hw[1]}
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def _parse_size(size: Any, default: int) -> tuple[int, tuple[int, int] | None]:
    """HF `size` -> (shortest_edge, resize_hw). CLIP uses default_to_square=False, so an int is a shortest edge."""
    if size is None:
        return default, None
    if isinstance(size, int) and not isinstance(size, bool):
        return size, None
    if isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = int(size[0]), int(size[1])
        return min(height, width), (height, width)
    if isinstance(size, Mapping):
        keys = {k for k, v in size.items() if v is not None}
        if keys == {"shortest_edge"}:
            return int(size["shortest_edge"]), None
        if keys == {"height", "width"}:
            height, width = int(size["height"]), int(size["width"])
            return min(height, width), (height, width)
    raise ConfigError(
        f"preprocessor size: got {size!r}, expected {{'shortest_edge': N}} or {{'height': H, 'width': W}}"
    )


def _parse_crop_size(crop: Any, default: tuple[int, int]) -> tuple[int, int]:
    """HF `crop_size` (dict, int or (h, w)) -> (height, width)."""
    if crop is None:
        return default
    if isinstance(crop, int) and not isinstance(crop, bool):
        return crop, crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    if isinstance(crop, Mapping) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    raise ConfigError(f"preprocessor crop_size: got {crop!r}, expected {{'height': H, 'width': W}} or an int")


def _parse_triple(value: Any, name: str) -> tuple[float, float, float]:
    """A per-channel mean/std: a list of 3 numbers, or one number for all channels."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise ConfigError(f"preprocessor {name}: got {value!r}, expected 3 values (R, G, B)")
    return values  # type: ignore[return-value]


def _parse_resample(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in PIL_RESAMPLE_CODES:
        raise ConfigError(f"preprocessor resample: got {value!r}, expected a Pillow resample code 0..5 (3 = bicubic)")
    return int(value)



# ----------------------------------------------------------------------------------------- preprocessing


def preprocess(images: Sequence[Image.Image], cfg: ImagePreprocessConfig) -> np.ndarray:
    """CLIP-preprocess a batch of images into float32 pixel values [B, 3, crop_h, crop_w].

    Matches HF's CLIPImageProcessor(Pil) for the same config. Images are validated with `check_image`.
    Without center crop, all images must come out the same size (they are stacked into one array).
    """
    if len(images) == 0:
        raise ImageError("preprocess: got no images, expected at least one")
    arrays = [preprocess_one(check_image(img, f"images[{i}]", cfg.min_side), cfg) for i, img in enumerate(images)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageError(
            f"preprocess: images came out with different shapes {sorted(shapes)}, expected one shape; "
            f"enable do_center_crop or resize to a fixed size"
        )
    return np.stack(arrays)  # [B, 3, H, W]


def preprocess_one(image: Image.Image, cfg: ImagePreprocessConfig) -> np.ndarray:
    """One RGB image -> float32 [3, H, W] (H, W = crop size when do_center_crop)."""
    if cfg.do_resize:
        image = image.resize(_resize_size_wh(image.size, cfg), resample=cfg.resample)
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    if cfg.do_center_crop:
        pixels = center_crop(pixels, cfg.crop_height, cfg.crop_width)  # [crop_h, crop_w, 3]
    values = rescale_normalize(pixels, cfg)  # [H, W, 3] float32
    return np.ascontiguousarray(values.transpose(2, 0, 1))  # [3, H, W]


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after a shortest-edge resize, rounded exactly like HF's `get_resize_output_image_size`.

    The long side is truncated (int()), not rounded: 336 * 451 / 300 = 505.12 -> 505.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _resize_size_wh(size_wh: tuple[int, int], cfg: ImagePreprocessConfig) -> tuple[int, int]:
    """Pillow (width, height) target for `cfg`."""
    if cfg.resize_hw is not None:
        height, width = cfg.resize_hw
    else:
        height, width = resize_output_size(size_wh[1], size_wh[0], cfg.shortest_edge)
    return width, height


def center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF `center_crop` on [H, W, C]: offsets floor((H - crop_h) / 2); a too-small image is zero-padded.

    When padding, the original is placed at ceil((crop - size) / 2) from the top/left, like HF.
    """
    height, width = pixels.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    top_pad, left_pad = (new_h - height + 1) // 2, (new_w - width + 1) // 2  # ceil(diff / 2)
    canvas = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)  # [new_h, new_w, C]
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def rescale_normalize(pixels: np.ndarray, cfg: ImagePreprocessConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3], with HF's dtypes: rescale in float64, normalize in float32."""
    if cfg.do_rescale:
        values = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        values = (values - mean) / std
    return values


def model_view(image: Image.Image, cfg: ImagePreprocessConfig) -> Image.Image:
    """The RGB pixels the model sees: the same resize and center crop as `preprocess`, without rescale/normalize."""
    image = check_image(image, "image", cfg.min_side)
    if cfg.do_resize:
        image = image.resize(_resize_size_wh(image.size, cfg), resample=cfg.resample)
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    if cfg.do_center_crop:
        pixels = center_crop(pixels, cfg.crop_height, cfg.crop_width)  # [crop_h, crop_w, 3]
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


# ------------------------------------------------------------------------------------------- the host

# llava-hf's chat template of LLaVA-1.5 (llava-hf/llava-1.5-7b-hf), also llava-v1.6-vicuna's: "USER: <image>\n{text} ASSISTANT:",
# images before the text of their message.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class LlavaHostAdapter(HostAdapter):
    """CLIP pixels [B, 3, H, W]; consecutive 1-D positions (kept visual tokens take consecutive positions in
    the spliced sequence, as in the reference)."""

    def vision_inputs(self, images: Sequence[Any], preprocessor_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
        cfg = ImagePreprocessConfig.from_hf_dict(preprocessor_config)
        return {"pixel_values": preprocess(images, cfg)}  # [B, 3, H, W]

    def position_ids(self, attention_mask: np.ndarray, layout: SpliceLayout) -> np.ndarray:
        return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)  # [B, L]

    def next_position_ids(self, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return position_ids[:, -1:] + 1  # [B, 1]: the last prefill position + 1 (left padding: the last is valid)

    def model_view(self, image: Any, preprocessor_config: Mapping[str, Any]) -> Image.Image:
        return model_view(image, ImagePreprocessConfig.from_hf_dict(preprocessor_config))

    def default_chat_template(self) -> str:
        """llava-hf's LLaVA-1.5 template (LLaVA-NeXT inherits it: llava-v1.6-vicuna's is the same)."""
        return LLAVA_CHAT_TEMPLATE


HOST_ADAPTER = LlavaHostAdapter  # the registry's entry (prunert.adapters.host_adapter_class)
