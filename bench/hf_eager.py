"""The Hugging Face eager baseline of the benchmark (bench_vlm.py): the model class the artifact's manifest
names, the checkpoint's own processor (with the artifact's pixel settings where they differ), `generate`
with eager attention: what a user would run instead of prunert."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prunert.adapters.hf_loading import load_hf_processor as hf_processor  # noqa: F401  (bench_vlm and its tests use this name)


def pixel_overrides(checkpoint_config: dict, artifact_config: dict) -> dict:
    """Image-processor settings the artifact changed (Qwen2.5-VL: min_pixels raised so every image gives
    >= K tokens): keys of both files whose values differ. Keys only the artifact has are prunert's own."""
    return {key: value for key, value in artifact_config.items() if key in checkpoint_config and checkpoint_config[key] != value}


class HFEager:
    """The baseline a user would pick instead: transformers eager attention, its own processor, `generate`.
    The model class is the manifest's architecture; the prompt is the artifact's template around the same
    user prompt; the image processor gets the reference artifact's pixel settings where they differ."""

    def __init__(self, artifact: str | Path, checkpoint: Path, image: Path, question: str):
        import torch
        from transformers.utils import logging as hf_logging

        from prunert.manifest import load_manifest

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.set_num_threads(os.cpu_count() or 1)
        manifest = load_manifest(Path(artifact), verify_hashes=False)
        self.torch, self.directory, self.model, self.artifact = torch, checkpoint, None, Path(artifact)
        self.architecture, self.text_spec = manifest.source.architecture, manifest.text
        self.image, self.prompt = image, manifest.text.placeholder + question
        self.text = manifest.text.prompt_template.format(prompt=self.prompt)
        artifact_config = json.loads((self.artifact / manifest.image_preprocessor).read_text())
        self.overrides = pixel_overrides(json.loads((checkpoint / "preprocessor_config.json").read_text()), artifact_config)
        self.processor, self.left_out = hf_processor(checkpoint, self.overrides)

    def load(self) -> float:
        import transformers

        start = time.perf_counter()
        model_class = getattr(transformers, self.architecture)
        self.model = model_class.from_pretrained(self.directory, attn_implementation="eager", dtype=self.torch.float32).eval()
        return time.perf_counter() - start

    def inputs(self):
        from PIL import Image

        with Image.open(self.image) as image:
            return self.processor(images=image.convert("RGB"), text=self.text, return_tensors="pt")

    def request(self, count: int) -> tuple[float, float]:
        """(request wall clock, generate alone) for exactly `count` new tokens."""
        start = time.perf_counter()
        inputs = self.inputs()
        t_gen = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                      pad_token_id=self.text_spec.pad_token_id)
        end = time.perf_counter()
        assert out.shape[1] - inputs["input_ids"].shape[1] == count
        return end - start, end - t_gen

    def prompt_check(self, ort_ids: list[int]) -> dict:
        """The processor expands the image token to the image's tokens; collapsed back, the ids must equal prunert's."""
        inputs = self.inputs()
        ids, image_id = inputs["input_ids"][0].tolist(), self.text_spec.image_token_id
        collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
        layout = {k: v.tolist() for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values", "mm_token_type_ids")}
        return {"image_tokens": ids.count(image_id), "prompt_matches_ort": collapsed == list(ort_ids),
                "threads": self.torch.get_num_threads(), "checkpoint": self.directory.name, "model_class": self.architecture,
                "processor": type(self.processor).__name__, "image_processor": type(self.processor.image_processor).__name__,
                "processor_left_out": self.left_out, "pixel_settings_from": self.artifact.name, "pixel_overrides": self.overrides,
                "image_layout": layout}
