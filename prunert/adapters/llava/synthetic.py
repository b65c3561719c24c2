"""Synthetic LLaVA-1.5 checkpoints: seeded random weights written as real Hugging Face directories.

A synthetic checkpoint has the same files and layout as a downloaded `llava-hf/llava-1.5-7b-hf`
directory (config.json, model.safetensors, tokenizer files, preprocessor_config.json), so tests and
demos load it through the very same loader as a real model. Nothing is downloaded: the tokenizer is
trained locally (`tokenizer_builder`) and the weights come from a seeded generator.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import prunert
from prunert.adapters import MARKER_FILE  # the marker every synthetic checkpoint carries
from prunert.adapters.llava.tokenizer_builder import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    build_tokenizer,
    num_trained_tokens,
)
from prunert.errors import ConfigError, ModelSourceError
from prunert.staged_dir import publish_directory

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlavaConfig, LlavaForConditionalGeneration

# The LLaVA-1.5 conversation template; `prompt` holds the `<image>` placeholder, e.g.
# LLAVA_PROMPT_TEMPLATE.format(prompt="<image>\nWhat is in the picture?").
from prunert.adapters.llava import LLAVA_PROMPT_TEMPLATE  # noqa: E402,F401  (re-exported)

# Bump when the weights or files written for an unchanged preset change: it invalidates caches.
SYNTHETIC_FORMAT_VERSION = 1
CACHE_ENV_VAR = "PRUNERT_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/prunert")

# OpenAI CLIP pixel statistics, as in every llava-hf preprocessor_config.json.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC, the "resample" value of CLIPImageProcessor

# --- Initialisation scales -------------------------------------------------------------------
# HF's default init (std 0.02 everywhere) gives a model whose activations shrink layer by layer:
# attention is uniform, the image barely moves the output and next-token logits are so flat that
# greedy decoding is decided by float rounding. Instead every scale below keeps activations O(1).
# Linear weights ~ N(0, gain^2 / fan_in): variance preserving, so q.k/sqrt(d) has std ~1
# (attention is peaked but not one-hot) and every residual branch adds an O(1) update.
LINEAR_GAIN = 1.0
# Token embeddings at the RMS of a normalised activation, comparable to projected image features.
TOKEN_EMBED_STD = 1.0
# Final RMSNorm output has RMS 1, so logits over the vocabulary have std ~LM_HEAD_GAIN: the top-1
# vs top-2 margin is then ~0.5 for a 1k vocabulary, far above fp32/ONNX rounding noise.
LM_HEAD_GAIN = 2.0
# LM-head rows of `<extra_i>` filler ids (vocabulary padding beyond the trained BPE tokens; ~31k
# of the 32064 ids of llava-1.5-shaped) are shrunk so that greedy decoding mostly picks trained
# tokens and demos print words. At 0.5 filler logits have std ~1, their max over 31k ids (~4.5)
# stays below the max over the ~1.2k trained ids (~7), and the std over the vocab stays ~1.
FILLER_LM_HEAD_SCALE = 0.5
# Vision tower: position embeddings large enough that patches of a flat image still differ, and a
# CLS embedding at unit scale like the patch embeddings (conv weights use LINEAR_GAIN / fan_in).
VISION_POSITION_STD = 0.5
VISION_CLASS_STD = 1.0


@dataclass(frozen=True)
class SyntheticPreset:
    """Shapes of a synthetic LLaVA-1.5 model: CLIP vision tower, 2-layer projector, Llama decoder."""

    # CLIP vision tower
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    # Llama decoder
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_intermediate: int
    vocab_size: int
    max_position_embeddings: int
    seed: int = 0
    description: str = ""
    # How LLaVA reads the tower (LlavaConfig): "clip" (a [CLS] token first) or "siglip" (patches only); the
    # feature layer; "default" drops the tower's first token (CLIP's [CLS]), "full" keeps every token.
    vision_tower: str = "clip"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"preset image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_layers < 3:
            raise ConfigError(f"preset vision_layers: got {self.vision_layers}, expected >= 3 (LLaVA reads layer -2)")
        if self.text_heads % self.text_kv_heads:
            raise ConfigError(f"preset text_heads {self.text_heads} is not a multiple of kv heads {self.text_kv_heads}")
        if self.vision_tower not in VISION_TOWERS:
            raise ConfigError(f"preset vision_tower: got {self.vision_tower!r}, expected one of {sorted(VISION_TOWERS)}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"preset vision_feature_select_strategy: got {self.vision_feature_select_strategy!r}, "
                              "expected 'default' or 'full'")

    @property
    def num_patches(self) -> int:
        """Patches per image, (image_size / patch_size)^2: the visual tokens of the "default" strategy on CLIP."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_cls_token(self) -> bool:
        return self.vision_tower == "clip"

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image: the tower's tokens (patches, + [CLS] on CLIP), less the first one with "default"."""
        return self.num_patches + int(self.has_cls_token) - int(self.vision_feature_select_strategy == "default")


