"""Synthetic Qwen2.5-VL checkpoints: seeded random weights written as real Hugging Face directories.

Same files as a downloaded `Qwen/Qwen2.5-VL-3B-Instruct` directory (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json, chat_template.jinja, preprocessor_config.json), loadable
with `Qwen2_5_VLForConditionalGeneration.from_pretrained`. The machinery (cache layout, atomic
publish, marker file, init scales) is the LLaVA presets' (`prunert.adapters.llava.synthetic`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import prunert
from prunert.staged_dir import publish_directory
from prunert.adapters.llava import synthetic as llava_synthetic
from prunert.adapters.llava.synthetic import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    FILLER_LM_HEAD_SCALE,
    LINEAR_GAIN,
    LM_HEAD_GAIN,
    MARKER_FILE,
    TOKEN_EMBED_STD,
    _write_json,
)
from prunert.adapters.qwen2_5_vl import ENDOFTEXT, IM_END, IMAGE_PAD, QWEN_PROMPT_TEMPLATE, VISION_END, VISION_START  # noqa: F401
from prunert.adapters.qwen2_5_vl.host import QWEN_CHAT_TEMPLATE
from prunert.adapters.qwen2_5_vl.tokenizer_builder import VIDEO_PAD, build_tokenizer, num_trained_tokens
from prunert.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

SYNTHETIC_FORMAT_VERSION = 1  # bump when the files written for an unchanged preset change
BICUBIC = 3

CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE  # the checkpoint ships Qwen2.5-VL's template (the host's default, one copy)


@dataclass(frozen=True)
class QwenSyntheticPreset:
    """Shapes of a synthetic Qwen2.5-VL: windowed ViT + merger, Qwen2 decoder with M-RoPE."""

    # vision tower
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int
    # Qwen2 decoder
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    max_position_embeddings: int
    mrope_section: tuple[int, int, int]
    # image processor: pixel-count range of smart_resize
    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        vision_head_dim, rem = divmod(self.vision_hidden, self.vision_heads)
        if rem or vision_head_dim % 4:
            raise ConfigError(f"preset vision head dim {self.vision_hidden}/{self.vision_heads}: expected an int divisible by 4")
        text_head_dim, rem = divmod(self.text_hidden, self.text_heads)
        if rem or self.text_heads % self.text_kv_heads:
            raise ConfigError(f"preset text heads {self.text_heads}/{self.text_kv_heads} do not divide hidden {self.text_hidden}")
        if sum(self.mrope_section) * 2 != text_head_dim:
            raise ConfigError(f"preset mrope_section {self.mrope_section}: expected sum == head_dim / 2 = {text_head_dim // 2}")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(f"preset window_size {self.window_size}: expected a multiple of patch * merge")
        if not all(0 <= i < self.vision_layers for i in self.fullatt_block_indexes):
            raise ConfigError(f"preset fullatt_block_indexes {self.fullatt_block_indexes}: out of range")

    @property
    def factor(self) -> int:
        return self.patch_size * self.spatial_merge_size

    @property
    def max_visual_tokens(self) -> int:
        """Merged tokens of the largest image the preprocessor produces (max_pixels / factor^2)."""
        return self.max_pixels // self.factor**2


PRESETS: dict[str, QwenSyntheticPreset] = {
    "qwen2.5-vl-tiny": QwenSyntheticPreset(
        vision_hidden=64, vision_layers=4, vision_heads=4, vision_intermediate=128,
        fullatt_block_indexes=(1, 3), window_size=56,  # windows of 2x2 merged tokens (4x4 patches)
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128,
        vocab_size=1024, max_position_embeddings=2048, mrope_section=(2, 3, 3),
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,  # 4..64 visual tokens (224 x 224 -> 8 x 8)
        seed=0, description="tiny Qwen2.5-VL for tests: window + full attention, <= 64 visual tokens",
    ),
    "qwen2.5-vl-shaped": QwenSyntheticPreset(
        # Qwen2.5-VL-3B's vision tower; Qwen2.5-0.5B's decoder (tied embeddings, 151936 ids)
        vision_hidden=1280, vision_layers=32, vision_heads=16, vision_intermediate=3420,
        fullatt_block_indexes=(7, 15, 23, 31), window_size=112,
        text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate=4864,
        vocab_size=151936, max_position_embeddings=32768, mrope_section=(8, 12, 12),
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 576,  # <= 576 visual tokens (672 x 672 -> 24 x 24)
        seed=0, description="Qwen2.5-VL-3B vision tower (0.67B) + Qwen2.5-0.5B-shaped decoder (0.49B)",
    ),
}


def get_preset(name: str) -> QwenSyntheticPreset:
    """The preset called `name`, or ModelSourceError listing the available ones."""
    return llava_synthetic.preset_named(PRESETS, name)


def build_config(preset: QwenSyntheticPreset, tokenizer: Tokenizer) -> Qwen2_5_VLConfig:
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.token_to_id(token) for token in (ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)}
    vision = {
        "depth": preset.vision_layers, "hidden_size": preset.vision_hidden, "num_heads": preset.vision_heads,
        "intermediate_size": preset.vision_intermediate, "out_hidden_size": preset.text_hidden,
        "patch_size": preset.patch_size, "spatial_merge_size": preset.spatial_merge_size,
        "temporal_patch_size": preset.temporal_patch_size, "window_size": preset.window_size,
        "fullatt_block_indexes": list(preset.fullatt_block_indexes), "tokens_per_second": preset.tokens_per_second,
        "hidden_act": "silu", "in_channels": 3,
    }
    text = {
        "hidden_size": preset.text_hidden, "num_hidden_layers": preset.text_layers,
        "num_attention_heads": preset.text_heads, "num_key_value_heads": preset.text_kv_heads,
        "intermediate_size": preset.text_intermediate, "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_position_embeddings, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": list(preset.mrope_section), "rope_theta": preset.rope_theta},
        "bos_token_id": ids[ENDOFTEXT], "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": preset.tie_word_embeddings, "use_sliding_window": False,
    }
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text,
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=preset.tie_word_embeddings,
    )


def build_model(preset: QwenSyntheticPreset, tokenizer: Tokenizer | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """A float32 Qwen2_5_VLForConditionalGeneration in eval mode with seeded weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer(preset.vocab_size)
    config = build_config(preset, tokenizer)
    model, _ = llava_synthetic.seeded_model(Qwen2_5_VLForConditionalGeneration, config, preset.seed, num_trained_tokens(tokenizer))
    return model.eval()


