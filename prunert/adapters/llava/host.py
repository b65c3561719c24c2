"""LLaVA-1.5 host side (numpy): CLIP preprocessing and 1-D positions of the spliced sequence."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from prunert.runtime.image import ImagePreprocessConfig, preprocess


class LlavaHostAdapter:
    def vision_inputs(self, images: Sequence[Any], preprocessor_config: dict[str, Any]) -> dict[str, np.ndarray]:
        cfg = ImagePreprocessConfig.from_hf_dict(preprocessor_config)
        return {"pixel_values": preprocess(images, cfg)}  # [B, 3, H, W]

    def position_ids(self, attention_mask: np.ndarray, family_config: dict[str, Any], layout: Any = None) -> np.ndarray:
        # Kept visual tokens take consecutive positions in the spliced sequence, as in the reference.
        return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)  # [B, L]

    def next_position_ids(self, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return position_ids[:, -1:] + 1  # [B, 1]: the last prefill position + 1 (left padding: the last is valid)


HOST_ADAPTER = LlavaHostAdapter()
