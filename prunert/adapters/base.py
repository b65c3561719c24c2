"""The two halves of a family adapter, as protocols.

ExportAdapter (torch, workstation): loads the checkpoint and exposes the pieces generic export and
parity code composes: visual tokens before pruning, the text backbone and LM head, the embedding table.
HostAdapter (numpy, runtime): the data-dependent work that stays outside the engines: image
preprocessing into vision-graph inputs and position ids of the spliced sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence


class ExportAdapter(Protocol):
    family: str
    architecture: str
    model: Any  # the Hugging Face model, eval mode, fp32
    num_visual_tokens: int  # N before pruning, per image
    vision_input_names: tuple[str, ...]

    def vision_features(self, *vision_inputs: Any, extras: tuple[str, ...] = ()) -> dict[str, Any]:
        """Vision-graph inputs -> {"tokens": visual tokens in LLM input space [B, N, D] (before pruning)}
        plus the extras a selection method needs ("cls_attention" [B, N], "patch_keys" [B, N, Dv])."""

    def example_vision_inputs(self, batch: int) -> tuple[Any, ...]:
        """Export examples (batch >= 2) in the order of vision_input_names."""

    def vision_dynamic_shapes(self, batch_dim: Any) -> tuple[dict[int, Any], ...]:
        """torch.export dynamic-shape specs of the vision inputs, in order."""

    def vision_input_specs(self) -> list[tuple[str, str, tuple]]:
        """(name, dtype, shape with symbolic dims) of each vision input, for the manifest."""

    def text_backbone(self) -> Any:
        """The decoder without its LM head (takes inputs_embeds, returns last_hidden_state)."""

    def lm_head(self) -> Any: ...

    def embedding_table(self) -> Any:
        """The LLM's input-embedding weight [vocab, hidden]."""

    def text_info(self, model_dir: Path) -> dict[str, Any]:
        """image_token, image_token_id, bos/eos/pad ids and the prompt template."""

    def family_config(self) -> dict[str, Any]:
        """Opaque settings the host adapter needs at run time (stored in the manifest)."""


class HostAdapter(Protocol):
    def vision_inputs(self, images: Sequence[Any], preprocessor_config: dict[str, Any]) -> dict[str, Any]:
        """PIL images -> numpy vision-graph inputs except the text ones."""

    def position_ids(self, attention_mask: Any, family_config: dict[str, Any]) -> Any:
        """Prefill position ids of a left-padded spliced sequence: attention_mask [B, L] -> [B, L]."""
