"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed ViT with 2-D rotary, 2x2 patch merger,
Qwen2 decoder with 3-D M-RoPE.

`host` is the numpy half used by the runtime (preprocessing, vision-tower metadata, M-RoPE position
ids), `synthetic` the seeded presets, `tokenizer_builder` their locally trained tokenizer.
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
