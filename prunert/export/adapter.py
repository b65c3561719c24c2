"""The export half of a family adapter (torch, workstation): the base class every family's export adapter subclasses.

It loads the checkpoint and exposes the pieces generic export and parity code compose: visual tokens before
pruning, the text backbone and LM head, the embedding table, the Hugging Face reference path. A family
overrides the abstract methods and only the optional hooks it needs; generic code calls every hook
unconditionally (the defaults below are what a family without the quirk gets).

The registry (prunert.adapters.export_adapter_class) names each family's subclass; it is constructed with
the checkpoint directory.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch

from prunert.config import BudgetConfig, PixelRange
from prunert.errors import ConfigError
from prunert.export.fused_decoder import RopeSpec
from prunert.export.graphs import DecoderGraph, Selection

PREPROCESSOR_CONFIG = "preprocessor_config.json"


class ExportAdapter(ABC):
    family: str
    architecture: str
    model: Any  # the Hugging Face model, eval mode, in the export dtype (fp32 unless `export --dtype fp16`)
    num_visual_tokens: int  # N before pruning, per image (the largest, where it varies per image)
    vision_input_names: tuple[str, ...]

    # The vision graph has no batch axis: its inputs are one image's, its text inputs and outputs have batch 1
    # (Qwen2.5-VL: images of a batch have different patch counts). The host adapter carries the same attribute.
    one_image_per_vision_call: bool = False
    # N's symbolic dim where N varies per image (Qwen2.5-VL: "merged"): the K dim of the unpruned graph's outputs.
    visual_token_dim: str | None = None
    # Static dims of position_ids before [batch, sequence]: () gives [B, S]; Qwen2.5-VL's M-RoPE (3,): [3, B, S].
    position_ids_leading_dims: tuple[int, ...] = ()
    # The vision tower puts a [CLS] token first (CLIP), so methods whose MethodSpec.needs_cls apply
    # (pruning_ops.check_applies); SigLIP and Qwen2.5-VL's tower have none.
    has_cls_token: bool = False

    # ---- required -----------------------------------------------------------------------------
    @abstractmethod
    def vision_features(self, *vision_inputs: torch.Tensor, extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Vision-graph inputs -> {"tokens": visual tokens in LLM input space [B, N, D] (before pruning)}
        plus the extras a selection method needs ("cls_attention" [B, N], "patch_keys" [B, N, Dv])."""

    @abstractmethod
    def example_vision_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Export examples (batch >= 2) in the order of vision_input_names."""

    @abstractmethod
    def vision_dynamic_shapes(self, batch_dim: Any) -> tuple[dict[int, Any], ...]:
        """torch.export dynamic-shape specs of the vision inputs, in order."""

    @abstractmethod
    def vision_input_specs(self) -> list[tuple[str, str, tuple]]:
        """(name, dtype, shape with symbolic dims) of each vision input, for the manifest."""

    @abstractmethod
    def text_backbone(self) -> Any:
        """The decoder without its LM head (takes inputs_embeds, returns last_hidden_state)."""

    @abstractmethod
    def lm_head(self) -> Any:
        """hidden states [B, S, D] -> logits [B, S, V]."""

    @abstractmethod
    def embedding_table(self) -> Any:
        """The LLM's input-embedding weight [vocab, hidden]."""

    @abstractmethod
    def text_info(self, model_dir: Path) -> dict[str, Any]:
        """image_token, image_placeholder, image_token_id, bos/eos/pad ids and the prompt template."""

    @abstractmethod
    def family_config(self) -> dict[str, Any]:
        """Opaque settings the host adapter needs at run time (stored in the manifest)."""

    @abstractmethod
    def hf_vision_inputs(self, images: list[Any], model_dir: Path) -> dict[str, torch.Tensor]:
        """Parity: Hugging Face's own image processor, as torch tensors named and laid out like the
        vision-graph inputs (every name of vision_input_names)."""

    @abstractmethod
    def hf_token_ids(self, text: str, model_dir: Path) -> list[int]:
        """Parity: Hugging Face's tokenizer on the templated prompt."""

    @abstractmethod
    def hf_vision_features(self, images: list[Any], model_dir: Path, extras: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Parity's reference, independent of vision_features: Hugging Face's processor and its own
        `get_image_features` (extras from that same tower run), laid out like vision_features' output ->
        (features, valid: bool over the token slots of "tokens", False where HF has no token, e.g. LLaVA-NeXT's
        padding tiles and unpadded-away tokens, whose slots hold zeros)."""

    # ---- optional hooks, with their defaults ------------------------------------------------------
    @property
    def min_visual_tokens(self) -> int:
        """The fewest visual tokens an image gives (default: N, fixed per image)."""
        return self.num_visual_tokens

    def fit_pixel_range(self, pixels: PixelRange) -> None:
        """`export --min-pixels / --max-pixels` (and parity, with exported_pixel_range's record): the image processor's
        pixel-count range, set before fit_budget. Default: a family that resizes every image to a fixed resolution
        refuses a given range in one line (nothing given: nothing to do)."""
        if pixels.given:
            raise ConfigError(f"--min-pixels / --max-pixels: the {self.family} family resizes every image to a fixed resolution; "
                              "a pixel range applies to a dynamic-resolution image processor (Qwen2.5-VL's)")

    def exported_pixel_range(self, family_config: dict[str, Any]) -> PixelRange:
        """The pixel range an artifact was exported with, read back from its manifest's family_config (parity passes it
        to fit_pixel_range, so HF's processor sees the artifact's range). Default: PixelRange(), the checkpoint's own."""
        return PixelRange()

    def fit_budget(self, budget: BudgetConfig) -> None:
        """Check K against the visual tokens the checkpoint's images can give and adapt the adapter to it, at
        export and at parity. Default: budget.validate_against(num_visual_tokens) (Qwen2.5-VL: N varies per
        image, so min_pixels is raised until every image gives at least K tokens)."""
        budget.validate_against(self.num_visual_tokens)

    def selection_module(self, budget: BudgetConfig, family_config: dict[str, Any]) -> torch.nn.Module:
        """The selection run on vision_features' output in the vision graph and by parity's reference.
        family_config: the adapter's own at export, the manifest's at parity. Default: graphs.Selection, the
        registry's op on tokens [B, N, D] (LLaVA-NeXT: graphs.TiledSelection on [B, T, N, D] tiles)."""
        return Selection(budget)

    def decoder_module(self) -> torch.nn.Module:
        """The decoder graph module (default: graphs.DecoderGraph(self); Qwen2.5-VL: its M-RoPE wrapper)."""
        return DecoderGraph(self)

    def decoder_rope(self) -> RopeSpec:
        """The decoder's rotary embedding for the fused decoder graph (prunert.export.fused_decoder). Default: the
        text backbone's rotary module, 1-D RoPE (Qwen2.5-VL: its M-RoPE sections)."""
        rotary = self.text_backbone().rotary_emb
        return RopeSpec(inv_freq=rotary.inv_freq.detach().float().numpy(), scaling=float(rotary.attention_scaling))

    def vision_dim_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of the vision inputs' own symbolic dims (Qwen2.5-VL: "patches", "merged"), recorded in
        the manifest's graph spec (`dim_ranges`): TensorRT profiles use them, the runtime checks inputs against
        them. Default: none."""
        return {}

    def artifact_preprocessor_config(self, model_dir: Path) -> dict[str, Any]:
        """What the artifact stores as preprocessor_config.json (default: the checkpoint's settings, unchanged;
        the export then copies the checkpoint's file as it is)."""
        return json.loads((Path(model_dir) / PREPROCESSOR_CONFIG).read_text())

    def hf_position_ids(self, token_ids: list[int], images: list[Any], model_dir: Path,
                        kept_indices: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Parity: Hugging Face's own position ids of the pruned prompt (prefill [..., 1, L]) and the delta of decode
        positions (step at cache length c: c + rope_deltas). token_ids hold one image token per image of `images`, in
        order; kept_indices: each image's kept indices (a sequence of [k_i], or a tensor [images, K]). Default None:
        HF's default positions (1-D RoPE)."""
        return None
