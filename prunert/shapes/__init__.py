"""The shapes demonstration: a scene distribution, its questions, and the LLaVA-1.5 model trained on it.

`scenes` (numpy + Pillow only) draws the scenes and questions; `dataset` writes held-out JSONL sets;
`pool` / `train` / `checkpoint` (torch) train and cache `synthetic:llava-shapes`. The model is a
demonstration trained on generated shapes, not a general VLM.
"""

# What every command prints about the model (its checkpoint marker's note, carried into each manifest).
DEMO_NOTE = ("synthetic:llava-shapes is a demonstration model trained here on generated shapes "
             "(prunert.shapes), not a general VLM")