def parameter_counts(preset: QwenSyntheticPreset) -> dict[str, int]:
    """Parameters per part, from a model built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config(preset, build_tokenizer(preset.vocab_size))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    unique = {id(p): (name, p.numel()) for name, p in model.named_parameters(remove_duplicate=True)}
    vision = sum(n for name, n in unique.values() if ".visual." in f".{name}")
    total = sum(n for _, n in unique.values())
    return {"vision": vision, "decoder": total - vision, "total": total}


def write_checkpoint(preset_name: str, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write preset `preset_name` as a complete Hugging Face Qwen2.5-VL directory at `out_dir` (atomically)."""
    preset = get_preset(preset_name)
    return publish_directory(out_dir, lambda directory: _write_files(preset_name, preset, directory), overwrite=overwrite)


def _write_files(preset_name: str, preset: QwenSyntheticPreset, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(preset.vocab_size)
    model = build_model(preset, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(preset))
    _write_json(directory / "preprocessor_config.json", preprocessor_config(preset))
    _write_json(directory / MARKER_FILE, _marker(preset_name, preset))


def synthetic_checkpoint(preset_name: str, cache_dir: Path | None = None) -> Path:
    """Directory of preset `preset_name` (`<cache>/synthetic/<name>-<hash>`), written on first use."""
    return llava_synthetic.cached_checkpoint(preset_name, preset_hash(get_preset(preset_name)), cache_dir, write_checkpoint)


def preset_hash(preset: QwenSyntheticPreset) -> str:
    shapes = {k: v for k, v in asdict(preset).items() if k != "description"}
    scales = [LINEAR_GAIN, TOKEN_EMBED_STD, LM_HEAD_GAIN, FILLER_LM_HEAD_SCALE]
    key = {
        "family": "qwen2_5_vl", "preset": shapes, "scales": scales, "prunert": prunert.__version__,
        "format": [SYNTHETIC_FORMAT_VERSION, llava_synthetic.SYNTHETIC_FORMAT_VERSION],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _tokenizer_config(preset: QwenSyntheticPreset) -> dict[str, Any]:
    # PreTrainedTokenizerFast takes tokenizer.json as is (no BOS: Qwen adds none).
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "extra_special_tokens": {"image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
                                 "vision_bos_token": VISION_START, "vision_eos_token": VISION_END},
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.max_position_embeddings,
        "padding_side": "left",
    }


def preprocessor_config(preset: QwenSyntheticPreset) -> dict[str, Any]:
    """Qwen2VLImageProcessor settings of Qwen2.5-VL, with the preset's pixel range."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": preset.min_pixels, "longest_edge": preset.max_pixels},
        "min_pixels": preset.min_pixels,
        "max_pixels": preset.max_pixels,
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_IMAGE_MEAN),
        "image_std": list(CLIP_IMAGE_STD),
        "patch_size": preset.patch_size,
        "temporal_patch_size": preset.temporal_patch_size,
        "merge_size": preset.spatial_merge_size,
    }


def _marker(preset_name: str, preset: QwenSyntheticPreset) -> dict[str, Any]:
    return {
        "preset": preset_name,
        "family": "qwen2_5_vl",
        "seed": preset.seed,
        "synthetic": True,
        "note": "seeded random weights; not a trained model",
        "prunert_version": prunert.__version__,
        "format_version": SYNTHETIC_FORMAT_VERSION,
    }
