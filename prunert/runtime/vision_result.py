"""How a batch's prompts and their images map onto the vision graph's results (numpy only): each prompt holds one
image or several (one placeholder each, in order, or none: the chat template places them), each image is pruned to
the artifact's K on its own, and the results have one row per image, the prompts' images in order over the batch.

No torch, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from prunert.errors import PromptError
from prunert.runtime.text import ChatPrompt


def prompt_images(item: Any) -> list[Any]:
    """One prompt's images, as generate, encode_images and the serving engine take them: a list or tuple of images
    (several per prompt, in placeholder order), or one image (a path, an RGB PIL image, [H, W, 3] uint8)."""
    return list(item) if isinstance(item, (list, tuple)) else [item]


@dataclass
class VisionResult:
    """The vision graph's results, one row per image: the prompts' images in order over the batch."""

    pixel_inputs: dict[str, np.ndarray] | list[dict[str, np.ndarray]]  # host outputs: one batched call, or one dict per call
    visual_tokens: np.ndarray  # [I, K, D], I images
    kept_indices: np.ndarray  # [I, K] ascending, original positions (tiled families: tile * N + index)
    kept_valid: np.ndarray | None = None  # [I, K] bool: slots holding a real token; None = all of them
    visual_token_counts: np.ndarray | None = None  # [I] each image's own N (unpruned tokens); None = the manifest's
    images_per_prompt: tuple[int, ...] | None = None  # each prompt's image count; None: one image per prompt (rows = prompts)

    def image_rows(self, prompt: int) -> range:
        """The rows of prompt `prompt`'s images, in its placeholder order."""
        if self.images_per_prompt is None:
            return range(prompt, prompt + 1)
        start = sum(self.images_per_prompt[:prompt])
        return range(start, start + self.images_per_prompt[prompt])

    def prompt_kept(self, prompt: int) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
        """Prompt `prompt`'s images in order: each one's real kept indices [k_i] and own N."""
        rows = self.image_rows(prompt)
        return tuple(self.kept(row)[1] for row in rows), tuple(int(self.visual_token_counts[row]) for row in rows)

    @property
    def host_outputs(self) -> tuple[dict[str, np.ndarray], ...]:
        """The host's vision_inputs results, one per vision-graph call (SpliceLayout.host_outputs)."""
        return tuple(self.pixel_inputs) if isinstance(self.pixel_inputs, list) else (self.pixel_inputs,)

    def kept(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Image row `row`'s real kept tokens [k, D] and their indices [k] (k = K unless some slots are masked:
        the unpruned graph of a static tile layout, or per-image calls of different lengths, padded)."""
        if self.kept_valid is None:
            return self.visual_tokens[row], self.kept_indices[row]
        valid = self.kept_valid[row]
        return self.visual_tokens[row][valid], self.kept_indices[row][valid]


def check_image_count(prompt: str, images: int, most: int | None, family: str) -> None:
    """PromptError unless a prompt may hold `images` images: at least one, at most `most` (the host's
    max_images_per_prompt; None: any number)."""
    if images < 1:
        raise PromptError(f"prompt {prompt[:60]!r}: no image, expected at least one")
    if most is not None and images > most:
        raise PromptError(f"prompt {prompt[:60]!r}: {images} images, expected at most {most} per prompt (the {family} family "
                          f"takes {most}; for a batch, give each image its own prompt)")


def placeholder_count(prompt: str, images: int, placeholder: str) -> int:
    """How many image placeholders a prompt of `images` images holds: none, or one per image (else PromptError, one line
    naming the prompt and both counts). A ChatPrompt's template put one for each of its image parts."""
    if isinstance(prompt, ChatPrompt):
        if prompt.images != images:
            given = "1 image" if images == 1 else f"{images} images"
            raise PromptError(f"messages: {prompt.images} image parts for {given}, expected one image per image part")
        return images
    count = prompt.count(placeholder)  # Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>
    if count not in (0, images):
        given, expected = ("1 image", "at most once") if images == 1 else (f"{images} images", f"{images} times or none")
        raise PromptError(f"prompt {prompt[:60]!r}: contains the image placeholder {placeholder!r} {count} times for {given}, "
                          f"expected {expected} (once per image, in order; none: the images go where the chat template puts them)")
    return count


def stack_calls(tokens: list[np.ndarray], kept: list[np.ndarray], valid: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vision calls' outputs ([b, K_i, D], [b, K_i], [b, K_i] bool) as one batch [B, K, D], [B, K], [B, K]
    with K = max K_i: shorter calls (per-image graphs whose K is the image's own N, e.g. unpruned) are padded
    with masked slots (index -1, zero token)."""
    if len(tokens) == 1:
        return tokens[0], kept[0], valid[0]
    width = max(t.shape[1] for t in tokens)

    def pad(array: np.ndarray, value: Any) -> np.ndarray:
        widths = [(0, 0), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, widths, constant_values=value)

    return (np.concatenate([pad(t, 0.0) for t in tokens]), np.concatenate([pad(k, -1) for k in kept]),
            np.concatenate([pad(v, False) for v in valid]))
