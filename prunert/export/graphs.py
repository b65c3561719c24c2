"""The two exported graphs as torch modules, with their dynamic axes declared in one place.

vision:  <the adapter's vision inputs>, text_embeds, text_mask -> visual_tokens [B, K, D], kept_indices [B, K]
         (LLaVA-1.5: pixel_values; LLaVA-NeXT: pixel_values, tile_mask, token_mask). An adapter with
         `one_image_per_vision_call` (Qwen2.5-VL) has no batch axis: its own inputs are one image's (its
         symbolic dims, e.g. patches / merged), B = 1 for text_embeds, text_mask and the outputs.
decoder: inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
         -> logits, present.{i}.key/value     (common Optimum / onnxruntime-genai names)
         position_ids [B, S], or [*position_ids_leading_dims, B, S] (Qwen2.5-VL M-RoPE: [3, B, S])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.export import Dim

from prunert import pruning_ops
from prunert.config import SELECTION_SCOPE, BudgetConfig, ExportConfig, TileBudgetConfig

if TYPE_CHECKING:
    from prunert.export.adapter import ExportAdapter


class Selection(torch.nn.Module):
    """The selection op as a submodule, so every node it exports carries the SELECTION_SCOPE name scope
    (precision conversion and quantization keep that region in fp32 by finding it)."""

    def __init__(self, budget: BudgetConfig):
        super().__init__()
        self.budget = budget

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pruning_ops.select(inputs, self.budget)  # [B, K, D], [B, K]


class TiledSelection(torch.nn.Module):
    """Per-tile selection over any-resolution tiles (prunert.pruning_ops.tiled): HERO-style budgets per
    tile, the method inside each tile. Features: tokens [B, T, N, D], tile_cls [B, T, Dv], tile_mask
    [B, T], token_mask [B, T, N]. A method without per-tile support is a ConfigError here."""

    def __init__(self, budget: BudgetConfig, tiles: TileBudgetConfig, num_tiles: int, tokens_per_tile: int):
        super().__init__()
        from prunert.pruning_ops import tiled

        tiled.check_tiled_budget(budget, num_tiles, tokens_per_tile)
        self.budget, self.tiles = budget, tiles

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from prunert.pruning_ops import tiled

        return tiled.tiled_select(inputs, self.budget, self.tiles)  # [B, K, D], [B, K]


def selection_module(adapter: ExportAdapter, budget: BudgetConfig, family_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The selection the vision graph (and parity's reference) runs on the adapter's features: the adapter's
    `selection_module(budget, family_config)` (default: the plain Selection). family_config: the manifest's
    (parity), or the adapter's own at export."""
    return adapter.selection_module(budget, adapter.family_config() if family_config is None else family_config)


class VisionPruneGraph(torch.nn.Module):
    """Vision tower + projector + static-budget selection."""

    def __init__(self, adapter: ExportAdapter, budget: BudgetConfig):
        super().__init__()
        self.adapter = adapter
        self.budget = budget
        self.tower = adapter.model  # registered so export sees the parameters
        self.add_module(SELECTION_SCOPE, selection_module(adapter, budget))  # the submodule's name is the nodes' name scope

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *vision_inputs, text_embeds, text_mask = inputs
        needs = pruning_ops.method_spec(self.budget.method).needs
        weights = weights_dtype(self)  # export --dtype fp16: the tower computes in fp16 behind float32 inputs
        vision_inputs = [value.to(weights) if value.is_floating_point() else value for value in vision_inputs]
        features = self.adapter.vision_features(*vision_inputs, extras=needs)  # tokens [B, N, D] (or [B, T, N, D]) + extras
        features = {name: value.float() if value.is_floating_point() else value for name, value in features.items()}
        select = self.get_submodule(SELECTION_SCOPE)  # fp32 at every export dtype: its decisions are precision-sensitive
        return select({**features, "text": text_embeds, "text_mask": text_mask})  # [B, K, D], [B, K]


def weights_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (the export dtype it was loaded in); float32 without any."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class DecoderGraph(torch.nn.Module):
    """Decoder + LM head with a flat KV cache: past_key_values.{i}.key/value [B, kv_heads, past, head_dim]."""

    def __init__(self, adapter: ExportAdapter):
        super().__init__()
        self.backbone = adapter.text_backbone()
        self.head = adapter.lm_head()
        self.num_layers = self.backbone.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers import DynamicCache

        weights = weights_dtype(self)  # export --dtype fp16: fp16 compute behind the float32 graph I/O
        inputs_embeds, past = inputs_embeds.to(weights), tuple(value.to(weights) for value in past)
        cache = DynamicCache(config=self.backbone.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.backbone(
            inputs_embeds=inputs_embeds,  # [B, S, D]
            attention_mask=attention_mask,  # [B, past + S]
            position_ids=position_ids,  # [B, S] (M-RoPE: [3, B, S])
            past_key_values=cache,
            use_cache=True,
        )
        logits = self.head(out.last_hidden_state)  # [B, S, V]
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]  # [B, kv_heads, past + S, head_dim]
        return (logits.float(), *(value.float() for value in present))  # float32 I/O at every export dtype


