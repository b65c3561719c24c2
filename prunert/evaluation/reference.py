"""`prunert eval --reference hf`: the PyTorch Hugging Face checkpoint itself, greedy, on the same records (torch here only).

The checkpoint is the one an artifact's manifest names (source.model: a local directory or `synthetic:<preset>`,
prunert.adapters.resolve_source), loaded as export and parity load it (the family's export adapter: safetensors,
fp32, eager attention). Each record goes through Hugging Face's own processor (`AutoProcessor`: its image
processor, its tokenizer, its expansion of the image placeholder) with the family's prompt template and the same
prompt as the runtime's (runner.question_prompt), then `model.generate(do_sample=False)` with the checkpoint's
EOS and pad ids, one record at a time (no padding), every visual token kept. The answer is Hugging Face's decode
of the new tokens without EOS. So on an unpruned fp32 artifact the predictions should be equal, record by record
(measured on the tiny presets: llava-tiny 8/8, qwen2.5-vl-tiny 8/8).
LLaVA-NeXT is the documented exception: its artifacts leave out HF's `image_newline` tokens (adapters.llava_next), so an
unpruned artifact's prompt differs from HF's by those tokens and answers may differ (llava-next-tiny: 5/8 identical).
Qwen2.5-VL's `AutoProcessor` needs torchvision for its video processor; without torchvision the processor is built
from its image processor and tokenizer (adapters.hf_loading.load_hf_processor); a missing image processor or
tokenizer backend is one error line.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

from prunert.errors import BackendUnavailableError
from prunert.evaluation.data import EvalRecord
from prunert.evaluation.report import ArtifactResult, Prediction
from prunert.evaluation.runner import EvalConfig, Progress, question_prompt, record_images, score

REFERENCE_METHOD = "none"  # the reference keeps every visual token
REFERENCE_PRECISION = "fp32"  # the checkpoint in torch float32


def check_reference_available() -> None:
    """torch and transformers are installed (found, not imported): else one line, before any artifact runs."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise BackendUnavailableError(f"--reference hf: needs {' and '.join(missing)} (pip install 'prunert[export]'); "
                                      "the artifacts themselves run without them")


def evaluate_reference(model: str, records: Sequence[EvalRecord], cfg: EvalConfig, num_visual_tokens: int,
                       source=None, progress: bool = True) -> ArtifactResult:
    """The checkpoint `model` on `records` -> an ArtifactResult named `hf:<model>` (K = num_visual_tokens, the
    artifact's N; timings None). `source`: the artifact's manifest SourceSpec, for the model note."""
    check_reference_available()
    import torch
    from transformers.utils import logging as hf_logging

    from prunert.adapters import resolve_source
    from prunert.adapters.hf_loading import load_hf_processor
    from prunert.export.pipeline import load_export_adapter

    checkpoint = resolve_source(model)
    adapter = load_export_adapter(checkpoint)
    info = adapter.text_info(checkpoint.path)
    try:
        processor, _ = load_hf_processor(checkpoint.path)  # Qwen2.5-VL's video processor (torchvision) may be left out
    except ImportError as exc:  # its image processor or tokenizer needs a library that is not installed
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BackendUnavailableError(f"--reference hf: Hugging Face's processor for {model!r} does not load here: {reason}") from None
    eos = [int(t) for t in info["eos_token_ids"]]
    predictions: list[Prediction] = []
    bar = Progress(f"eval hf:{model}", len(records), progress)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate's notices about the checkpoint's generation_config
    try:
        for record in records:
            text = info["prompt_template"].format(prompt=question_prompt(info["image_placeholder"], record.question, len(record.images)))
            inputs = processor(images=record_images(record), text=[text], return_tensors="pt")  # HF expands each placeholder
            with torch.no_grad():
                out = adapter.model.generate(**inputs, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                             eos_token_id=eos or None, pad_token_id=int(info["pad_token_id"]))
            new = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in eos]  # generated ids, EOS dropped
            predictions.append(score(record, processor.tokenizer.decode(new, skip_special_tokens=True)))
            bar.advance(1)
    finally:
        bar.close()
        hf_logging.set_verbosity(verbosity)
    return ArtifactResult(f"hf:{model}", REFERENCE_METHOD, num_visual_tokens, REFERENCE_PRECISION, True, tuple(predictions),
                          None, None, source)
