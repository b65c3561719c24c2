"""Qwen2.5-VL export side (torch): loads a checkpoint and exposes the pieces the generic exporter uses.

Vision graph: ONE image per call, static shapes given the patch count P, every data-dependent piece
computed on the host (prunert.adapters.qwen2_5_vl.host; deploy-facts "How others stitch vision to
the LLM"). Inputs, in `vision_input_names` order (P = merge^2 * N patches, N merged tokens):

  pixel_values     float32 [P, C*T*p*p]  HF's patch rows permuted into WINDOW order (host.patch_permutation)
  rotary_cos/_sin  float32 [P, head_dim] 2-D vision rotary tables, window order (host.rotary_cos_sin)
  window_gather    int64   [W, L]        the padded windows of the window layers (windows.window_layout): W windows
  window_mask      int64   [W, L]        of at most L patches, each slot's patch row and whether it is one (1) or
  window_slots     int64   [P]           padding (0); each patch's slot in the flattened [W * L] layout
  reverse_index    int64   [N]           argsort(window_index): merger outputs -> raster order of the merged grid

Window blocks attend per window ([W, heads, L, L] scores: O(P * L), L = 64 patches for Qwen2.5-VL), full-attention
blocks over all P patches one head after another ([1, 1, P, P] scores live at a time): one still image is one
segment, so they need no mask.
Batching is one call per image (no batch axis, no padding): images of a batch have different P, and
padding would need a validity mask through the selection graph. Output: tokens [1, N, D] in raster order.

Decoder: QwenDecoderGraph, the flat-KV-cache wrapper of graphs.DecoderGraph with 3-D M-RoPE position ids
[3, B, S] (host.rope_index / decode_position_ids).

Generic export and parity call the hooks this class overrides (prunert.export.adapter.ExportAdapter): one_image_per_vision_call,
fit_budget (min_pixels raised so every image gives >= K merged tokens), artifact_preprocessor_config,
vision_dim_ranges ("patches" = merge^2 * "merged"), decoder_module, position_ids_leading_dims = (3,),
hf_position_ids (HF's own get_rope_index on the unpruned prompt, restricted to the kept tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.export import Dim

from prunert.adapters.hf_loading import HFTextParts, load_hf_model
from prunert.export.fused_decoder import RopeSpec
from prunert.adapters.qwen2_5_vl import IMAGE_PAD, IMAGE_PLACEHOLDER, QWEN_PROMPT_TEMPLATE, host
from prunert.adapters.qwen2_5_vl.windows import WINDOW_INPUT_NAMES, window_dim_ranges
from prunert.config import BudgetConfig, PixelRange
from prunert.errors import ConfigError, ImageError, ModelSourceError
from prunert.export.adapter import ExportAdapter
from prunert.export.graphs import DecoderGraph

VISION_INPUT_NAMES = ("pixel_values", "rotary_cos", "rotary_sin", *WINDOW_INPUT_NAMES, "reverse_index")
EXAMPLE_GRID = (1, 8, 12)  # export example: 4 x 6 merged tokens, windows cut at the grid edge


def visual_token_range(cfg: host.QwenPreprocessConfig) -> tuple[int, int]:
    """(min, max) merged tokens smart_resize can produce for images of aspect ratio <= 200 (bounds).

    min: the round and min_pixels branches reach min_pixels; the max_pixels branch floors both sides of
    a x b = max_pixels, giving at least i * floor(M / (i + 1)) tokens with i = floor(a / factor), M = max / factor^2.
    max: max_pixels, or a side clamped to one factor (extreme aspect) with the other up to sqrt(200 * pixels)
    -- 113 > 64 tokens for a 20 x 4000 image in the tiny preset's range; the min_pixels branch's ceil."""
    unit = cfg.factor**2
    limit = cfg.max_pixels / unit
    floored = min([i * math.floor(limit / (i + 1)) for i in range(1, int(limit))] + [math.floor(limit)])  # i + 1 <= M
    low = max(1, min(math.ceil(cfg.min_pixels / unit), floored))
    ratio = host.MAX_ASPECT_RATIO
    high = max(cfg.max_pixels // unit, math.isqrt(ratio * cfg.max_pixels) // cfg.factor,
               math.isqrt(ratio * cfg.min_pixels) // cfg.factor + 1, 2 * math.ceil(cfg.min_pixels / unit) + 2)
    return low, high


graph_vision_inputs = host.graph_vision_inputs  # the host's (numpy) conversion, named here for the tests


class QwenExportAdapter(HFTextParts, ExportAdapter):
    family = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"
    vision_input_names = VISION_INPUT_NAMES
    one_image_per_vision_call = True  # no batch axis in the vision graph: P differs between images
    visual_token_dim = "merged"  # N's symbolic dim: the unpruned graph's K (graphs.kept_dim)
    position_ids_leading_dims = (3,)  # M-RoPE: position_ids [3, B, S] (t, h, w)

    def __init__(self, model_dir: Path, dtype: str = "fp32"):
        from transformers import Qwen2_5_VLForConditionalGeneration

        model_dir = Path(model_dir)
        self.model = load_hf_model(Qwen2_5_VLForConditionalGeneration, model_dir, self.architecture, dtype)
        self.visual = self.model.model.visual
        vision = self.model.config.vision_config
        self.merge = vision.spatial_merge_size
        self.patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        self.vision_head_dim = vision.hidden_size // vision.num_heads
        self.full_attention = frozenset(vision.fullatt_block_indexes)
        self._family = host.family_config(self.model.config.to_dict())
        self.preprocess = host.QwenPreprocessConfig.from_hf_dict(_read_json(model_dir / "preprocessor_config.json"))
        if (self.preprocess.patch_size, self.preprocess.merge_size) != (vision.patch_size, self.merge):
            raise ModelSourceError(f"--model '{model_dir}': preprocessor patch/merge size differ from the vision config")
        self.checkpoint_preprocess = self.preprocess  # the checkpoint's own
        self.base_preprocess = self.preprocess  # its pixel range or export's --min/--max-pixels (fit_pixel_range)
        self._min_tokens, self.max_visual_tokens = visual_token_range(self.preprocess)
        self.num_visual_tokens = self.max_visual_tokens  # N varies per image; this is the largest

    @property
    def min_visual_tokens(self) -> int:
        """The fewest merged tokens an image gives with the current pixel range (fit_budget raises it)."""
        return self._min_tokens

    # --- budget -------------------------------------------------------------------------------
    def fit_pixel_range(self, pixels: PixelRange) -> None:
        """`export --min-pixels / --max-pixels`: smart_resize's pixel range in place of the checkpoint's (None keeps
        the checkpoint's value), before fit_budget raises min_pixels to K tokens. Both must allow one merged token
        (factor^2 pixels); the range is recorded in family_config ("pixel_range") and preprocessor_config.json."""
        own, unit = self.checkpoint_preprocess, self.checkpoint_preprocess.factor**2
        low = own.min_pixels if pixels.min_pixels is None else pixels.min_pixels
        high = own.max_pixels if pixels.max_pixels is None else pixels.max_pixels
        if high < unit:
            raise ConfigError(f"--max-pixels: got {high}, expected >= {unit} (one merged token, {own.factor} x {own.factor} pixels)")
        if low > high:
            which = "--min-pixels" if pixels.min_pixels is not None else "the checkpoint's min_pixels"
            bound = "--max-pixels" if pixels.max_pixels is not None else "the checkpoint's max_pixels"
            raise ConfigError(f"{which}: got {low}, expected <= {bound} {high}")
        self.base_preprocess = replace(own, min_pixels=low, max_pixels=high)
        self.preprocess = self.base_preprocess
        self._min_tokens, self.max_visual_tokens = visual_token_range(self.preprocess)
        self.num_visual_tokens = self.max_visual_tokens

    def exported_pixel_range(self, family_config: dict[str, Any]) -> PixelRange:
        """The range fit_pixel_range recorded (artifacts exported before it: the checkpoint's own)."""
        return PixelRange(**family_config.get("pixel_range", {}))

    def fit_budget(self, budget: BudgetConfig) -> None:
        """N varies per image (smart_resize), so K must not exceed the fewest merged tokens any image gives.
        min_pixels is raised to K merged tokens' worth (K * factor^2 pixels): an image that would give fewer
        tokens is upscaled, as HF upscales every image below min_pixels. The artifact's preprocessor config
        carries the raised value (artifact_preprocessor_config) and parity runs HF's processor with it.
        smart_resize's max_pixels branch (large images of extreme aspect ratio) floors both sides and can still
        give fewer tokens: a K above that floor is refused. Called at export and, with the manifest's budget,
        at parity. The unpruned baseline (--method none, K = the largest N) keeps every image's own N tokens
        (outputs [1, merged, D]) and leaves the pixel range as it is."""
        base = self.base_preprocess
        low, high = visual_token_range(base)
        if budget.keeps_all:  # every image keeps its own N: the K dim of the outputs is "merged"
            if budget.budget != high:
                raise ConfigError(f"budget: got {budget.budget} with --method {budget.method}, expected {high} (the most merged visual tokens "
                                  f"an image gives; each image keeps all of its own {low}..{high})")
            return
        largest = visual_token_range(replace(base, min_pixels=base.max_pixels))[0]  # the floor of the max_pixels branch
        if not 1 <= budget.budget <= largest:
            raise ConfigError(f"budget: got {budget.budget}, expected 1 <= budget <= {largest} (the fewest merged visual tokens an "
                              f"image can give with min_pixels raised to the budget; this checkpoint gives {low}..{high} per image)")
        self.preprocess = replace(base, min_pixels=max(base.min_pixels, budget.budget * base.factor**2))
        self._min_tokens, self.max_visual_tokens = visual_token_range(self.preprocess)
        self.num_visual_tokens = self.max_visual_tokens

    def artifact_preprocessor_config(self, model_dir: Path) -> dict[str, Any]:
        """The checkpoint's preprocessor_config.json with the pixel range of fit_budget (min_pixels >= K tokens)."""
        config = _read_json(Path(model_dir) / "preprocessor_config.json")
        config["min_pixels"], config["max_pixels"] = self.preprocess.min_pixels, self.preprocess.max_pixels
        if isinstance(config.get("size"), dict) and {"shortest_edge", "longest_edge"} & set(config["size"]):
            config["size"] = {**config["size"], "shortest_edge": self.preprocess.min_pixels, "longest_edge": self.preprocess.max_pixels}
        return config

    # --- vision -------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor,
                        window_gather: torch.Tensor, window_mask: torch.Tensor, window_slots: torch.Tensor,
                        reverse_index: torch.Tensor, extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """One image's host inputs -> {"tokens" [1, N, D]} in raster order of the merged grid, equal to
        HF's visual(...).pooler_output. Blocks, patch embedding and merger are the model's own; HF's cu_seqlens
        splits become padded windows in the window layers ([W, heads, L, L] scores, W windows of at most L
        patches: windows.window_layout) and one softmax over [P, P] per head, head after head, in the full-attention
        layers."""
        if extras:
            raise ConfigError(f"qwen2.5-vl: selection inputs {list(extras)} are not available (no [CLS] token); "
                              "use a method that needs only the tokens (resprune, divprune, cdpruner, uniform, random, none)")
        visual = self.visual
        x = visual.patch_embed(pixel_values)  # [P, Dv], window order (patch embedding is per row)
        windows, width = window_gather.shape  # W, L (symbolic)
        rows = window_gather.reshape(-1)  # [W * L] patch row of every slot
        window_cos, window_sin = rotary_cos.index_select(0, rows), rotary_sin.index_select(0, rows)  # [W * L, hd], once
        pad = (window_mask == 0)[:, None, None, :]  # [W, 1, 1, L]: padding slots are no key
        window_bias = torch.where(pad, torch.finfo(x.dtype).min, 0.0).to(x.dtype)  # [W, 1, 1, L]
        for layer, block in enumerate(visual.blocks):
            attn = block.attn
            qkv = attn.qkv(block.norm1(x))  # [P, 3 Dv]
            if layer in self.full_attention:  # one still image: one segment over all P patches, one head at a time
                out = _attention(attn, qkv, rotary_cos, rotary_sin, (1, qkv.shape[0]), None, per_head=True)  # [P, Dv]
            else:  # per window: slots gathered, attention in [W, heads, L, L], each patch's slot gathered back
                slots = _attention(attn, qkv.index_select(0, rows), window_cos, window_sin, (windows, width), window_bias)  # [W * L, Dv]
                out = slots.index_select(0, window_slots)  # [P, Dv]
            x = x + attn.proj(out)
            x = x + block.mlp(block.norm2(x))
        merged = visual.merger(x)  # [N, D], window order
        return {"tokens": merged.index_select(0, reverse_index)[None]}  # [1, N, D], raster order

    def visual_tokens(self, *vision_inputs: torch.Tensor) -> torch.Tensor:
        return self.vision_features(*vision_inputs)["tokens"]

    def example_grid(self) -> tuple[int, int, int]:
        """EXAMPLE_GRID, or (if its merged count is outside [min, max] visual tokens) a grid of at least min."""
        count = EXAMPLE_GRID[1] * EXAMPLE_GRID[2] // self.merge**2
        if self.min_visual_tokens <= count <= self.max_visual_tokens:
            return EXAMPLE_GRID
        rows = max(2, math.isqrt(self.min_visual_tokens))
        return (1, rows * self.merge, -(-self.min_visual_tokens // rows) * self.merge)

    def example_vision_inputs(self, batch: int = 1, grid: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs of one random image of `grid` (t, h, w patches; default example_grid()); `batch` is ignored:
        one image per call."""
        grid = self.example_grid() if grid is None else grid
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(int(np.prod(grid)), self.patch_dim, generator=generator).numpy()
        inputs = graph_vision_inputs(pixels, [grid], self._family)
        return tuple(torch.from_numpy(inputs[name]) for name in self.vision_input_names)

    def vision_dynamic_shapes(self, batch_dim: Any = None) -> tuple[dict[int, Any], ...]:
        """P = merge^2 * N is declared as a derived dim of N (the merger reshapes P rows into N); the window layout's
        windows and window_len are dims of their own (vision_dim_ranges bounds them)."""
        ranges = self.vision_dim_ranges()
        merged = Dim("merged", min=self.min_visual_tokens, max=self.max_visual_tokens)
        patches = self.merge**2 * merged
        layout = {0: Dim("windows", min=ranges["windows"][0], max=ranges["windows"][2]),
                  1: Dim("window_len", min=ranges["window_len"][0], max=ranges["window_len"][2])}
        return ({0: patches}, {0: patches}, {0: patches}, layout, dict(layout), {0: patches}, {0: merged})

    def vision_input_specs(self) -> list[tuple[str, str, tuple]]:
        hd, layout = self.vision_head_dim, ("windows", "window_len")
        return [("pixel_values", "float32", ("patches", self.patch_dim)), ("rotary_cos", "float32", ("patches", hd)),
                ("rotary_sin", "float32", ("patches", hd)), ("window_gather", "int64", layout), ("window_mask", "int64", layout),
                ("window_slots", "int64", ("patches",)), ("reverse_index", "int64", ("merged",))]

    def vision_dim_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of the symbolic dims: merged tokens, patches = merge^2 * merged (opt: an image at
        max_pixels), and the padded windows' count and length (windows.window_dim_ranges). Recorded in the manifest;
        TensorRT profiles use them."""
        low, high, unit = self.min_visual_tokens, self.max_visual_tokens, self.merge**2
        opt = min(high, max(low, self.preprocess.max_pixels // self.preprocess.factor**2))
        side = self._family["window_size"] // self.merge // self._family["patch_size"]  # merged tokens per window side
        return {"merged": (low, opt, high), "patches": (unit * low, unit * opt, unit * high),
                **window_dim_ranges(low, opt, high, side, unit)}

    def decoder_module(self) -> torch.nn.Module:
        return QwenDecoderGraph(self)

    def decoder_rope(self) -> RopeSpec:
        """M-RoPE: the (t, h, w) streams' frequency counts (the rotary module's mrope_section)."""
        return replace(super().decoder_rope(), sections=tuple(int(n) for n in self.text_backbone().rotary_emb.mrope_section))

    # --- text ---------------------------------------------------------------------------------
    def text_info(self, model_dir: Path) -> dict[str, Any]:
        config, text = self.model.config, self.model.config.text_config
        tokenizer_config = _read_json(Path(model_dir) / "tokenizer_config.json")
        generation = _read_json(Path(model_dir) / "generation_config.json")
        eos: list[int] = []
        for value in (text.eos_token_id, generation.get("eos_token_id")):
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if token is not None and int(token) not in eos:
                    eos.append(int(token))
        pad = text.pad_token_id if text.pad_token_id is not None else generation.get("pad_token_id")
        bos = tokenizer_config.get("bos_token")  # Qwen's tokenizer adds no BOS: null there (the config's id is unused)
        return {
            "image_token": IMAGE_PAD,
            "image_placeholder": IMAGE_PLACEHOLDER,  # what a user's prompt carries (the chat template's image part)
            "image_token_id": int(config.image_token_id),
            "bos_token_id": text.bos_token_id if bos is not None else None,
            "eos_token_ids": tuple(eos),
            "pad_token_id": int(pad if pad is not None else eos[0]),
            "prompt_template": QWEN_PROMPT_TEMPLATE,
        }

    def family_config(self) -> dict[str, Any]:
        """The host's settings, the visual-token range, and the pixel range before fit_budget's raise (exported_pixel_range)."""
        pixels = {"min_pixels": self.base_preprocess.min_pixels, "max_pixels": self.base_preprocess.max_pixels}
        return {**self._family, "min_visual_tokens": self.min_visual_tokens, "max_visual_tokens": self.max_visual_tokens,
                "pixel_range": pixels}

    # --- the Hugging Face reference path, for parity ----------------------------------------------
    def hf_image_inputs(self, images: list[Any], model_dir: Path) -> dict[str, torch.Tensor]:
        """HF's Qwen2VLImageProcessorPil: {"pixel_values" [sum P, C*T*p*p] (HF order), "image_grid_thw" [n, 3]}."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pixels = {"min_pixels": self.preprocess.min_pixels, "max_pixels": self.preprocess.max_pixels}  # fit_budget's range
        processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, **pixels)
        out = processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def hf_vision_inputs(self, images: list[Any], model_dir: Path) -> dict[str, torch.Tensor]:
        """ONE image through HF's processor, converted to the vision graph's inputs (vision_input_names order)."""
        if len(images) != 1:
            raise ImageError(f"qwen2.5-vl vision graph: one image per call, got {len(images)}")
        hf = self.hf_image_inputs(images, model_dir)
        inputs = graph_vision_inputs(hf["pixel_values"].numpy(), hf["image_grid_thw"].numpy(), self._family)
        return {name: torch.from_numpy(inputs[name]) for name in self.vision_input_names}

    def hf_vision_features(self, images: list[Any], model_dir: Path, extras: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Parity's reference: ONE image through HF's processor and HF's own get_image_features with its
        image_grid_thw -> ({"tokens" [1, N, D]}, HF's order: the merged grid's raster order), valid [1, N] all True)."""
        if extras:
            raise ConfigError(f"qwen2.5-vl: selection inputs {list(extras)} are not available (no [CLS] token)")
        if len(images) != 1:
            raise ImageError(f"qwen2.5-vl vision graph: one image per call, got {len(images)}")
        hf = self.hf_image_inputs(images, model_dir)
        with torch.no_grad():
            tokens = self.model.model.get_image_features(hf["pixel_values"], hf["image_grid_thw"]).pooler_output[0][None]  # [1, N, D]
        return {"tokens": tokens}, torch.ones(tokens.shape[:2], dtype=torch.bool)

    def hf_position_ids(self, token_ids: list[int], images: list[Any], model_dir: Path,
                        kept_indices: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Parity: HF's own M-RoPE positions of the pruned prompt. HF's get_rope_index runs on the UNPRUNED
        prompt (each image token expanded to its image's N tokens, HF's image_grid_thw of all the images, as HF's
        processor expands a prompt of several), then the columns of the pruned tokens are dropped: -> position_ids
        [3, 1, L] of text + kept tokens, and rope_deltas [1, 1] such that decode at cache length c has position
        c + rope_deltas (HF's delta shifted by the sum of N - K dropped tokens: generation continues at the unpruned
        sequence's max position + 1). kept_indices: one [k_i] per image (or a tensor [images, K])."""
        grid = self.hf_image_inputs(images, model_dir)["image_grid_thw"]  # [n, 3]
        image_id = int(self.model.config.image_token_id)
        kept = list(kept_indices.reshape(len(grid), -1)) if isinstance(kept_indices, torch.Tensor) else list(kept_indices)
        places = [at for at, token in enumerate(token_ids) if token == image_id]
        if len(places) != len(grid) or len(kept) != len(grid):
            raise ConfigError(f"hf_position_ids: {len(places)} image tokens, {len(grid)} images, {len(kept)} kept sets; expected one each")
        full, columns, last = [], [], 0  # the unpruned ids, and the columns of the pruned prompt's tokens in them
        for at, thw, keep in zip(places, grid, kept):
            columns += range(len(full), len(full) + at - last)
            full += token_ids[last:at]
            columns += (len(full) + keep.reshape(-1).long()).tolist()
            full += [image_id] * (int(thw.prod()) // self.merge**2)
            last = at + 1
        columns += range(len(full), len(full) + len(token_ids) - last)
        full += token_ids[last:]
        ids = torch.tensor([full])  # [1, L + sum(N_i - 1)]
        with torch.no_grad():
            positions, deltas = self.model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(), image_grid_thw=grid)
        return positions[:, :, torch.tensor(columns)], deltas + (len(full) - len(columns))  # [3, 1, L], [1, 1]


def _attention(attn: torch.nn.Module, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: tuple[Any, Any],
               bias: torch.Tensor | None, per_head: bool = False) -> torch.Tensor:
    """The vision attention of one block over `groups` = (G, L) sequences of L rows: qkv [G * L, 3 Dv] (the block's
    qkv projection), cos/sin [G * L, hd] -> [G * L, Dv] (before the output projection); bias [G, 1, 1, L] or None.
    per_head: one head after another (the full-attention layers: one head's [1, 1, P, P] scores live at a time instead
    of all heads' [1, heads, P, P], 1.1 GB instead of 17 GB at P = 16,384 with 16 heads; the same arithmetic)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward

    q, k, v = qkv.reshape(qkv.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [G * L, heads, hd]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(*groups, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [G, heads, L, hd]
    heads = [slice(h, h + 1) for h in range(attn.num_heads)] if per_head else [slice(None)]
    outs = [eager_attention_forward(attn, q[:, h], k[:, h], v[:, h], bias, scaling=attn.scaling)[0] for h in heads]  # [G, L, h, hd]
    return torch.cat(outs, dim=2).reshape(qkv.shape[0], -1) if per_head else outs[0].reshape(qkv.shape[0], -1)  # [G * L, Dv]


class QwenVisionGraph(torch.nn.Module):
    """The vision graph without selection: host inputs -> tokens [1, N, D]."""

    def __init__(self, adapter: QwenExportAdapter):
        super().__init__()
        self.adapter = adapter
        self.visual = adapter.visual  # registered so export sees the parameters

    def forward(self, pixel_values, rotary_cos, rotary_sin, window_gather, window_mask, window_slots, reverse_index):
        inputs = (pixel_values, rotary_cos, rotary_sin, window_gather, window_mask, window_slots, reverse_index)
        return self.adapter.vision_features(*inputs)["tokens"]  # [1, N, D]


class QwenDecoderGraph(DecoderGraph):
    """graphs.DecoderGraph with M-RoPE: position_ids [3, B, S] (t, h, w), passed to the text model as is."""

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ConfigError(f"qwen2.5-vl decoder: position_ids must be [3, B, S], got {tuple(position_ids.shape)}")
        return super().forward(inputs_embeds, attention_mask, position_ids, past)


# ---- standalone spec of the bare vision graph (the adapter tests export it; prunert export uses graphs.* + the hooks) ----
def vision_features_export_spec(adapter: QwenExportAdapter):
    """(example args, dynamic_shapes, input specs, output specs) of QwenVisionGraph."""
    hidden = adapter.model.config.text_config.hidden_size
    return (adapter.example_vision_inputs(), adapter.vision_dynamic_shapes(), adapter.vision_input_specs(),
            [("visual_tokens", "float32", (1, "merged", hidden))])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


EXPORT_ADAPTER = QwenExportAdapter  # the registry's entry (prunert.adapters.export_adapter_class)