def decoder_module(adapter: ExportAdapter) -> torch.nn.Module:
    """The adapter's `decoder_module()`: DecoderGraph by default (Qwen2.5-VL: QwenDecoderGraph)."""
    return adapter.decoder_module()


def decoder_dims(adapter: ExportAdapter) -> dict[str, int]:
    config = adapter.text_backbone().config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": adapter.embedding_table().shape[0],
    }


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


# ---- dynamic axes: the one place they are declared -------------------------------------------
def kept_dim(adapter: ExportAdapter, budget: BudgetConfig) -> int | str:
    """The K dim of the vision graph's outputs: the budget, static; for the unpruned graph (method none) of a
    family whose N varies per image, the adapter's symbolic N dim (`visual_token_dim`, e.g. "merged")."""
    symbolic = adapter.visual_token_dim
    return symbolic if budget.keeps_all and symbolic else budget.budget


def vision_export_spec(adapter: ExportAdapter, cfg: ExportConfig, budget: int | str, hidden: int):
    """(example args, dynamic_shapes, input names, output names, manifest specs). budget: kept_dim()."""
    per_image = adapter.one_image_per_vision_call
    batch = None if per_image else Dim("batch", min=1, max=cfg.max_batch)
    text = Dim("text", min=1, max=cfg.max_text_tokens)
    b, m = (1 if per_image else cfg.export_batch), 5
    rows = 1 if per_image else "batch"  # the batch dim of text inputs and outputs
    generator = torch.Generator().manual_seed(1)
    args = (
        *adapter.example_vision_inputs(b),
        torch.randn(b, m, hidden, generator=generator),
        torch.ones(b, m, dtype=torch.int64),
    )
    text_dynamic = {1: text} if per_image else {0: batch, 1: text}
    dynamic = (*adapter.vision_dynamic_shapes(batch), text_dynamic, dict(text_dynamic))
    inputs = [*adapter.vision_input_specs(), ("text_embeds", "float32", (rows, "text", hidden)), ("text_mask", "int64", (rows, "text"))]
    outputs = [("visual_tokens", "float32", (rows, budget, hidden)), ("kept_indices", "int64", (rows, budget))]
    return args, {"inputs": dynamic}, inputs, outputs  # forward(*inputs): varargs specs nest in one tuple


def decoder_export_spec(dims: dict[str, int], cfg: ExportConfig, budget: int, position_leading: tuple[int, ...] = ()):
    """position_leading: static dims of position_ids before [batch, sequence] (the adapter's
    position_ids_leading_dims; M-RoPE: (3,))."""
    longest = cfg.max_sequence(budget)
    batch = Dim("batch", min=1, max=cfg.max_batch)
    seq = Dim("sequence", min=1, max=longest)
    past = Dim("past", min=0, max=longest)
    total = Dim("total", min=1, max=longest)  # past + sequence: declared on its own (derived dims can't be)
    b, s, p = cfg.export_batch, 5, 3
    layers, heads, head_dim, hidden = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], dims["hidden_size"]
    generator = torch.Generator().manual_seed(2)
    past_example = tuple(torch.randn(b, heads, p, head_dim, generator=generator) for _ in range(2 * layers))
    args = (
        torch.randn(b, s, hidden, generator=generator),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s).repeat(*position_leading, b, 1),
        past_example,
    )
    lead = len(position_leading)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {lead: batch, lead + 1: seq}, tuple({0: batch, 2: past} for _ in past_example))
    kv_shape = ("batch", heads, "past", head_dim)
    inputs = [
        ("inputs_embeds", "float32", ("batch", "sequence", hidden)),
        ("attention_mask", "int64", ("batch", "total")),
        ("position_ids", "int64", (*position_leading, "batch", "sequence")),
        *[(name, "float32", kv_shape) for name in past_names(layers)],
    ]
    outputs = [
        ("logits", "float32", ("batch", "sequence", dims["vocab_size"])),
        *[(name, "float32", ("batch", heads, "total", head_dim)) for name in present_names(layers)],
    ]
    return args, dynamic, inputs, outputs
