"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): CLIP vision tower run on any-resolution tiles,
2-layer MLP projector, `image_newline` embedding, Llama/Mistral decoder.

`export` is the torch half (imported lazily), `host` the numpy half used by the runtime,
`synthetic` the seeded presets.

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
and unpadded-away tokens are never selected while a valid token is left (below: only an image with
fewer valid tokens than K, possible for K > N, ever reaches them). `host.hf_packed_positions` maps every (tile, token)
to its index in HF's packed per-image feature sequence, for parity against `pack_image_features`.

`image_newline` tokens are not part of the budget K and are dropped
------------------------------------------------------------------
HF appends the learned `image_newline` embedding after every row of the unpadded high-resolution
map. After pruning the kept tokens are a set, not a grid, so there are no rows left to terminate:
the pruned sequence is just the K selected visual tokens (thumbnail and high-res alike), with no
`image_newline` rows, and K counts patch tokens only. An unpruned run (K = all valid tokens) thus
differs from HF by exactly those newline tokens; parity checks compare against HF's features with
the newlines removed (`hf_packed_positions`).

The exported vision graph and per-tile selection
------------------------------------------------
vision.onnx: pixel_values [batch, T, 3, S, S], tile_mask [batch, T], token_mask [batch, T, N],
text_embeds [batch, text, D], text_mask [batch, text] -> visual_tokens [batch, K, D], kept_indices
[batch, K]. Batch is symbolic; T and N are fixed by the checkpoint (llava-next-tiny: 5 x 16).

* Tower: all batch * T tiles run as one batch (padding tiles too: shapes are static), with the
  config's `vision_feature_layer` and the "default" select strategy (CLS dropped; "full" is refused),
  the projector on every token, and each tile's [CLS] taken from the same layer (`export.py`).
* Budgets: HERO-style `tile_budgets` (prunert.pruning_ops.tile_budgets; settings `TileBudgetConfig`
  in prunert.config, recorded in the manifest's family_config) split K over the thumbnail (a fixed
  share) and the tiles. A tile's text relevance is the mean of ResPrune's r over its valid tokens,
  r min-max normalised over the image's valid tokens. A tile never gets more than its valid tokens
  (token_mask), so padding tiles and real tiles that unpadding emptied (extreme aspect ratios) get 0.
  That holds whenever the image has at least K valid tokens, i.e. always for K <= N (the thumbnail
  has N). For K > N an image can have fewer valid tokens than K: all of them are kept and the K - V
  slots the static output still has are filled with masked tokens, tile by tile; the runtime leaves
  those out of the prompt (host `kept_valid`), so such an image gets its V real tokens.
* Within a tile: ResPrune with the tile's own budget k_t. Greedy picks are prefix-consistent, so
  ResPrune runs min(K, N) steps on all tiles as one batch and each tile keeps its first k_t picks;
  masked tokens are never picked while a valid one is left (prunert.pruning_ops.tiled). `uniform` and
  `random` work per tile too (the flat op's rule on the tile's valid tokens); cls_attention, visionzip,
  divprune and cdpruner are refused at export ("method X does not support per-tile budgets").
* Unpruned baseline (`--method none --budget T*N`): the graph outputs every slot of the [T, N] layout;
  the host's `kept_valid` (token_mask & tile_mask at the kept indices) tells the splice which slots are
  real, so the prompt gets exactly HF's visual tokens minus the image_newline rows (parity compares
  against HF's features with the same slots left out).
* Output: kept tokens in (tile, raster index in the tile) order; kept_indices = tile * N + index,
  positions in the [T, N] layout. The runtime's splice replaces each `<image>` placeholder by its image's
  K tokens (no image_newline, see below; several images per prompt, each with its own tiles and K:
  docs/resolution.md); decoder graph and decoding are LLaVA-1.5's (Llama).
* Parity compares the host's preprocessing with HF's `LlavaNextImageProcessorPil` laid out the same
  way (token_mask from HF's own `unpad_image`), then kept sets, kept tokens, prefill logits and
  greedy tokens against HF's tower + projector + the same selection module in torch + HF's LM.

The vision patch size
---------------------
The token mask needs the tower's patch size, which HF keeps in config.json / processor_config.json,
not in preprocessor_config.json. The host reads a "patch_size" key from the preprocessor config
(synthetic checkpoints write it; LlavaNextImageProcessor ignores it) or takes `patch_size=`. Export
adds it to the artifact's copy of preprocessor_config.json (`artifact_preprocessor_config`), so
artifacts from downloaded llava-hf checkpoints carry it too.
"""

# llava-v1.6-vicuna's conversation format (also what llava-hf's vicuna/llama checkpoints use);
# the user's prompt carries the "<image>" placeholder.
LLAVA_NEXT_PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"
