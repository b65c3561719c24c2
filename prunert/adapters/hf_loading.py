"""Loading a Hugging Face checkpoint for export and parity, the same way for every family, and the text
parts every `*ForConditionalGeneration` exposes alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunert.errors import ModelSourceError, ParityError


# config.json's torch_dtype (transformers 5 writes "dtype") -> the export dtype (config.EXPORT_DTYPES) it exports at
# by default: fp16 as it is (llava-hf checkpoints); bf16 at fp32 (ONNX Runtime's CPU provider has no bf16 MatMul,
# and fp16's range is narrower than bf16's: a bf16 model can overflow in fp16); fp32, or no dtype given, at fp32.
CHECKPOINT_DTYPES = {"float16": "fp16", "bfloat16": "fp32", "float32": "fp32"}


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The export dtype a checkpoint exports at without --dtype (CHECKPOINT_DTYPES of its config.json's torch_dtype)."""
    declared = config.get("torch_dtype", config.get("dtype"))
    return CHECKPOINT_DTYPES.get(declared, "fp32") if isinstance(declared, str) else "fp32"


def torch_dtype(dtype: str) -> Any:
    """An export dtype ("fp32", "fp16") as the torch dtype."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16}[dtype]


def load_hf_model(model_class: Any, model_dir: Path, architecture: str, dtype: str = "fp32") -> Any:
    """model_class.from_pretrained(model_dir): safetensors only (never pickle), eager attention (attention
    maps are needed), weights in `dtype` (an export dtype: fp32, or fp16 for `export --dtype fp16`), eval mode.
    A checkpoint that cannot load, or that loads only by initialising weights at random (missing, unexpected or
    mis-shaped tensors: check_loading_info), is a ModelSourceError naming it."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' LOAD REPORT table: check_loading_info says it in one line
    try:
        model, info = model_class.from_pretrained(model_dir, use_safetensors=True, attn_implementation="eager", dtype=torch_dtype(dtype),
                                                  output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelSourceError(f"--model '{model_dir}': cannot load as {architecture}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(info, model_dir, architecture)
    return model.eval()


def check_loading_info(info: dict[str, Any], model_dir: Path, architecture: str, shown: int = 3) -> None:
    """from_pretrained's loading info (output_loading_info=True, names after transformers' key renames) must be
    empty: a weight the config needs but the safetensors lack, or whose shape contradicts config.json
    (ignore_mismatched_sizes=True: reported here instead of transformers' RuntimeError), would be initialised at
    random and exported as if trained; a tensor the model has no place for means the config is not the checkpoint's."""

    def listed(names: list[str]) -> str:
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    problems = []
    for kind in ("missing", "unexpected"):
        names = sorted(info.get(f"{kind}_keys") or ())
        if names:
            problems.append(f"{len(names)} {kind} weight(s): {listed(names)}")
    mismatched = sorted(info.get("mismatched_keys") or ())  # (name, checkpoint shape, config shape)
    if mismatched:
        shapes = [f"{name} {list(ours)} (config.json: {list(expected)})" for name, ours, expected in mismatched]
        problems.append(f"{len(shapes)} weight(s) whose shape contradicts config.json: {listed(shapes)}")
    problems += [str(message) for message in info.get("error_msgs") or ()]
    if problems:
        raise ModelSourceError(f"--model '{model_dir}': not a complete {architecture} checkpoint "
                               f"(exporting it would use randomly initialised weights): {'; '.join(problems)}")


class HFTextParts:
    """The export adapter's text hooks for a Hugging Face `*ForConditionalGeneration` in `self.model` (its
    `model.language_model`, `lm_head` and input embeddings): shared by every family's adapter."""

    model: Any

    def text_backbone(self) -> Any:
        return self.model.model.language_model

    def lm_head(self) -> Any:
        return self.model.lm_head

    def embedding_table(self) -> Any:
        return self.model.get_input_embeddings().weight  # [V, D]

    def hf_token_ids(self, text: str, model_dir: Path) -> list[int]:
        """Parity's reference ids of the formatted prompt `text`: Hugging Face's tokenizer, with the runtime's rule for
        special tokens typed in the prompt (prunert.runtime.text.plain_text_runs): plain text (split_special_tokens),
        except the template's own and the prompt's image placeholders (one per image)."""
        from transformers import AutoTokenizer

        from prunert.runtime.text import plain_text_runs, user_spans

        info = self.text_info(model_dir)  # type: ignore[attr-defined]  # every family's export adapter has it
        template, placeholder = info["prompt_template"], info["image_placeholder"]
        head, tail = template.format(prompt="\0").split("\0")
        if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
            raise ParityError(f"prompt {text[:60]!r}: not in the checkpoint's prompt template {template!r}")
        _, user, keeps = user_spans(template, text[len(head) : len(text) - len(tail)], placeholder)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        encoding = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)
        body = [i for i, sequence in enumerate(encoding.sequence_ids()) if sequence is not None]  # None: BOS/EOS added
        runs = plain_text_runs([offsets[i] for i in body], [ids[i] in special for i in body], user, keeps, len(text))
        if runs is None:
            return ids

        def plain(span: tuple[int, int]) -> list[int]:
            return tokenizer(text[span[0] : span[1]], add_special_tokens=False, split_special_tokens=True)["input_ids"]

        middle = [token for run in runs for token in ([ids[body[run]]] if isinstance(run, int) else plain(run))]
        return ids[: body[0]] + middle + ids[body[-1] + 1 :]


# Sub-processors an image + text run does without, when their backend is not installed (Qwen2.5-VL's video
# processor needs torchvision); any other part that does not load is the ImportError it raised.
OPTIONAL_PROCESSOR_PARTS = ("video_processor", "feature_extractor")


def load_hf_processor(directory: Path, overrides: dict | None = None) -> tuple[Any, list[str]]:
    """The checkpoint's AutoProcessor, with the image processor rebuilt with `overrides` if any.
    -> (processor, sub-processors left out). A sub-processor whose optional backend is not installed
    (Qwen2.5-VL's video processor needs torchvision) is left out: the benchmark and `eval --reference hf` feed one
    image and text."""
    from transformers import AutoImageProcessor, AutoProcessor

    left_out: list[str] = []
    try:
        processor = AutoProcessor.from_pretrained(directory)
    except ImportError:
        processor, left_out = _processor_without_missing_backends(directory)
    if overrides:
        processor.image_processor = AutoImageProcessor.from_pretrained(directory, **overrides)
    return processor, left_out


def _processor_without_missing_backends(directory: Path) -> tuple[Any, list[str]]:
    """AutoProcessor's class, built from the sub-processors that load (same files, same processor settings)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.processing_utils import MODALITY_TO_AUTOPROCESSOR_MAPPING

    base = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(directory))]
    parts, missing = [], []
    for attribute in base.get_attributes():
        loader = AutoTokenizer if "tokenizer" in attribute else MODALITY_TO_AUTOPROCESSOR_MAPPING[attribute]
        try:
            parts.append(loader.from_pretrained(directory))
        except ImportError:
            if attribute not in OPTIONAL_PROCESSOR_PARTS:  # an image processor or tokenizer cannot be left out
                raise
            missing.append(attribute)

    class Partial(base):  # the processor class with the missing sub-processors dropped from its attributes
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in base.get_attributes() if name not in missing]

    Partial.__name__ = Partial.__qualname__ = base.__name__
    processor_dict, kwargs = base.get_processor_dict(directory)
    return Partial.from_args_and_dict(parts, processor_dict, **kwargs), missing