VISION_TOWERS = ("clip", "siglip")
# Fields added after the first presets: left out of preset_hash at these values, so older presets keep their hash.
_HASH_NEUTRAL = {"vision_tower": "clip", "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


_TINY = SyntheticPreset(
    vision_hidden=64, vision_layers=3, vision_heads=4, vision_intermediate=128,
    image_size=140, patch_size=14,
    text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_head_dim=16,
    text_intermediate=128, vocab_size=1024, max_position_embeddings=1024,
    seed=0, description="tiny LLaVA-1.5 for tests: 100 visual tokens, 0.36M parameters",
)

PRESETS: dict[str, SyntheticPreset] = {
    "llava-tiny": _TINY,
    "llava-1.5-shaped": SyntheticPreset(
        vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
        image_size=336, patch_size=14,
        text_hidden=1024, text_layers=24, text_heads=16, text_kv_heads=16, text_head_dim=64,
        text_intermediate=4096, vocab_size=32064, max_position_embeddings=4096,
        seed=0, description="CLIP ViT-L/14-336 tower (576 visual tokens) + 0.47B Llama decoder",
    ),
    # The two tower layouts LLaVA-1.5's default hides (llava-tiny's shapes at 224/14, reading the last layer):
    # every token of a CLIP tower kept, the [CLS] row first (N = 1 + 256), and a SigLIP tower, no [CLS] (N = 256).
    "llava-tiny-full": replace(
        _TINY, image_size=224, vision_feature_layer=-1, vision_feature_select_strategy="full",
        description="tiny LLaVA for tests: CLIP 224/14, strategy 'full', layer -1: 257 visual tokens ([CLS] kept)",
    ),
    "llava-tiny-siglip": replace(
        _TINY, image_size=224, vision_tower="siglip", vision_feature_layer=-1, vision_feature_select_strategy="full",
        description="tiny LLaVA for tests: SigLIP 224/14 tower (no [CLS]), strategy 'full', layer -1: 256 visual tokens",
    ),
    # Trained here (prunert.shapes), not drawn from a seed: a demonstration on generated shapes, not a general VLM.
    "llava-shapes": SyntheticPreset(
        vision_hidden=96, vision_layers=4, vision_heads=4, vision_intermediate=192,
        image_size=168, patch_size=14,
        text_hidden=128, text_layers=3, text_heads=4, text_kv_heads=4, text_head_dim=32,
        text_intermediate=256, vocab_size=1024, max_position_embeddings=512,
        seed=0, vision_feature_layer=-1,
        description="LLaVA-1.5 architecture trained here on generated shapes scenes: CLIP 168/14 (144 visual "
                    "tokens), 3-layer Llama decoder; a demonstration model, not a general VLM",
    ),
}
# Presets whose weights are trained rather than seeded: name -> module with recipe_hash() and
# write_checkpoint(name, out_dir, overwrite=False) (the cache key and the writer).
TRAINED_PRESETS = {"llava-shapes": "prunert.shapes.checkpoint"}


def get_preset(name: str) -> SyntheticPreset:
    """The preset called `name`, or ModelSourceError listing the available ones."""
    return preset_named(PRESETS, name)


def preset_named(presets: dict[str, Any], name: str) -> Any:
    """presets[name], or ModelSourceError listing the available ones (every family's get_preset)."""
    try:
        return presets[name]
    except KeyError:
        raise ModelSourceError(f"unknown synthetic preset {name!r}; available: {', '.join(sorted(presets))}") from None


def parameter_counts(preset: SyntheticPreset) -> dict[str, int]:
    """Parameter counts per part, computed from the shapes alone (nothing is built)."""
    v, t = preset.vision_hidden, preset.text_hidden
    vision_layer = 4 * (v * v + v) + 2 * v * preset.vision_intermediate + preset.vision_intermediate + v + 4 * v
    cls = int(preset.has_cls_token)  # CLIP: class embedding, a position for it, pre-layernorm, bias-free conv
    vision = (
        cls * v  # class embedding
        + 3 * preset.patch_size**2 * v + (1 - cls) * v  # patch conv (SigLIP's has a bias)
        + (preset.num_patches + cls) * v  # position embedding
        + (1 + cls) * 2 * v  # (pre and) post layernorm
        + preset.vision_layers * vision_layer
    )
    projector = v * t + t + t * t + t
    q_out, kv_out = preset.text_heads * preset.text_head_dim, preset.text_kv_heads * preset.text_head_dim
    text_layer = t * q_out + 2 * t * kv_out + q_out * t + 3 * t * preset.text_intermediate + 2 * t
    embeddings = preset.vocab_size * t
    decoder = embeddings + preset.text_layers * text_layer + t + embeddings  # + final norm + lm_head
    return {"vision": vision, "projector": projector, "decoder": decoder, "total": vision + projector + decoder}


def build_config(preset: SyntheticPreset, tokenizer: Tokenizer) -> LlavaConfig:
    """The LlavaConfig of `preset`; special-token ids are read from `tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    shapes = {"hidden_size": preset.vision_hidden, "num_hidden_layers": preset.vision_layers, "num_attention_heads": preset.vision_heads,
              "intermediate_size": preset.vision_intermediate, "image_size": preset.image_size, "patch_size": preset.patch_size}
    if preset.has_cls_token:
        vision = CLIPVisionConfig(**shapes, projection_dim=preset.vision_hidden)
    else:  # SigLIP without its pooling head (LLaVA reads hidden states only)
        vision = SiglipVisionConfig(**shapes, vision_use_head=False)
    text = LlamaConfig(
        hidden_size=preset.text_hidden,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        head_dim=preset.text_head_dim,
        intermediate_size=preset.text_intermediate,
        vocab_size=preset.vocab_size,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-5,  # Llama-2 / Vicuna-1.5, as in LLaVA-1.5
        bos_token_id=tokenizer.token_to_id(BOS_TOKEN),
        eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.token_to_id(IMAGE_TOKEN),
        image_seq_length=preset.num_visual_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=preset.vision_feature_layer,
        vision_feature_select_strategy=preset.vision_feature_select_strategy,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )


def build_model(preset: SyntheticPreset, tokenizer: Tokenizer | None = None) -> LlavaForConditionalGeneration:
    """A float32 LlavaForConditionalGeneration in eval mode with seeded weights (bit-reproducible)."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer(preset.vocab_size)
    model, _ = seeded_model(LlavaForConditionalGeneration, build_config(preset, tokenizer), preset.seed, num_trained_tokens(tokenizer))
    return model.eval()


def seeded_model(model_class: Any, config: Any, seed: int, first_filler_id: int, init_view: Any = None) -> tuple[Any, Any]:
    """`model_class(config)` in float32 with every parameter drawn by `_init_weights` from a generator seeded with
    `seed` (bit-reproducible; the caller's RNG untouched) -> (model, that generator, for parameters the caller
    initialises itself). init_view(model): what `_init_weights` walks (default: the model), for a family with
    a parameter outside any module (LLaVA-NeXT's image_newline). Shared by every family's synthetic presets."""
    import torch

    with torch.random.fork_rng(devices=[]):  # HF's own init must not touch the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _init_weights(model if init_view is None else init_view(model), generator, first_filler_id)
    return model, generator


def _init_weights(model: torch.nn.Module, generator: torch.Generator, first_filler_id: int) -> None:
    """Overwrite every parameter with the scales documented at the top of this module (Conv3d: Qwen2.5-VL's
    patch embedding; tied embeddings end with the LM-head scale, lm_head coming last)."""
    import torch

    initialised: set[int] = set()

    def normal(param: torch.Tensor, std: float) -> None:
        param.normal_(0.0, std, generator=generator)
        initialised.add(id(param))

    def fill(param: torch.Tensor | None, value: float) -> None:
        if param is not None:
            param.fill_(value)
            initialised.add(id(param))

    for name, module in model.named_modules():
        if name == "lm_head":
            normal(module.weight, LM_HEAD_GAIN / module.in_features ** 0.5)  # [vocab, text_hidden]
            module.weight[first_filler_id:] *= FILLER_LM_HEAD_SCALE
        elif isinstance(module, torch.nn.Linear):
            normal(module.weight, LINEAR_GAIN / module.in_features ** 0.5)
            fill(module.bias, 0.0)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):  # patch embedding [hidden, 3, (T,) patch, patch]
            normal(module.weight, LINEAR_GAIN / module.weight[0].numel() ** 0.5)
            fill(module.bias, 0.0)
        elif isinstance(module, torch.nn.Embedding):
            normal(module.weight, VISION_POSITION_STD if "vision_tower" in name else TOKEN_EMBED_STD)
        elif isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            fill(module.weight, 1.0)
            fill(getattr(module, "bias", None), 0.0)
        if hasattr(module, "class_embedding"):  # CLIPVisionEmbeddings [vision_hidden]
            normal(module.class_embedding, VISION_CLASS_STD)

    missed = [name for name, param in model.named_parameters() if id(param) not in initialised]
    if missed:
        raise RuntimeError(f"synthetic init does not cover parameters: {missed[:5]}")


