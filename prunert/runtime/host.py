"""The runtime half of a family adapter (numpy only): the base class every family's host adapter subclasses.

The runtime builds one host per artifact, `HostAdapter(manifest.family_config, manifest.budget.num_visual_tokens)`,
from the class the adapter registry names for the manifest's family (`prunert.adapters.host_adapter_class`).
A family overrides the three abstract methods and only the optional hooks it needs; generic code calls every
hook unconditionally (the defaults below are what a family without the quirk gets).

What the host returns from `vision_inputs` is its own: the runtime feeds the vision graph the entries named
like the graph's inputs and hands the whole dict back to the host (`kept_valid`, `visual_token_counts`,
`SpliceLayout.host_outputs`), so data only the host needs again (Qwen2.5-VL's image_grid_thw) never passes
through generic code by name.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from prunert.errors import ArtifactError, ConfigError


@dataclass(frozen=True)
class SpliceLayout:
    """What the host may need, beyond the mask, for the position ids of a spliced batch.

    input_ids:    [B, L] int64, the spliced token ids: each image placeholder repeated once per kept visual
                  token, left-padded with the pad id where attention_mask is 0. A row with several images
                  has one such run per image, in the order of its images.
    kept_indices: per image, the kept indices (ascending) of the tokens spliced in, images in order over the
                  batch (row 0's images, then row 1's, ...; one per row when every prompt has one image); images
                  may keep different counts. None when only visual tokens were given.
    host_outputs: the host's own `vision_inputs` results, one per vision-graph call, in image order (one
                  dict for a batched call, one per image with `one_image_per_vision_call`); empty when
                  only visual tokens were given.
    """

    input_ids: np.ndarray
    kept_indices: Sequence[np.ndarray] | None = None
    host_outputs: tuple[Mapping[str, np.ndarray], ...] = ()


class HostAdapter(ABC):
    """The data-dependent work that stays outside the engines: images -> vision-graph inputs, and the position
    ids of the spliced sequence. Bound to one artifact's settings.

    family_config:      the manifest's family_config (the adapter's own settings, opaque to generic code).
    num_visual_tokens:  the manifest's budget.num_visual_tokens (N before pruning, per image).
    """

    # The vision graph has no batch axis: its inputs are one image's, its text inputs and outputs have batch 1
    # (images of a batch have different patch counts). The runtime then calls it once per image.
    one_image_per_vision_call: bool = False
    # The most images one prompt may hold (one placeholder each, each image pruned to the artifact's own K); None: no
    # limit but the decoder's max_sequence. Default 1: a family takes several where its model is used with several
    # (LLaVA-NeXT, Qwen2.5-VL); LLaVA-1.5 was trained with one image per conversation and refuses a second.
    max_images_per_prompt: int | None = 1

    def __init__(self, family_config: Mapping[str, Any], num_visual_tokens: int):
        self.family_config = dict(family_config)
        self.num_visual_tokens = int(num_visual_tokens)

    @abstractmethod
    def vision_inputs(self, images: Sequence[Any], preprocessor_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """RGB PIL images (one with `one_image_per_vision_call`) -> the vision graph's inputs except the text
        ones, plus any data of the host's own that it needs again (entries the graph does not take)."""

    @abstractmethod
    def position_ids(self, attention_mask: np.ndarray, layout: SpliceLayout) -> np.ndarray:
        """Prefill position ids of a left-padded spliced sequence: attention_mask [B, L] -> [B, L], or the
        family's layout ([*leading, B, L], e.g. [3, B, L] for M-RoPE)."""

    @abstractmethod
    def next_position_ids(self, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Positions of the first decode step after a prefill ([B, 1], or [*leading, B, 1]); each later step adds 1."""

    def kept_valid(self, vision_inputs: Mapping[str, np.ndarray], kept_indices: np.ndarray) -> np.ndarray:
        """Which kept slots hold a real token: kept_indices [B, K] -> bool [B, K]. Default: every slot (a family
        with a static layout of masked slots, LLaVA-NeXT's tiles, says which are padding; the splice drops them)."""
        return np.ones(np.shape(kept_indices), bool)  # [B, K]

    def visual_token_counts(self, vision_inputs: Mapping[str, np.ndarray], num_images: int) -> np.ndarray:
        """Each image's own N (visual tokens before pruning), int64 [num_images]. Default: the manifest's N."""
        return np.full(num_images, self.num_visual_tokens, np.int64)  # [B]

    def default_chat_template(self) -> str:
        """The family's documented chat template (Jinja, Hugging Face's conventions: `messages` with content parts,
        `add_generation_prompt`), rendered where the checkpoint has none of its own (prunert.runtime.chat). It renders
        an {"type": "image"} part as the manifest's image placeholder, where the family's chat format puts the image.
        Default: none (an ArtifactError)."""
        raise ArtifactError(f"{type(self).__name__}: the artifact has no chat template of its own and its family declares no default")

    def model_view(self, image: Any, preprocessor_config: Mapping[str, Any]) -> Any:
        """The RGB PIL image the model sees (resized and cropped, not normalised), for `prunert visualize`.
        Default: none (a ConfigError: the family has no single view of an image)."""
        raise ConfigError(f"visualize: {type(self).__name__} has no single model view of an image")
