"""Qwen2.5-VL host side (numpy + Pillow): preprocessing, vision-graph inputs and M-RoPE positions.

Everything data-dependent stays here, outside the engines (deploy-facts: "How others stitch vision to
the LLM"): the vision graph takes the window permutation of the patches, its inverse, the rotary cos/sin
tables and the padded-window layout of the window layers (prunert.adapters.qwen2_5_vl.windows) as inputs
(`graph_vision_inputs`); the decoder takes 3-D M-RoPE position ids [3, B, L] (prunert.adapters.qwen2_5_vl.mrope,
re-exported here).

Each function mirrors one piece of transformers 5.23 and is tested equal to it:
  vision_inputs / preprocess_image  Qwen2VLImageProcessorPil (smart_resize, Pillow resize, patchify)
  vision_position_ids               transformers.vision_utils.get_vision_position_ids
  window_index                      get_vision_window_index (cu_window_seqlens deduplicated like HF)
  cu_seqlens                        get_vision_cu_seqlens (full-attention layers)
  rotary_cos_sin                    Qwen2_5_VLVisionRotaryEmbedding, permuted into window order
  rope_index                        Qwen2_5_VLModel.get_rope_index (images only; left padding)
`rope_index(..., kept_indices=...)` is the pruned variant: kept tokens keep their original (t, h, w)
positions and the text after an image continues exactly as in the unpruned sequence. Never renumber.

Order conventions: `pixel_values` rows are in HF's merge-block order (for each merged token in raster
order of the merged grid, its merge x merge patches). The vision graph's inputs are permuted into window
order with `window_index` (merge units); after the merger `reverse_index` brings the tokens back, so
merged token k is at (h, w) = divmod(k, grid_w // merge) of the merged grid: `kept_indices` use that
raster index. Never imports torch or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from prunert.adapters.qwen2_5_vl.mrope import (  # noqa: F401  (re-exported: host.rope_index, ...)
    _grids, decode_position_ids, grid_positions, pruned_rope_index, rope_deltas, rope_index, sequence_positions,
)
from prunert.adapters.qwen2_5_vl.windows import window_layout
from prunert.adapters.llava.host import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_RESAMPLE_CODES
from prunert.errors import ConfigError, ImageError
from prunert.runtime.host import HostAdapter, SpliceLayout
from prunert.runtime.image import check_image

DEFAULT_MIN_PIXELS = 56 * 56  # Qwen2VLImageProcessor size["shortest_edge"]
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # size["longest_edge"]
MAX_ASPECT_RATIO = 200
PAD = -100  # HF's filler in the padded window grid
# Qwen2.5-VL-Instruct's chat template (images and videos; `add_vision_id` numbers them): the default system prompt,
# <|im_start|>role ... <|im_end|> turns, an image part as <|vision_start|><|image_pad|><|vision_end|> where it stands.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------ preprocess
@dataclass(frozen=True)
class QwenPreprocessConfig:
    """Qwen2VLImageProcessor settings (defaults are HF's)."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"qwen2.5-vl preprocessing {name}: got {value!r}, expected an int >= 1")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"qwen2.5-vl preprocessing: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if self.resample not in PIL_RESAMPLE_CODES or isinstance(self.resample, bool):
            raise ConfigError(f"qwen2.5-vl preprocessing resample: got {self.resample!r}, expected a Pillow code 0..5")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ConfigError("qwen2.5-vl preprocessing image_mean/image_std: expected 3 values, std non-zero")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> QwenPreprocessConfig:
        """A preprocessor_config.json dict. As in Qwen2VLImageProcessor.__init__, top-level
        min_pixels/max_pixels override size["shortest_edge"/"longest_edge"] (pixel counts, not edges)."""
        size = d.get("size") or {}
        if not isinstance(size, Mapping):
            raise ConfigError(f"qwen2.5-vl preprocessor size: got {size!r}, expected {{'shortest_edge', 'longest_edge'}}")
        min_pixels = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or DEFAULT_MIN_PIXELS
        max_pixels = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_MAX_PIXELS
        base = cls()
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(d.get("patch_size", base.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(d.get("merge_size", base.merge_size)),
            resample=int(d.get("resample", base.resample)),
            do_resize=bool(d.get("do_resize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=_triple(d.get("image_mean", base.image_mean)),
            image_std=_triple(d.get("image_std", base.image_std)),
        )


def _triple(value: Any) -> tuple[float, ...]:  # a per-channel mean/std, or one number for all channels
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF's smart_resize, verbatim: both sides multiples of `factor`, area within [min, max] pixels."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}, which Qwen2.5-VL rejects")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, cfg: QwenPreprocessConfig, name: str = "image") -> tuple[np.ndarray, tuple[int, ...]]:
    """One image -> (patches float32 [gh * gw, C * T * p * p] in HF order, grid (1, gh, gw))."""
    image = check_image(image, name)  # RGB (runtime.image.to_rgb: alpha on white, grayscale replicated), as for LLaVA
    if cfg.do_resize:
        height, width = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        image = image.resize((width, height), resample=cfg.resample)
    values: np.ndarray = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    if cfg.do_rescale:  # HF: float64 multiply, then float32
        values = (values.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:  # HF: float32 (x - mean) / std
        mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
        values = (values.astype(np.float32, copy=False) - mean) / std
    chw = np.asarray(values, dtype=np.float32).transpose(2, 0, 1)  # [C, H, W]
    channels, height, width = chw.shape
    if height % cfg.factor or width % cfg.factor:
        raise ImageError(f"image '{name}': {width}x{height} is not a multiple of {cfg.factor} (enable do_resize)")
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    blocks = chw.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh/m gw/m m m C p p
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))  # a still image, T times
    return np.ascontiguousarray(blocks.reshape(gh * gw, channels * t * p * p)), (1, gh, gw)


def vision_inputs(images: Sequence[Image.Image], preprocessor_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PIL images -> {"pixel_values" float32 [sum patches, C*T*p*p], "image_grid_thw" int64 [n, 3]}."""
    if len(images) == 0:
        raise ImageError("vision_inputs: got no images, expected at least one")
    cfg = QwenPreprocessConfig.from_hf_dict(preprocessor_config)
    results = [preprocess_image(image, cfg, f"images[{i}]") for i, image in enumerate(images)]
    return {
        "pixel_values": np.concatenate([patches for patches, _ in results]),
        "image_grid_thw": np.asarray([grid for _, grid in results], dtype=np.int64),
    }


# ------------------------------------------------------------------------------ vision-tower metadata
def vision_position_ids(grid_thw: Any, merge_size: int) -> np.ndarray:
    """(h, w) patch coordinates in pixel_values order (merge-block major): int64 [P, 2]."""
    out = []
    for t, h, w in _grids(grid_thw):
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hw = np.stack([hpos.reshape(shape).transpose(0, 2, 1, 3).ravel(), wpos.reshape(shape).transpose(0, 2, 1, 3).ravel()], -1)
        out.append(np.tile(hw, (t, 1)))
    return np.concatenate(out).astype(np.int64)


def cu_seqlens(grid_thw: Any) -> np.ndarray:
    """Full-attention segment boundaries (one per frame of each image): int32 [frames + 1]."""
    lengths = [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def window_index(grid_thw: Any, merge_size: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window attention: (window_index int64 [P / merge^2] over merge units,
    cu_window_seqlens int32 over patches in window order, consecutive duplicates removed as HF does)."""
    side = window_size // merge_size // patch_size  # merged tokens per window side
    if side < 1:
        raise ConfigError(f"window_size {window_size}: expected >= merge_size * patch_size = {merge_size * patch_size}")
    unit = merge_size**2
    indices, cu, offset = [], [0], 0
    for t, h, w in _grids(grid_thw):
        lh, lw = h // merge_size, w // merge_size
        pad_h, pad_w = side - lh % side, side - lw % side  # HF pads a whole window when divisible
        padded = np.full((t, lh + pad_h, lw + pad_w), PAD, dtype=np.int64)
        padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        nh, nw = (lh + pad_h) // side, (lw + pad_w) // side
        padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, side, side)
        seqlens = (padded != PAD).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        indices.append(flat[flat != PAD] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_array = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu_array[1:] != cu_array[:-1]])  # torch.unique_consecutive
    return np.concatenate(indices), cu_array[keep]


def reverse_index(window_idx: np.ndarray) -> np.ndarray:
    """argsort(window_index): merger outputs (window order) -> merged-grid raster order. int64."""
    return np.argsort(window_idx, kind="stable").astype(np.int64)


def patch_permutation(window_idx: np.ndarray, merge_size: int) -> np.ndarray:
    """window_index expanded to patches: x_window = x[perm] (HF's permute_input_for_window_attn). int64 [P]."""
    unit = merge_size**2
    return (np.asarray(window_idx, np.int64)[:, None] * unit + np.arange(unit)).reshape(-1)


def rotary_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Qwen2_5_VLVisionRotaryEmbedding.inv_freq: float32 [head_dim // 4]."""
    spatial = head_dim // 2
    exponents = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
    powers = (float(theta) ** exponents.astype(np.float64)).astype(np.float32)  # torch's scalar ** tensor, to the bit
    return (np.float32(1.0) / powers).astype(np.float32)


def rotary_cos_sin(positions: np.ndarray, head_dim: int, theta: float, window_idx: np.ndarray | None = None,
                   merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Axial 2-D rotary tables float32 [P, head_dim]: cat(h freqs, w freqs) twice, as the vision
    rotary embedding builds them; permuted into window order when `window_idx` is given (the order
    the blocks consume them in)."""
    freqs = np.asarray(positions, np.int64)[..., None].astype(np.float32) * rotary_inv_freq(head_dim, theta)  # [P, 2, hd/4]
    angles = freqs.astype(np.float64)  # float32 angles as torch; cos/sin rounded once: within 1 ulp of torch's
    order = slice(None) if window_idx is None else patch_permutation(window_idx, merge_size)
    cos, sin = (np.concatenate([t[:, 0], t[:, 1]] * 2, axis=-1).astype(np.float32) for t in (np.cos(angles), np.sin(angles)))
    return cos[order], sin[order]


def segment_ids(cu: np.ndarray) -> np.ndarray:
    """Segment id of every position, from cumulative boundaries: int64 [cu[-1]]."""
    cu = np.asarray(cu, np.int64)
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu))


def block_diagonal_mask(cu: np.ndarray) -> np.ndarray:
    """bool [P, P]: True where query and key are in the same segment. Memory is quadratic in P:
    P^2 bytes (bool) or 4 P^2 (float32 additive) per attention kind, e.g. 5.3 / 21 MB at P = 2304
    patches (672 x 672), 26 / 105 MB at 5120 (HF's default max_pixels), 0.27 / 1.1 GB at 16384."""
    seg = segment_ids(cu)
    return seg[:, None] == seg[None, :]


def additive_mask(mask: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """bool mask -> 0 where attended, finfo(dtype).min elsewhere (added to the attention logits)."""
    return np.where(mask, 0.0, np.finfo(dtype).min).astype(dtype)


def family_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the host needs, from a Qwen2_5_VLConfig config.json dict (stored in the manifest)."""
    vision = config["vision_config"]
    heads = vision.get("num_heads", vision.get("num_attention_heads"))
    rope = vision.get("rope_parameters") or {}
    return {
        "patch_size": int(vision.get("patch_size", 14)),
        "temporal_patch_size": int(vision.get("temporal_patch_size", 2)),
        "spatial_merge_size": int(vision.get("spatial_merge_size", 2)),
        "window_size": int(vision.get("window_size", 112)),
        "fullatt_block_indexes": [int(i) for i in vision.get("fullatt_block_indexes", (7, 15, 23, 31))],
        "vision_head_dim": int(vision["hidden_size"]) // int(heads),
        "vision_rope_theta": float(rope.get("rope_theta", 10000.0)),
        "image_token_id": int(config.get("image_token_id", 151655)),
    }


def vision_metadata(grid_thw: Any, fc: Mapping[str, Any], masks: bool = True) -> dict[str, np.ndarray]:
    """Every data-dependent input of the vision graph besides pixel_values, from grid_thw alone."""
    merge = fc["spatial_merge_size"]
    widx, cu_window = window_index(grid_thw, merge, fc["window_size"], fc["patch_size"])
    cu_full = cu_seqlens(grid_thw)
    cos, sin = rotary_cos_sin(vision_position_ids(grid_thw, merge), fc["vision_head_dim"], fc["vision_rope_theta"], widx, merge)
    out = {"window_index": widx, "reverse_index": reverse_index(widx), "rotary_cos": cos, "rotary_sin": sin,
           "cu_seqlens": cu_full, "cu_window_seqlens": cu_window}
    if masks:  # both in window order; full-attention segments are whole images, which the permutation keeps contiguous
        out["window_attention_mask"] = block_diagonal_mask(cu_window)
        out["full_attention_mask"] = block_diagonal_mask(cu_full)
    return out


# ------------------------------------------------------------------------------- vision-graph inputs
def graph_vision_inputs(pixel_values: np.ndarray, grid_thw: Any, fc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ONE image's HF-order patch rows [P, C*T*p*p] and grid [1, 3] -> the vision graph's inputs, window order:
    pixel_values [P, C*T*p*p], rotary_cos/_sin [P, head_dim], the padded-window layout (windows.window_layout:
    window_gather / window_mask [windows, window_len], window_slots [P], int64), reverse_index [N] int64."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if len(grid) != 1 or grid[0, 0] != 1:
        raise ImageError(f"qwen2.5-vl vision graph: one still image per call, got grid_thw {grid.tolist()}")
    merge = fc["spatial_merge_size"]
    widx, cu_window = window_index(grid, merge, fc["window_size"], fc["patch_size"])
    cos, sin = rotary_cos_sin(vision_position_ids(grid, merge), fc["vision_head_dim"], fc["vision_rope_theta"], widx, merge)
    return {
        "pixel_values": np.ascontiguousarray(np.asarray(pixel_values, np.float32)[patch_permutation(widx, merge)]),
        "rotary_cos": cos,
        "rotary_sin": sin,
        **window_layout(cu_window),
        "reverse_index": reverse_index(widx),
    }


def masked_window_inputs(layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"window_segments" int64 [P]}: the window id of every patch (window order), the input of the vision graphs
    exported before the padded windows (one [P, P] mask over the image); the host still gives it, so those artifacts
    keep running (the runtime feeds a graph only the inputs its manifest declares). Read off the padded layout
    (graph_vision_inputs): patch p sits in slot w * window_len + j of window w."""
    return {"window_segments": layout["window_slots"] // layout["window_gather"].shape[1]}


class QwenHostAdapter(HostAdapter):
    """HostAdapter of Qwen2.5-VL, bound to the manifest's family_config (the vision settings the graph
    inputs need). One image per vision-graph call: images of a batch have different patch counts."""

    one_image_per_vision_call = True
    max_images_per_prompt = None  # several images per prompt (each its own vision call and K; M-RoPE: rope_index per run)

    def vision_inputs(self, images: Sequence[Any], preprocessor_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """ONE PIL image -> the vision graph's inputs (graph_vision_inputs) plus "image_grid_thw" int64 [1, 3]
        (not a graph input: the host's own, for the M-RoPE positions of the spliced sequence) and the older graphs'
        "window_segments" (masked_window_inputs)."""
        if len(images) != 1:
            raise ImageError(f"qwen2.5-vl vision_inputs: one image per vision-graph call, got {len(images)}")
        out = vision_inputs(images, preprocessor_config)  # HF layout: pixel_values [P, C*T*p*p], image_grid_thw [1, 3]
        inputs = graph_vision_inputs(out["pixel_values"], out["image_grid_thw"], self.family_config)
        return {**inputs, **masked_window_inputs(inputs), "image_grid_thw": out["image_grid_thw"]}

    def visual_token_counts(self, vision_inputs: Mapping[str, np.ndarray], num_images: int) -> np.ndarray:
        """The image's own N (merged tokens), int64 [1]."""
        return np.array([len(vision_inputs["reverse_index"])], np.int64)

    def position_ids(self, attention_mask: Any, layout: SpliceLayout) -> np.ndarray:
        """M-RoPE positions [3, B, L] of the spliced, left-padded batch: layout gives the spliced input ids (K image
        tokens per image), kept_indices (per row) and this host's outputs (one per image: image_grid_thw [1, 3]);
        every kept token keeps its original (t, h, w) position."""
        if not layout.host_outputs or layout.kept_indices is None:
            raise ConfigError("qwen2.5-vl position_ids: need the spliced layout (input ids, kept_indices, the host's image_grid_thw) "
                              "of the vision result; pass the VisionResult to splice()")
        grid = np.concatenate([out["image_grid_thw"] for out in layout.host_outputs])  # [B, 3]
        positions, _ = rope_index(layout.input_ids, grid, image_token_id=self.family_config["image_token_id"],
                                  spatial_merge_size=self.family_config["spatial_merge_size"], attention_mask=attention_mask,
                                  kept_indices=list(layout.kept_indices))
        return positions  # [3, B, L]

    def next_position_ids(self, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """First decode step: valid tokens so far + HF's rope_deltas = max prefill position + 1. [3, B, 1]"""
        return decode_position_ids(rope_deltas(position_ids, attention_mask), np.asarray(attention_mask).sum(axis=1))

    def default_chat_template(self) -> str:
        """Qwen2.5-VL-Instruct's template (the checkpoint ships it: this is for one exported without)."""
        return QWEN_CHAT_TEMPLATE


HOST_ADAPTER = QwenHostAdapter  # the registry's entry (prunert.adapters.host_adapter_class)
