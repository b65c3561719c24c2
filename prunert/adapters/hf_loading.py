"""Loading a Hugging Face checkpoint for export and parity, the same way for every family, and the text
parts every `*ForConditionalGeneration` exposes alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunert.errors import ModelSourceError


def load_hf_model(model_class: Any, model_dir: Path, architecture: str) -> Any:
    """model_class.from_pretrained(model_dir): safetensors only (never pickle), eager attention (attention
    maps are needed), float32, eval mode. A checkpoint that cannot load is a ModelSourceError naming it."""
    import torch
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = model_class.from_pretrained(model_dir, use_safetensors=True, attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelSourceError(f"--model '{model_dir}': cannot load as {architecture}: {exc}") from None
    return model.eval()


class HFTextParts:
    """The export adapter's text hooks for a Hugging Face `*ForConditionalGeneration` in `self.model` (its
    `model.language_model`, `lm_head` and input embeddings): shared by every family's adapter."""

    model: Any

    def text_backbone(self) -> Any:
        return self.model.model.language_model

    def lm_head(self) -> Any:
        return self.model.lm_head

    def embedding_table(self) -> Any:
        return self.model.get_input_embeddings().weight  # [V, D]
