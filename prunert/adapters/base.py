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
  fit_budget(budget) -> None   checks K against the visual tokens the checkpoint's images can give and
      adapts the adapter to it, at export and at parity (default: budget.validate_against(num_visual_tokens);
      Qwen2.5-VL: N varies per image, so min_pixels is raised until every image gives at least K tokens).
  one_image_per_vision_call: bool   the vision graph has no batch axis: its inputs are one image's, its
      text inputs and outputs have batch 1 (Qwen2.5-VL: images of a batch have different patch counts).
      The host adapter carries the same attribute; the runtime then calls the vision graph once per image.
  vision_dim_ranges() -> {dim: (min, opt, max)}   ranges of the vision inputs' own symbolic dims (Qwen:
      "patches", "merged"), recorded in the manifest's graph spec (`dim_ranges`): TensorRT profiles use them
      and the runtime checks inputs against them.
  decoder_module() -> torch.nn.Module   the decoder graph module (default: graphs.DecoderGraph(adapter)).
  position_ids_leading_dims: tuple[int, ...]   static dims of position_ids before [batch, sequence]
      (default (): [B, S]; Qwen2.5-VL's M-RoPE: (3,), position_ids [3, B, S]).
  hf_position_ids(token_ids, images, model_dir, kept_indices) -> (position_ids, rope_deltas)   parity: Hugging
      Face's own position ids of the pruned prompt (prefill [..., 1, L]) and the delta of decode positions
      (step at cache length c: c + rope_deltas). Without it parity runs HF with its default positions.

The HostAdapter module may export `host_adapter(family_config)` instead of relying on `HOST_ADAPTER`
alone: the runtime then binds the host to the manifest's family_config (Qwen2.5-VL's preprocessing needs
the vision tower's settings to build the graph inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class SpliceLayout:
    """What the host may need, beyond the mask, for the position ids of a spliced batch.

    input_ids:    [B, L] int64, the spliced token ids: each image placeholder repeated K times (one id per
                  kept visual token), left-padded with the pad id where attention_mask is 0.
    kept_indices: per row, the kept indices (ascending) of the tokens spliced in ([B, K] int64, or a list of
                  B arrays when rows keep different counts), or None if not known.
    image_info:   host outputs that are not vision-graph inputs, stacked over the batch's images
                  (Qwen2.5-VL: "image_grid_thw" [B, 3]); empty for LLaVA.
    """

    input_ids: Any
    kept_indices: Any = None
    image_info: dict[str, Any] = field(default_factory=dict)


class HostAdapter(Protocol):
    def vision_inputs(self, images: Sequence[Any], preprocessor_config: dict[str, Any]) -> dict[str, Any]:
        """PIL images -> numpy vision-graph inputs except the text ones. Entries that are not inputs of the
        vision graph are image layout the host needs again for position ids (SpliceLayout.image_info)."""

    def position_ids(self, attention_mask: Any, family_config: dict[str, Any], layout: SpliceLayout | None = None) -> Any:
        """Prefill position ids of a left-padded spliced sequence: attention_mask [B, L] -> [B, L] (LLaVA)
        or the family's layout ([3, B, L] for M-RoPE)."""

    def next_position_ids(self, position_ids: Any, attention_mask: Any) -> Any:
        """Positions of the first decode step after a prefill ([B, 1] or [3, B, 1]); each later step adds 1."""

    # optional: kept_valid(vision_inputs, kept_indices [B, K]) -> bool [B, K], the kept slots that hold a real
    # token (a static layout with masked slots, LLaVA-NeXT's tiles); the splice drops the others.
    # optional: visual_token_counts(vision_inputs) -> int64 [B], each image's own N where it varies per image
    # (default: the manifest's budget.num_visual_tokens).