def write_checkpoint(preset_name: str, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write preset `preset_name` as a complete Hugging Face LLaVA-1.5 directory at `out_dir`.

    The directory is built next to `out_dir` and renamed into place at the end, so a crash leaves
    nothing at `out_dir`. An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    preset = get_preset(preset_name)
    if preset_name in TRAINED_PRESETS:
        return importlib.import_module(TRAINED_PRESETS[preset_name]).write_checkpoint(preset_name, out_dir, overwrite=overwrite)
    return publish_directory(out_dir, lambda directory: _write_files(preset_name, preset, directory), overwrite=overwrite)


def _write_files(preset_name: str, preset: SyntheticPreset, directory: Path) -> None:
    """Model, tokenizer, image-processor and marker files of one checkpoint."""
    tokenizer = build_tokenizer(preset.vocab_size)
    save_checkpoint(directory, preset, build_model(preset, tokenizer), tokenizer, _marker(preset_name, preset))


def save_checkpoint(directory: Path, preset: SyntheticPreset, model: Any, tokenizer: Tokenizer, marker: dict[str, Any]) -> None:
    """Write `model` with its tokenizer, processor configs and marker as a llava-hf directory (also the trained
    shapes preset's writer)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in logs and CLI output
    # transformers 5 always writes model.safetensors (no pickle); the key names are the legacy ones
    # of llava-hf checkpoints ("language_model.model.layers...") via save_original_format.
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(preset))
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())
    _write_json(directory / "preprocessor_config.json", _preprocessor_config(preset))
    _write_json(directory / "processor_config.json", _processor_config(preset))
    _write_json(directory / MARKER_FILE, marker)


def synthetic_checkpoint(preset_name: str, cache_dir: Path | None = None) -> Path:
    """Directory of preset `preset_name`, written on first use and reused afterwards.

    Location: `<cache_dir>/<name>-<hash>`; without `cache_dir`, `$PRUNERT_CACHE/synthetic/...` or
    `~/.cache/prunert/synthetic/...`; `<hash>` is `preset_hash(preset)`.
    """
    preset = get_preset(preset_name)
    if preset_name in TRAINED_PRESETS:
        digest = importlib.import_module(TRAINED_PRESETS[preset_name]).recipe_hash()
    else:
        digest = preset_hash(preset)
    return cached_checkpoint(preset_name, digest, cache_dir, write_checkpoint)


def cached_checkpoint(preset_name: str, digest: str, cache_dir: Path | None, write: Callable[[str, Path], Path]) -> Path:
    """Every family's synthetic_checkpoint: `<cache_dir>/<name>-<digest>`, written with write(name, dir)
    on first use (cache_dir None: `$PRUNERT_CACHE/synthetic` or `~/.cache/prunert/synthetic`)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_ROOT).expanduser() / "synthetic"
    out_dir = Path(cache_dir).expanduser() / f"{preset_name}-{digest}"
    if (out_dir / MARKER_FILE).is_file():
        return out_dir
    try:
        return write(preset_name, out_dir)
    except (ConfigError, OSError):
        if (out_dir / MARKER_FILE).is_file():  # another process won the race to write it
            return out_dir
        raise


