"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): CLIP vision tower run on any-resolution tiles,
2-layer MLP projector, `image_newline` embedding, Llama/Mistral decoder.

`host` is the numpy half used by the runtime, `synthetic` the seeded presets; the torch half
(`export`) is still to come (issue 5).

Design: a static vision graph with a maximum tile count and masks
-----------------------------------------------------------------
HF picks, per image, the pinpoint of `image_grid_pinpoints` that fits it best, so the number of
tiles and of visual tokens depends on the image. An exported graph needs static shapes, so the host
always produces, for a batch of B images (S = tile side = crop size, N = (S / patch)^2):

* `pixel_values [B, T, 3, S, S]` float32 with T = 1 + the most tiles any pinpoint gives
  (llava-v1.6 pinpoints: 1 + 4 = 5). Index 0 is the global thumbnail (the whole image squashed to
  S x S), then the high-resolution tiles in HF's raster order (row by row, left to right), then
  zero padding tiles (as HF's `_pad_for_batching`, but always up to T).
* `tile_mask [B, T]` int64: 1 for the thumbnail and the real tiles, 0 for padding tiles.
* `token_mask [B, T, N]` int64: 1 where a patch token of that tile survives HF's unpadding
  (`unpad_image` in `modeling_llava_next.py`): the high-resolution feature map of rows x cols tiles
  is cropped back to the image's aspect ratio, dropping the token rows (or columns) that only saw
  the letterbox padding. The thumbnail's row is all 1, padding tiles all 0. Tokens are in each
  tile's own row-major order; `token_mask[b].sum()` is exactly the number of visual tokens HF
  feeds the LLM for that image, minus its `image_newline` tokens.

This is how the graph knows how many valid tokens every tile has: a per-tile budget (HERO-style
tile budgets, see shared/methods.md) is capped at the tile's `token_mask` count, and padding tiles
and unpadded-away tokens can never be selected. `host.hf_packed_positions` maps every (tile, token)
to its index in HF's packed per-image feature sequence, for parity against `pack_image_features`.

`image_newline` tokens are not part of the budget K and are dropped
------------------------------------------------------------------
HF appends the learned `image_newline` embedding after every row of the unpadded high-resolution
map. After pruning the kept tokens are a set, not a grid, so there are no rows left to terminate:
the pruned sequence is just the K selected visual tokens (thumbnail and high-res alike), with no
`image_newline` rows, and K counts patch tokens only. An unpruned run (K = all valid tokens) thus
differs from HF by exactly those newline tokens; parity checks compare against HF's features with
the newlines removed (`hf_packed_positions`).

The vision patch size
---------------------
The token mask needs the tower's patch size, which HF keeps in config.json / processor_config.json,
not in preprocessor_config.json. The host reads a "patch_size" key from the preprocessor config
(synthetic checkpoints write it; LlavaNextImageProcessor ignores it) or takes `patch_size=`.
"""

# llava-v1.6-vicuna's conversation format (also what llava-hf's vicuna/llama checkpoints use);
# the user's prompt carries the "<image>" placeholder.
LLAVA_NEXT_PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"
