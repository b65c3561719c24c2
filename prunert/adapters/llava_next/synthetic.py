"""Synthetic LLaVA-NeXT checkpoints: seeded random weights written as real Hugging Face directories.

Same files and layout as a downloaded `llava-hf/llava-v1.6-vicuna-7b-hf` directory (config.json for
`LlavaNextConfig`, model.safetensors, tokenizer files, preprocessor_config.json for
`LlavaNextImageProcessor` with `image_grid_pinpoints`, processor_config.json for
`LlavaNextProcessor`). Everything except the LLaVA-NeXT specifics is LLaVA-1.5's synthetic
machinery (`prunert.adapters.llava.synthetic`): tokenizer, init scales, cache, atomic publishing.

preprocessor_config.json also carries "patch_size" (the vision tower's), which HF ignores and the
host reads to build `token_mask` (see `prunert.adapters.llava_next`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunert.staged_dir import publish_directory
from prunert.adapters.llava import synthetic as llava_synthetic
from prunert.adapters.llava.synthetic import (
    BICUBIC,
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    MARKER_FILE,
    TOKEN_EMBED_STD,
    SyntheticPreset,
    _special_tokens_map,
    _tokenizer_config,
    _write_json,
    build_tokenizer,
    num_trained_tokens,
)
from prunert.adapters.llava_next import LLAVA_NEXT_PROMPT_TEMPLATE  # noqa: F401  (re-exported)
from prunert.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

FAMILY = "llava_next"
# Bump when the files written for an unchanged LLaVA-NeXT preset change (on top of LLaVA-1.5's
# SYNTHETIC_FORMAT_VERSION, which `preset_hash` also covers): it invalidates caches.
NEXT_FORMAT_VERSION = 1
# `image_newline` is added to the LLM input like a projected visual token: unit scale, as the
# token embeddings (the other parameters use LLaVA-1.5's scales).
IMAGE_NEWLINE_STD = TOKEN_EMBED_STD


@dataclass(frozen=True)
class LlavaNextPreset(SyntheticPreset):
    """A LLaVA-1.5 preset (`SyntheticPreset`: CLIP tower, projector, Llama) plus any-res pinpoints.

    image_size is the tile side S; each tile gives `num_patches` = (S / patch)^2 visual tokens.
    """

    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.image_grid_pinpoints:
            raise ConfigError("preset image_grid_pinpoints: empty, expected (height, width) resolutions")
        for height, width in self.image_grid_pinpoints:
            if height < self.image_size or width < self.image_size or height % self.image_size or width % self.image_size:
                raise ConfigError(f"preset pinpoint ({height}, {width}) is not a multiple of image_size {self.image_size}")

    @property
    def max_tiles(self) -> int:
        """T: the thumbnail plus the most tiles any pinpoint gives."""
        return 1 + max((h // self.image_size) * (w // self.image_size) for h, w in self.image_grid_pinpoints)

    @property
    def max_visual_tokens(self) -> int:
        """T * N patch tokens before unpadding (no image_newline)."""
        return self.max_tiles * self.num_patches


def _tiny_pinpoints(s: int) -> tuple[tuple[int, int], ...]:
    return ((s, 2 * s), (2 * s, s), (2 * s, 2 * s))


LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

PRESETS: dict[str, LlavaNextPreset] = {
    "llava-next-tiny": LlavaNextPreset(
        vision_hidden=64, vision_layers=3, vision_heads=4, vision_intermediate=128,
        image_size=56, patch_size=14,
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_head_dim=16,
        text_intermediate=128, vocab_size=1024, max_position_embeddings=1024,
        seed=0, image_grid_pinpoints=_tiny_pinpoints(56),
        description="tiny LLaVA-NeXT for tests: 56 px tiles of 16 tokens, up to 1 + 4 tiles, 0.3M parameters",
    ),
    "llava-next-shaped": LlavaNextPreset(
        vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
        image_size=336, patch_size=14,
        text_hidden=1024, text_layers=24, text_heads=16, text_kv_heads=16, text_head_dim=64,
        text_intermediate=4096, vocab_size=32064, max_position_embeddings=4096,
        seed=0, image_grid_pinpoints=LLAVA_V16_PINPOINTS,
        description="CLIP ViT-L/14-336 tower on llava-v1.6 tiles (up to 5 x 576 tokens) + 0.47B Llama decoder",
    ),
}


def get_preset(name: str) -> LlavaNextPreset:
    """The preset called `name`, or ModelSourceError listing the available ones."""
    return llava_synthetic.preset_named(PRESETS, name)


def parameter_counts(preset: LlavaNextPreset) -> dict[str, int]:
    """Parameter counts per part from the shapes alone: LLaVA-1.5's plus the image_newline vector."""
    counts = llava_synthetic.parameter_counts(preset)
    counts["image_newline"] = preset.text_hidden
    counts["total"] += preset.text_hidden
    return counts


