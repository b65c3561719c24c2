"""LLaVA-1.5 export side (torch): loads a checkpoint and exposes the pieces the generic exporter uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunert.adapters.hf_loading import HFTextParts, load_hf_model
from prunert.adapters.llava import LLAVA_PROMPT_TEMPLATE
from prunert.export.adapter import ExportAdapter
from prunert.errors import ModelSourceError


class LlavaExportAdapter(HFTextParts, ExportAdapter):
    family = "llava"
    architecture = "LlavaForConditionalGeneration"
    vision_input_names = ("pixel_values",)

    def __init__(self, model_dir: Path):
        from transformers import LlavaForConditionalGeneration

        self.model = load_hf_model(LlavaForConditionalGeneration, model_dir, self.architecture)
        config = self.model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ModelSourceError(f"--model '{model_dir}': vision_feature_layer must be one layer index")
        vision = config.vision_config
        self.image_size = vision.image_size
        self.num_visual_tokens = (vision.image_size // vision.patch_size) ** 2
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"

    # --- vision -------------------------------------------------------------------------------
    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower = self.model.model.vision_tower
        return tower(pixel_values, output_hidden_states=True).hidden_states  # L+1 x [B, 1+N, Dv]

    def vision_features(self, pixel_values: torch.Tensor, extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """One tower pass -> {"tokens" [B, N, D]} plus requested extras of the feature layer:
        "cls_attention" [B, N] (head-averaged softmax(q_cls k^T / sqrt(d)), CLS column dropped) and
        "patch_keys" [B, N, Dv] (that layer's attention keys of the patches)."""
        states = self._hidden_states(pixel_values)
        features = states[self.feature_layer]  # [B, 1+N, Dv]
        out = {"tokens": self.model.model.multi_modal_projector(features[:, 1:] if self.drop_cls else features)}
        if extras:
            layer_index = self.feature_layer % len(states)  # hidden_states[i] is the output of layer i-1
            tower = self.model.model.vision_tower  # CLIPVisionModel; older transformers wrap it in .vision_model
            layer = getattr(tower, "vision_model", tower).encoder.layers[layer_index - 1]
            attn = layer.self_attn
            hidden = layer.layer_norm1(states[layer_index - 1])  # [B, 1+N, Dv]
            batch, length, _ = hidden.shape
            keys = attn.k_proj(hidden)  # [B, 1+N, Dv]
            if "cls_attention" in extras:
                query = attn.q_proj(hidden[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
                heads = keys.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1+N, hd]
                probs = torch.softmax((query @ heads.transpose(2, 3)) * attn.scale, dim=-1)  # [B, H, 1, 1+N]
                out["cls_attention"] = probs.mean(dim=1)[:, 0, 1:]  # [B, N]
            if "patch_keys" in extras:
                out["patch_keys"] = keys[:, 1:]  # [B, N, Dv]
        return out

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

    def hf_token_ids(self, text: str, model_dir: Path) -> list[int]:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]

    def family_config(self) -> dict[str, Any]:
        return {"vision_feature_layer": self.feature_layer, "image_size": self.image_size}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
EXPORT_ADAPTER = LlavaExportAdapter  # the registry's entry (prunert.adapters.export_adapter_class)
