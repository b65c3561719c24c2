"""LLaVA-NeXT export side (torch): loads a `LlavaNextForConditionalGeneration` checkpoint and exposes
the pieces the generic exporter and parity compose (see the package docstring for the design).

Vision graph inputs: pixel_values [batch, T, 3, S, S], tile_mask [batch, T], token_mask [batch, T, N]
(+ text_embeds, text_mask). The tower runs all batch * T tiles as one batch (padding tiles too: the
shapes are static), with LlavaNext's feature layer and select strategy; the projector runs on every
token; each tile's [CLS] comes from the same layer. Selection: `graphs.TiledSelection` (per-tile
budgets + ResPrune inside each tile, prunert.pruning_ops.tiled). The decoder is LLaVA-1.5's path.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunert.adapters.hf_loading import load_hf_model
from prunert.adapters.llava.export import LlavaExportAdapter
from prunert.adapters.llava_next import LLAVA_NEXT_PROMPT_TEMPLATE
from prunert.config import BudgetConfig, TileBudgetConfig
from prunert.errors import ConfigError, ModelSourceError

EXAMPLE_PADDING_TILES = 2  # export example row 1: this many padding tiles at the end


class LlavaNextExportAdapter(LlavaExportAdapter):
    family = "llava_next"
    architecture = "LlavaNextForConditionalGeneration"
    vision_input_names = ("pixel_values", "tile_mask", "token_mask")

    def __init__(self, model_dir: Path, dtype: str = "fp32", tile_budgets: TileBudgetConfig = TileBudgetConfig()):
        from transformers import LlavaNextForConditionalGeneration

        self.model = load_hf_model(LlavaNextForConditionalGeneration, model_dir, self.architecture, dtype)
        config = self.model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ModelSourceError(f"--model '{model_dir}': vision_feature_layer must be one layer index")
        if config.vision_feature_select_strategy != "default":
            raise ModelSourceError(
                f"--model '{model_dir}': vision_feature_select_strategy {config.vision_feature_select_strategy!r}, "
                f"expected 'default' (CLS dropped: a tile's tokens form its patch grid)"
            )
        vision = config.vision_config
        self.image_size = vision.image_size  # S, the tile side
        self.patch_size = vision.patch_size
        self.tokens_per_tile = (vision.image_size // vision.patch_size) ** 2  # N
        self.max_tiles = 1 + max((h // self.image_size) * (w // self.image_size) for h, w in config.image_grid_pinpoints)  # T
        self.num_visual_tokens = self.max_tiles * self.tokens_per_tile  # T * N, the static layout
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = True
        self.tile_budgets = tile_budgets

    # --- vision -------------------------------------------------------------------------------
    def vision_features(
        self, pixel_values: torch.Tensor, tile_mask: torch.Tensor, token_mask: torch.Tensor, extras: tuple[str, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """pixel_values [B, T, 3, S, S] -> {"tokens" [B, T, N, D], "tile_cls" [B, T, Dv]} plus the masks
        [B, T], [B, T, N] passed through for the selection."""
        if extras:
            raise ConfigError(f"vision extras {list(extras)}: not available for per-tile selection")
        t, n = self.max_tiles, self.tokens_per_tile
        states = self._hidden_states(pixel_values.flatten(0, 1))  # L+1 x [B*T, 1+N, Dv]
        features = states[self.feature_layer]  # [B*T, 1+N, Dv]
        tokens = self.model.model.multi_modal_projector(features[:, 1:])  # [B*T, N, D]
        return {
            "tokens": tokens.reshape(-1, t, n, tokens.shape[-1]),  # [B, T, N, D]
            "tile_cls": features[:, 0].reshape(-1, t, features.shape[-1]),  # [B, T, Dv]
            "tile_mask": tile_mask,  # [B, T]
            "token_mask": token_mask,  # [B, T, N]
        }

    def selection_module(self, budget: BudgetConfig, family_config: dict[str, Any]) -> torch.nn.Module:
        """Per-tile budgets + the method inside each tile, with the tile-budget settings recorded in
        family_config (the manifest's at parity)."""
        from prunert.export.graphs import TiledSelection

        tiles = TileBudgetConfig(**family_config.get("tile_budgets", asdict(self.tile_budgets)))
        return TiledSelection(budget, tiles, self.max_tiles, self.tokens_per_tile)

    def example_vision_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Row 0: every tile real and fully valid; odd rows: the last EXAMPLE_PADDING_TILES tiles padding
        and the outer token columns of the real tiles unpadded away."""
        t, n, s = self.max_tiles, self.tokens_per_tile, self.image_size
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch, t, 3, s, s, generator=generator)  # [B, T, 3, S, S]
        tile_mask = torch.ones(batch, t, dtype=torch.int64)  # [B, T]
        token_mask = torch.ones(batch, t, n, dtype=torch.int64)  # [B, T, N]
        grid = int(round(n**0.5))
        real = max(t - EXAMPLE_PADDING_TILES, 1)
        for b in range(1, batch, 2):
            pixels[b, real:] = 0.0
            tile_mask[b, real:] = 0
            token_mask[b, real:] = 0
            token_mask[b, 1:real].view(-1, grid, grid)[:, :, 0] = 0  # first column of each real tile
        return pixels, tile_mask, token_mask

    def vision_dynamic_shapes(self, batch_dim: Any) -> tuple[dict[int, Any], ...]:
        return ({0: batch_dim}, {0: batch_dim}, {0: batch_dim})

    def vision_input_specs(self) -> list[tuple[str, str, tuple]]:
        t, n, s = self.max_tiles, self.tokens_per_tile, self.image_size
        return [
            ("pixel_values", "float32", ("batch", t, 3, s, s)),
            ("tile_mask", "int64", ("batch", t)),
            ("token_mask", "int64", ("batch", t, n)),
        ]

    # --- text ---------------------------------------------------------------------------------
    def text_info(self, model_dir: Path) -> dict[str, Any]:
        return {**super().text_info(model_dir), "prompt_template": LLAVA_NEXT_PROMPT_TEMPLATE}

    def artifact_preprocessor_config(self, model_dir: Path) -> dict[str, Any]:
        """The checkpoint's preprocessor_config.json plus "patch_size" (the host's token_mask needs it;
        HF keeps it elsewhere and ignores it here)."""
        config = json.loads((model_dir / "preprocessor_config.json").read_text())
        config.setdefault("patch_size", self.patch_size)
        return config

    # --- the Hugging Face reference path, for parity ----------------------------------------------
    def hf_vision_inputs(self, images: list[Any], model_dir: Path) -> dict[str, torch.Tensor]:
        """HF's LlavaNextImageProcessorPil, laid out as the vision graph's inputs: its tiles padded to T,
        tile_mask from HF's `image_size_to_num_patches`, token_mask from HF's own `unpad_image`."""
        from transformers.models.llava_next import modeling_llava_next as hf
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        processor = LlavaNextImageProcessorPil.from_pretrained(model_dir)
        out = processor(images=images, return_tensors="pt")
        pinpoints, s, t, n = self.model.config.image_grid_pinpoints, self.image_size, self.max_tiles, self.tokens_per_tile
        pixels = torch.zeros(len(images), t, 3, s, s)  # [B, T, 3, S, S]
        tile_mask = torch.zeros(len(images), t, dtype=torch.int64)  # [B, T]
        token_mask = torch.zeros(len(images), t, n, dtype=torch.int64)  # [B, T, N]
        for b, size in enumerate(out["image_sizes"].tolist()):
            count = hf.image_size_to_num_patches(size, pinpoints, s)
            pixels[b, :count] = out["pixel_values"][b, :count]
            tile_mask[b, :count] = 1
            token_mask[b, 0] = 1
            token_mask[b, 1:count] = torch.from_numpy(_hf_unpad_mask(hf, size, pinpoints, s, self.patch_size))
        return {"pixel_values": pixels, "tile_mask": tile_mask, "token_mask": token_mask}

    def hf_vision_features(self, images: list[Any], model_dir: Path, extras: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Parity's reference: HF's processor and HF's own get_image_features (tiles, unpadding, pack_image_features)
        laid out as vision_features' [B, T, N, D]: slot (t, i) holds HF's packed row at host.hf_packed_positions
        (image_newline rows left out); slots HF has no token for (padding tiles, unpadded-away tokens) hold zeros
        and are not valid. "tile_cls": each real tile's [CLS] at the feature layer, from the same HF tower run;
        the masks as hf_vision_inputs. -> (features, valid [B, T, N])."""
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        from prunert.adapters.llava_next.host import AnyresConfig, hf_packed_positions

        if extras:
            raise ConfigError(f"vision extras {list(extras)}: not available for per-tile selection")
        processed = LlavaNextImageProcessorPil.from_pretrained(model_dir)(images=images, return_tensors="pt")
        with torch.no_grad():
            out = self.model.model.get_image_features(processed["pixel_values"], processed["image_sizes"])
        cfg = AnyresConfig.from_hf_dict(self.artifact_preprocessor_config(model_dir))
        masks = self.hf_vision_inputs(images, model_dir)
        tile_rows = out.hidden_states[self.feature_layer][:, 0]  # [real tiles of all images, Dv], HF's [CLS] rows
        tokens = torch.zeros(len(images), self.max_tiles, self.tokens_per_tile, out.pooler_output[0].shape[-1])  # [B, T, N, D]
        tile_cls = torch.zeros(len(images), self.max_tiles, tile_rows.shape[-1])  # [B, T, Dv]
        first = 0
        for b, (size, packed) in enumerate(zip(processed["image_sizes"].tolist(), out.pooler_output)):
            positions, length = hf_packed_positions(tuple(size), cfg)  # [T, N], -1 where HF has no token
            if length != len(packed):
                raise ConfigError(f"image {b}: HF packed {len(packed)} visual tokens, the tile layout expects {length}")
            slots = torch.from_numpy(positions >= 0)
            tokens[b][slots] = packed[torch.from_numpy(positions)[slots]]
            count = int(masks["tile_mask"][b].sum())
            tile_cls[b, :count], first = tile_rows[first : first + count], first + count
        valid = masks["token_mask"].bool() & masks["tile_mask"].bool()[:, :, None]  # [B, T, N]
        return {"tokens": tokens, "tile_cls": tile_cls, "tile_mask": masks["tile_mask"], "token_mask": masks["token_mask"]}, valid

    def family_config(self) -> dict[str, Any]:
        return {
            "vision_feature_layer": self.feature_layer,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "max_tiles": self.max_tiles,
            "tokens_per_tile": self.tokens_per_tile,
            "tile_budgets": asdict(self.tile_budgets),
        }


def _hf_unpad_mask(hf: Any, size: list[int], pinpoints: list, tile: int, patch: int) -> np.ndarray:
    """[rows * cols, N] int64: 1 where HF's `unpad_image` keeps the token of the high-res feature map,
    tiles in raster order (HF's view(rows, cols, g, g) layout)."""
    rows, cols = hf.get_anyres_image_grid_shape(size, pinpoints, tile)
    g = tile // patch
    index = torch.arange(rows * g * cols * g, dtype=torch.float64).reshape(1, rows * g, cols * g)
    kept = hf.unpad_image(index, list(size)).reshape(-1).long()  # flat positions HF keeps
    full = torch.zeros(rows * g * cols * g, dtype=torch.int64)
    full[kept] = 1
    return full.reshape(rows, g, cols, g).permute(0, 2, 1, 3).reshape(rows * cols, g * g).numpy()


EXPORT_ADAPTER = LlavaNextExportAdapter  # the registry's entry (prunert.adapters.export_adapter_class)