def preset_hash(preset: SyntheticPreset) -> str:
    """Short hash of the preset's shapes, the init scales, prunert's version and the format version."""
    shapes = {k: v for k, v in asdict(preset).items() if k != "description" and _HASH_NEUTRAL.get(k, ()) != v}
    scales = [LINEAR_GAIN, TOKEN_EMBED_STD, LM_HEAD_GAIN, FILLER_LM_HEAD_SCALE, VISION_POSITION_STD, VISION_CLASS_STD]
    key = {"preset": shapes, "scales": scales, "prunert": prunert.__version__, "format": SYNTHETIC_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _tokenizer_config(preset: SyntheticPreset) -> dict[str, Any]:
    # PreTrainedTokenizerFast loads tokenizer.json as is; "LlamaTokenizer" would, in transformers 5,
    # rebuild a sentencepiece-style (Metaspace) pipeline around our byte-level vocabulary.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.max_position_embeddings,
        "padding_side": "left",
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IMAGE_TOKEN],
    }


def _preprocessor_config(preset: SyntheticPreset) -> dict[str, Any]:
    """CLIPImageProcessor settings of LLaVA-1.5, at the preset's image size; a SigLIP tower's own processor
    (SiglipImageProcessor: a plain resize to the square, no crop, mean and std 0.5)."""
    if not preset.has_cls_token:
        return {
            "image_processor_type": "SiglipImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": preset.image_size, "width": preset.image_size},
            "resample": BICUBIC,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": preset.image_size},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": preset.image_size, "width": preset.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_IMAGE_MEAN),
        "image_std": list(CLIP_IMAGE_STD),
    }


def _processor_config(preset: SyntheticPreset) -> dict[str, Any]:
    """LlavaProcessor settings, so that `AutoProcessor` expands `<image>` to num_visual_tokens tokens."""
    return {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": preset.patch_size,
        "num_additional_image_tokens": int(preset.has_cls_token),  # the CLS token ("default" drops the first token)
        "vision_feature_select_strategy": preset.vision_feature_select_strategy,
    }


def _marker(preset_name: str, preset: SyntheticPreset) -> dict[str, Any]:
    return {
        "preset": preset_name,
        "seed": preset.seed,
        "synthetic": True,
        "note": "seeded random weights; not a trained model",
        "prunert_version": prunert.__version__,
        "format_version": SYNTHETIC_FORMAT_VERSION,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
