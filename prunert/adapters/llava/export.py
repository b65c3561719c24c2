"""LLaVA-1.5 export side (torch): loads a checkpoint and exposes the pieces the generic exporter uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunert.adapters.hf_loading import HFTextParts, load_hf_model
from prunert.adapters.llava import LLAVA_PROMPT_TEMPLATE
from prunert.export.adapter import ExportAdapter
from prunert.errors import ConfigError, ModelSourceError


class LlavaExportAdapter(HFTextParts, ExportAdapter):
    family = "llava"
    architecture = "LlavaForConditionalGeneration"
    vision_input_names = ("pixel_values",)

    def __init__(self, model_dir: Path, dtype: str = "fp32"):
        from transformers import LlavaForConditionalGeneration

        self.model = load_hf_model(LlavaForConditionalGeneration, model_dir, self.architecture, dtype)
        config = self.model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ModelSourceError(f"--model '{model_dir}': vision_feature_layer must be one layer index")
        vision = config.vision_config
        self.image_size = vision.image_size
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"  # HF drops the tower's first token ([CLS] on CLIP)
        # N: the tower's tokens (patches, + [CLS] where it has one), less the first with "default" ("full" keeps them all)
        self.num_visual_tokens = (vision.image_size // vision.patch_size) ** 2 + int(self.has_cls_token) - int(self.drop_cls)

    @property
    def has_cls_token(self) -> bool:
        """The tower puts a [CLS] token first (CLIP); SigLIP has none, so methods that need one do not apply."""
        return hasattr(self._vision_model().embeddings, "class_embedding")

    def _vision_model(self) -> Any:
        tower = self.model.model.vision_tower  # CLIPVisionModel / SiglipVisionModel; the transformer is .vision_model
        return getattr(tower, "vision_model", tower)

    # --- vision -------------------------------------------------------------------------------
    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower = self.model.model.vision_tower
        return tower(pixel_values, output_hidden_states=True).hidden_states  # L+1 x [B, T, Dv], T tower tokens ([CLS] first on CLIP)

    def vision_features(self, pixel_values: torch.Tensor, extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """One tower pass -> {"tokens" [B, N, D]} plus requested extras of the feature layer, over the SAME N tokens
        (tower row first + i for token i: the [CLS] row is token 0 with "full", dropped with "default"):
        "cls_attention" [B, N] (head-averaged softmax(q_cls k^T / sqrt(d)) of the layer producing the feature layer)
        and "patch_keys" [B, N, Dv] (that layer's attention keys)."""
        states = self._hidden_states(pixel_values)
        first = int(self.drop_cls)  # tower row of token 0
        features = states[self.feature_layer]  # [B, T, Dv], T = N + first tower tokens
        out = {"tokens": self.model.model.multi_modal_projector(features[:, first:])}  # [B, N, D]
        if extras:
            layer = self._feature_attention_layer(len(states))
            attn = layer.self_attn
            hidden = layer.layer_norm1(states[self.feature_layer % len(states) - 1])  # [B, T, Dv], that layer's input
            batch, length, _ = hidden.shape
            keys = attn.k_proj(hidden)  # [B, T, Dv]
            if "cls_attention" in extras:
                self._check_cls("cls_attention")
                query = attn.q_proj(hidden[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
                heads = keys.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, T, hd]
                probs = torch.softmax((query @ heads.transpose(2, 3)) * attn.scale, dim=-1)  # [B, H, 1, T]
                out["cls_attention"] = probs.mean(dim=1)[:, 0, first:]  # [B, N]
            if "patch_keys" in extras:
                out["patch_keys"] = keys[:, first:]  # [B, N, Dv]
        return out

    def _feature_attention_layer(self, num_states: int) -> Any:
        """The encoder layer whose output is the feature layer (hidden_states[i] is the output of layer i - 1)."""
        return self._vision_model().encoder.layers[self.feature_layer % num_states - 1]

    def _check_cls(self, extra: str) -> None:
        if not self.has_cls_token:
            raise ConfigError(f"vision extra {extra!r}: this {self.model.config.vision_config.model_type} tower has no [CLS] token")

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_features(pixel_values)["tokens"]  # [B, N, D]

    def cls_attention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_features(pixel_values, ("cls_attention",))["cls_attention"]  # [B, N]

    def example_vision_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, self.image_size, self.image_size, generator=generator),)

    def vision_dynamic_shapes(self, batch_dim: Any) -> tuple[dict[int, Any], ...]:
        return ({0: batch_dim},)

    def vision_input_specs(self) -> list[tuple[str, str, tuple]]:
        return [("pixel_values", "float32", ("batch", 3, self.image_size, self.image_size))]

    # --- text ---------------------------------------------------------------------------------
    def text_info(self, model_dir: Path) -> dict[str, Any]:
        config = self.model.config
        text = config.text_config
        tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
        image_token = tokenizer_config.get("image_token", "<image>")
        eos = config.text_config.eos_token_id if text.eos_token_id is not None else tokenizer_config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else text.pad_token_id
        return {
            "image_token": image_token,
            "image_placeholder": image_token,  # what a user's prompt carries: the image token itself
            "image_token_id": int(config.image_token_index),
            "bos_token_id": text.bos_token_id,
            "eos_token_ids": eos_ids,
            "pad_token_id": int(pad if pad is not None else 0),
            "prompt_template": LLAVA_PROMPT_TEMPLATE,
        }

    # --- the Hugging Face reference path, for parity ----------------------------------------------
    def hf_vision_inputs(self, images: list[Any], model_dir: Path) -> dict[str, torch.Tensor]:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir)
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}

    def hf_vision_features(self, images: list[Any], model_dir: Path, extras: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Parity's reference features, independent of vision_features: HF's processor, then HF's own
        `get_image_features` (the checkpoint's vision_feature_layer and select strategy, as HF's forward uses them)
        -> ({"tokens" [B, N, D]} + extras, valid [B, N] bool: all True). Extras come from the same HF tower run:
        "cls_attention" from its output_attentions of the layer producing the feature layer (the [CLS] query's row,
        head-averaged) and "patch_keys" from that layer's k_proj output (captured by a forward hook), both over the
        tokens HF gives the LLM (the [CLS] column too with "full")."""
        pixel_values = self.hf_vision_inputs(images, model_dir)["pixel_values"]  # [B, 3, S, S]
        captured: dict[str, torch.Tensor] = {}
        layer = self._feature_attention_layer(len(self._vision_model().encoder.layers) + 1)
        hook = layer.self_attn.k_proj.register_forward_hook(lambda module, args, output: captured.update(keys=output))
        try:
            with torch.no_grad():
                out = self.model.model.get_image_features(pixel_values, output_attentions="cls_attention" in extras)
        finally:
            hook.remove()
        tokens = torch.stack(list(out.pooler_output))  # [B, N, D]
        first = captured["keys"].shape[1] - tokens.shape[1]  # tower rows HF dropped (1 with "default")
        features = {"tokens": tokens}
        if "cls_attention" in extras:
            self._check_cls("cls_attention")
            probs = out.attentions[self.feature_layer % len(out.hidden_states) - 1]  # [B, H, T, T]
            features["cls_attention"] = probs.mean(dim=1)[:, 0, first:]  # [B, N]
        if "patch_keys" in extras:
            features["patch_keys"] = captured["keys"][:, first:]  # [B, N, Dv]
        return features, torch.ones(tokens.shape[:2], dtype=torch.bool)

    def family_config(self) -> dict[str, Any]:
        return {"vision_feature_layer": self.feature_layer, "image_size": self.image_size}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
EXPORT_ADAPTER = LlavaExportAdapter  # the registry's entry (prunert.adapters.export_adapter_class)
