"""Synthetic LLaVA-NeXT checkpoints: HF loads them (model, PIL image processor, processor), a real image
runs end to end, logits are not flat, the host's tiles match HF's and land where HF packs them.

Only `llava-next-tiny` is ever built here; `llava-next-shaped` is checked on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llava_next import modeling_llava_next as hf_modeling  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402

from prunert.adapters.llava.synthetic import MARKER_FILE  # noqa: E402
from prunert.adapters.llava_next.host import AnyresConfig, LlavaNextHostAdapter, hf_packed_positions  # noqa: E402
from prunert.adapters.llava_next.synthetic import (  # noqa: E402
    LLAVA_NEXT_PROMPT_TEMPLATE,
    PRESETS,
    LlavaNextPreset,
    build_config,
    build_model,
    parameter_counts,
    preset_hash,
    synthetic_checkpoint,
)
from prunert.adapters.llava.tokenizer_builder import build_tokenizer  # noqa: E402
from prunert.errors import ConfigError, ModelSourceError  # noqa: E402

TINY = "llava-next-tiny"
IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
PROMPTS = ("What is in the picture?", "Describe the image in detail.", "What color is the car?")


def _photo(name: str) -> Image.Image:
    with Image.open(IMAGES / f"{name}.jpg") as opened:
        return opened.convert("RGB")


def _images() -> list[Image.Image]:
    """Square, wide (3:2), and a tall synthetic one: three different tile grids."""
    tall = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 60, 3), dtype=np.uint8))
    return [_photo("astronaut"), _photo("chelsea"), tall]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return synthetic_checkpoint(TINY)  # in the session's PRUNERT_CACHE (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path):
    return transformers.LlavaNextForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    return transformers.AutoProcessor.from_pretrained(tiny_dir)


def _prompt(text: str) -> str:
    return LLAVA_NEXT_PROMPT_TEMPLATE.format(prompt=f"<image>\n{text}")


def test_directory_has_hf_files(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "preprocessor_config.json", "processor_config.json", MARKER_FILE} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["preset"] == TINY and marker["synthetic"] is True and marker["family"] == "llava_next"
    assert tiny_dir.name == f"{TINY}-{preset_hash(PRESETS[TINY])}"
    assert synthetic_checkpoint(TINY) == tiny_dir  # cached: written once


def test_config_matches_preset(tiny_dir: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    preset = PRESETS[TINY]
    assert config.model_type == "llava_next" and config.architectures == ["LlavaNextForConditionalGeneration"]
    assert config.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112]]
    assert config.vision_config.image_size == 56 and config.vision_config.patch_size == 14
    assert config.image_token_index == 4 and config.text_config.pad_token_id == 3
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert (preset.max_tiles, preset.num_patches, preset.max_visual_tokens) == (5, 16, 80)


def test_pil_image_processor_loads_with_pinpoints(tiny_dir: Path, processor) -> None:
    image_processor = LlavaNextImageProcessorPil.from_pretrained(tiny_dir)
    assert image_processor.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112]]
    assert image_processor.crop_size["height"] == 56 and image_processor.size["shortest_edge"] == 56
    assert type(processor).__name__ == "LlavaNextProcessor" and processor.patch_size == 14
    assert isinstance(processor.image_processor, LlavaNextImageProcessorPil)


def test_forward_on_real_images_through_hf_processor(tiny_model, processor) -> None:
    images = _images()
    inputs = processor(images=images, text=[_prompt(p) for p in PROMPTS], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[1:] == (5, 3, 56, 56)
    with torch.no_grad():
        logits = tiny_model(**inputs).logits  # [B, L, V]
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
    last = logits[:, -1]  # [B, V]
    top2 = last.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).median()) > 0.02, top2  # not near-uniform
    assert float(last.std(dim=-1).min()) > 1.0
    assert not torch.allclose(last[0], last[1], atol=1e-2)  # the image (and prompt) matter


def test_host_matches_hf_pixels_on_checkpoint_config(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    images = _images()
    reference = LlavaNextImageProcessorPil.from_pretrained(tiny_dir)(images=images, return_tensors="np")
    ours = LlavaNextHostAdapter({}, 0).vision_inputs(images, config)
    hf_tiles = reference["pixel_values"].shape[1]  # HF pads only up to the batch's largest tile count
    np.testing.assert_array_equal(ours["pixel_values"][:, :hf_tiles], reference["pixel_values"])
    assert not ours["pixel_values"][:, hf_tiles:].any()
    counts = [hf_modeling.image_size_to_num_patches(tuple(s), config["image_grid_pinpoints"], 56) for s in reference["image_sizes"]]
    assert ours["tile_mask"].sum(1).tolist() == counts


def test_host_tokens_land_where_hf_packs_them(tiny_dir: Path, tiny_model, processor) -> None:
    """Run HF's tower + projector on the host's tiles, gather by `hf_packed_positions`: these are exactly
    HF's packed image features minus image_newline, and the processor's placeholder count agrees."""
    images = _images()
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    cfg = AnyresConfig.from_hf_dict(config)
    ours = LlavaNextHostAdapter({}, 0).vision_inputs(images, config)
    hf = processor(images=images, text=[_prompt("Hi")] * 3, padding=True, return_tensors="pt")
    inner = tiny_model.model
    with torch.no_grad():
        packed = inner.get_image_features(hf["pixel_values"], hf["image_sizes"]).pooler_output  # B x [L_b, D]
        tiles = torch.from_numpy(ours["pixel_values"]).flatten(0, 1)  # [B*T, 3, S, S]
        states = inner.vision_tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = inner.multi_modal_projector(states).unflatten(0, (len(images), cfg.max_tiles))  # [B, T, N, D]
    image_tokens = (hf["input_ids"] == tiny_model.config.image_token_index).sum(1)
    for b, image in enumerate(images):
        positions, length = hf_packed_positions((image.height, image.width), cfg)
        assert length == len(packed[b]) == int(image_tokens[b])
        keep = ours["token_mask"][b].astype(bool)
        np.testing.assert_array_equal(keep, positions >= 0)
        mine = features[b][torch.from_numpy(keep)]  # [K_b, D], tile-major
        theirs = packed[b][torch.from_numpy(positions[keep])]
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        newline_rows = length - int(keep.sum())
        newlines = np.setdiff1d(np.arange(length), positions[keep])
        assert len(newlines) == newline_rows
        torch.testing.assert_close(packed[b][torch.from_numpy(newlines)], inner.image_newline.expand(newline_rows, -1))


def test_build_model_is_bit_identical_to_checkpoint(tiny_model) -> None:
    fresh = build_model(PRESETS[TINY]).state_dict()
    loaded = tiny_model.state_dict()
    assert fresh.keys() == loaded.keys()
    assert all(torch.equal(fresh[k], loaded[k]) for k in fresh)
    newline = fresh["model.image_newline"]
    assert 0.5 < float(newline.std()) < 1.5  # unit scale, not HF's 1/sqrt(hidden)


def test_shaped_preset_on_meta_device() -> None:
    preset = PRESETS["llava-next-shaped"]
    config = build_config(preset, build_tokenizer(preset.vocab_size))
    with torch.device("meta"):
        model = transformers.LlavaNextForConditionalGeneration(config)
    counts = parameter_counts(preset)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert config.vision_config.image_size == 336 and preset.num_patches == 576 and preset.max_tiles == 5
    assert 0.45e9 < counts["decoder"] < 0.5e9 and 0.29e9 < counts["vision"] < 0.31e9


def test_preset_validation_and_unknown_name() -> None:
    base = {k: getattr(PRESETS[TINY], k) for k in PRESETS[TINY].__dataclass_fields__}
    with pytest.raises(ConfigError, match="not a multiple of image_size 56"):
        LlavaNextPreset(**{**base, "image_grid_pinpoints": ((56, 100),)})
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        LlavaNextPreset(**{**base, "image_grid_pinpoints": ()})
    with pytest.raises(ModelSourceError, match="llava-next-tiny"):
        synthetic_checkpoint("llava-next-giant")
