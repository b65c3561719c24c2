"""The two halves of a family adapter, as protocols.

ExportAdapter (torch, workstation): loads the checkpoint and exposes the pieces generic export and
parity code composes: visual tokens before pruning, the text backbone and LM head, the embedding table.
HostAdapter (numpy, runtime): the data-dependent work that stays outside the engines: image
preprocessing into vision-graph inputs and position ids of the spliced sequence.

Optional ExportAdapter hooks (generic code calls them only where the adapter has them):
  selection_module(budget, family_config) -> torch.nn.Module   the selection run on vision_features'
      output in the vision graph and by parity's reference (default: prunert.export.graphs.Selection,
      the registry's op on tokens [B, N, D]; LLaVA-NeXT: graphs.TiledSelection on [B, T, N, D] tiles).
      family_config is the adapter's own at export and the manifest's at parity.
  artifact_preprocessor_config(model_dir) -> dict   what the artifact stores as preprocessor_config.json
      (default: the checkpoint's file, copied).
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

    def hf_vision_inputs(self, images: list[Any], model_dir: Path) -> dict[str, Any]:
        """Parity: Hugging Face's own image processor, as torch tensors named and laid out like the
        vision-graph inputs (every name of vision_input_names)."""

    def hf_token_ids(self, text: str, model_dir: Path) -> list[int]:
        """Parity: Hugging Face's tokenizer on the templated prompt."""


class HostAdapter(Protocol):
    def vision_inputs(self, images: Sequence[Any], preprocessor_config: dict[str, Any]) -> dict[str, Any]:
        """PIL images -> numpy vision-graph inputs except the text ones."""

    def position_ids(self, attention_mask: Any, family_config: dict[str, Any]) -> Any:
        """Prefill position ids of a left-padded spliced sequence: attention_mask [B, L] -> [B, L]."""
