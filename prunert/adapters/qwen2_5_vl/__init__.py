"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed ViT with 2-D rotary, 2x2 patch merger,
Qwen2 decoder with 3-D M-RoPE.

`export` is the torch half (imported lazily), `host` the numpy half used by the runtime (preprocessing,
vision-graph inputs; `mrope` the M-RoPE position ids), `synthetic` the seeded presets,
`tokenizer_builder` their locally trained tokenizer.

Design (the hooks its ExportAdapter and HostAdapter subclasses override)
------------------------------------------------------------------------
* One image per vision-graph call. smart_resize gives every image its own patch count P = 4 N (N merged
  tokens), so the vision graph has no batch axis: pixel_values [P, 1176] (window order), rotary_cos/_sin
  [P, head_dim], window_gather / window_mask [W, L], window_slots [P], reverse_index [N], text_embeds [1, text, D],
  text_mask [1, text] -> visual_tokens [1, K, D], kept_indices [1, K] (raster indices of the merged grid). The window
  index, rotary tables and padded-window layout are computed on the host (`host.graph_vision_inputs`). The runtime
  calls the graph once per image (`one_image_per_vision_call`) and keeps each image's grid_thw for positions.
  Padding images to one P would need a validity mask through the selection; one call per image is how
  Qwen's own runtimes batch too.
* Window attention in O(P * L) (`windows`): the window layers run on W padded windows of at most L patches
  (L = 64 for Qwen2.5-VL's 112-pixel windows, 16 in the tiny preset), [W, heads, L, L] scores, gathered from and
  back to the P patch rows by host-computed indices; the full-attention layers stay [P, P] attention, one head
  after another (one head's [1, 1, P, P] scores live at a time: P = 16,384 fits where all heads' 17 GB would not).
  New dims "windows" and "window_len" are bounded in the manifest (dim_ranges) for TensorRT profiles. Graphs
  exported before (one [P, P] mask from window_segments [P]) still run: the host gives window_segments too.
  Memory and time against the masked graph and HF eager: bench/bench_qwen_vision.py, docs/resolution.md.
* The budget. K must not exceed the fewest merged tokens an image can give. `fit_budget` raises the
  preprocessor's min_pixels to K tokens' worth (K * 28^2 pixels), so an image that would give fewer tokens
  is upscaled, exactly as HF upscales images below min_pixels; the artifact's preprocessor_config.json
  carries the raised value and parity runs HF's processor with it. The max_pixels branch of smart_resize
  (large images of extreme aspect ratio) floors both sides and can still give about max_pixels / 2 tokens:
  K above that floor is refused (tiny preset: K <= 32; N = K..113 per image after raising). `--method none`
  (the unpruned baseline, budget = the largest N) leaves the pixel range alone and outputs every merged token,
  [1, merged, D]: each image keeps its own N (a batch pads the shorter rows with masked slots, which the
  splice leaves out). Methods must accept a dynamic N: resprune and cdpruner do; uniform and random
  compute their indices from N's value at run time when N is symbolic (uniform: the same integer formula;
  random: the first N of 32768 seeded key priorities, TopK K); divprune computes from N at trace time,
  which the exporter turns into a fixed N, and export refuses the graph
  (prunert.export.validate.check_symbolic_dims); cls_attention and visionzip need a [CLS] token Qwen's
  tower does not have.
* Splice and positions. The user prompt carries IMAGE_PLACEHOLDER (<|vision_start|><|image_pad|><|vision_end|>)
  once per image (several images per prompt: docs/resolution.md); the runtime replaces each <|image_pad|> by its
  image's K kept tokens, one M-RoPE grid per image run. Kept tokens keep their ORIGINAL (t, h, w)
  M-RoPE positions and the text after the image continues where it would in the unpruned sequence
  (mrope.rope_index with kept_indices); decode positions are max position + 1 + step (HF's rope_deltas).
  Never renumber the kept tokens (deploy-facts.md): tests/parity/test_parity_qwen2_5_vl.py shows that a
  dense-grid or 1-D renumbering moves the logits by far more than the parity bar.
* Parity. Pixels compare the host's graph inputs with HF's Qwen2VLImageProcessorPil converted the same way;
  the prefill and greedy references run HF's model with HF's own positions of the pruned prompt
  (get_rope_index on the unpruned prompt, columns of the pruned tokens dropped: `hf_position_ids`), the
  greedy one as a loop over HF's forward with its KV cache (generate recomputes M-RoPE from input ids).
* TensorRT profiles: the manifest records (min, opt, max) of "merged", "patches" (= 4 merged), "windows" and
  "window_len" in the vision graph's dim_ranges; prunert.engines.profiles uses them in place of a batch range.
* Budget control: `export --min-pixels / --max-pixels` set smart_resize's range (fit_pixel_range; recorded in
  family_config["pixel_range"] and preprocessor_config.json, re-applied by parity); `prunert inspect A --image x.jpg`
  prints an image's visual tokens before and after pruning.

Precisions: fp16 (`convert`) and int8 (`calibrate`) variants pass parity at their bars on the tiny preset
(tests/parity/test_parity_qwen2_5_vl.py); TensorRT engines over the P profiles are untested on a GPU.
Not covered: videos, `prunert visualize` (it refuses: its overlay needs one
fixed patch grid).
"""

# The special tokens of Qwen2.5-VL that prompts and the vision stitching use.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"  # one per merged visual token after expansion (K after pruning)
# What the chat template emits for one image; the user's prompt carries it.
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
# Qwen2.5-VL's chat format (default system prompt, one user turn, generation prompt), e.g.
# QWEN_PROMPT_TEMPLATE.format(prompt=IMAGE_PLACEHOLDER + "What is in the picture?").
QWEN_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
