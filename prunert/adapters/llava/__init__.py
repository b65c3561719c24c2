"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower, 2-layer MLP projector, Llama decoder.

`export` is the torch half (imported lazily), `host` the numpy half used by the runtime,
`synthetic` the seeded presets.
"""

# LLaVA-1.5's conversation format; the user's prompt carries the "<image>" placeholder.
LLAVA_PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"