def build_config(preset: LlavaNextPreset, tokenizer: Tokenizer) -> LlavaNextConfig:
    """The LlavaNextConfig of `preset`: LLaVA-1.5's vision and text configs plus the pinpoints."""
    from transformers import LlavaNextConfig

    llava = llava_synthetic.build_config(preset, tokenizer)
    return LlavaNextConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=llava.image_token_index,
        image_seq_length=preset.num_patches,  # tokens per tile (HF's default 576 is ViT-L/14-336's)
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[list(p) for p in preset.image_grid_pinpoints],
        pad_token_id=llava.pad_token_id,
        tie_word_embeddings=False,
    )


class _WithoutNewline:
    """The model as LLaVA-1.5's `_init_weights` sees it: every module, every parameter but
    `model.image_newline` (a bare nn.Parameter, no module), which `build_model` initialises itself."""

    def __init__(self, model: Any):
        self._model = model

    def named_modules(self):
        return self._model.named_modules()

    def named_parameters(self):
        return ((n, p) for n, p in self._model.named_parameters() if n != "model.image_newline")


def build_model(preset: LlavaNextPreset, tokenizer: Tokenizer | None = None) -> LlavaNextForConditionalGeneration:
    """A float32 LlavaNextForConditionalGeneration in eval mode with seeded weights (bit-reproducible)."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer(preset.vocab_size)
    config = build_config(preset, tokenizer)
    model, generator = llava_synthetic.seeded_model(LlavaNextForConditionalGeneration, config, preset.seed,
                                                    num_trained_tokens(tokenizer), init_view=_WithoutNewline)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, IMAGE_NEWLINE_STD, generator=generator)
    return model.eval()


def write_checkpoint(preset_name: str, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write preset `preset_name` as a complete Hugging Face LLaVA-NeXT directory at `out_dir`.

    Built next to `out_dir` and renamed into place at the end (a crash leaves nothing at `out_dir`).
    An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    preset = get_preset(preset_name)
    return publish_directory(out_dir, lambda directory: _write_files(preset_name, preset, directory), overwrite=overwrite)


def _write_files(preset_name: str, preset: LlavaNextPreset, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(preset.vocab_size)
    model = build_model(preset, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(preset))
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())
    _write_json(directory / "preprocessor_config.json", preprocessor_config(preset))
    _write_json(directory / "processor_config.json", _processor_config(preset))
    _write_json(directory / MARKER_FILE, _marker(preset_name, preset))


def synthetic_checkpoint(preset_name: str, cache_dir: Path | None = None) -> Path:
    """Directory of preset `preset_name`, written on first use and reused afterwards.

    Location: `<cache_dir>/<name>-<hash>`; without `cache_dir`, `$PRUNERT_CACHE/synthetic/...` or
    `~/.cache/prunert/synthetic/...` (the LLaVA-1.5 presets' cache).
    """
    return llava_synthetic.cached_checkpoint(preset_name, preset_hash(get_preset(preset_name)), cache_dir, write_checkpoint)


def preset_hash(preset: LlavaNextPreset) -> str:
    """LLaVA-1.5's hash (shapes incl. pinpoints, init scales, prunert and format versions) + ours."""
    key = {"llava": llava_synthetic.preset_hash(preset), "family": FAMILY, "format": NEXT_FORMAT_VERSION,
           "image_newline_std": IMAGE_NEWLINE_STD}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def preprocessor_config(preset: LlavaNextPreset) -> dict[str, Any]:
    """LlavaNextImageProcessor settings (as llava-v1.6) at the preset's tile size, plus "patch_size"."""
    s = preset.image_size
    return {
        "image_processor_type": "LlavaNextImageProcessor",
        "processor_class": "LlavaNextProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": s},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_IMAGE_MEAN),
        "image_std": list(CLIP_IMAGE_STD),
        "do_pad": True,
        "image_grid_pinpoints": [list(p) for p in preset.image_grid_pinpoints],
        "patch_size": preset.patch_size,  # prunert's: the host's token_mask needs it; HF ignores it
    }


def _processor_config(preset: LlavaNextPreset) -> dict[str, Any]:
    """LlavaNextProcessor settings (LLaVA-1.5's, another class), so that `AutoProcessor` expands `<image>` to HF's feature count."""
    return {**llava_synthetic._processor_config(preset), "processor_class": "LlavaNextProcessor"}


def _marker(preset_name: str, preset: LlavaNextPreset) -> dict[str, Any]:
    marker = llava_synthetic._marker(preset_name, preset)
    marker.update(family=FAMILY, next_format_version=NEXT_FORMAT_VERSION)
    return marker
