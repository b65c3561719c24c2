"""The `prunert` model of lmms-eval: an exported artifact run by prunert.runtime.VLMPipeline (ONNX Runtime /
TensorRT; no torch in prunert's own path, though lmms-eval itself imports torch).

    lmms-eval eval --model prunert --model_args artifact=DIR[,backend=onnxruntime][,precision=fp32][,threads=0]
                   [,max_new_tokens=N] --batch_size B --tasks TASK

lmms-eval finds the model through the `lmms_eval.models` entry point (pyproject.toml -> `manifest`). Tested
against lmms-eval 0.7.3 (the `lmms` extra pins it).

- generate_until: greedy (a task's `do_sample: true` with a temperature samples, as in `prunert run`), one image
  per request, the prompt `question_prompt(placeholder, context)` put through the family's template, as
  `prunert eval` builds it (a context that holds the placeholder already is used as it is); the task's `until`
  strings cut the text; `max_new_tokens` is the task's, capped by the model arg and the artifact's max_sequence.
  Requests run in batches of --batch_size (capped at the artifact's max_batch) and in order.
- loglikelihood: the continuation's tokens are teacher-forced through the one decode loop
  (runtime.decode.decode_steps) after the prefill of the image and context. It answers what lmms-eval's own
  models answer (llava_hf: the Hugging Face loss) and its multiple_choice scoring expects (argmin): the mean
  negative log-likelihood per continuation token, not the summed log-probability the base class's docstring
  names; and whether greedy decoding would have produced the continuation.
- generate_until_multi_round: not supported (one image, one turn per artifact call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from prunert.config import GenerationConfig, RuntimeConfig
from prunert.errors import ConfigError, PromptError
from prunert.evaluation.runner import EvalConfig, question_prompt
from prunert.runtime.decode import decode_steps, table_embedder
from prunert.runtime.pipeline import VLMPipeline
from prunert.runtime.text import encode_prompt

MODEL_ID = "prunert"


def manifest():
    """The `lmms_eval.models` entry point's payload: lmms-eval's `--model prunert` is `PrunertLMMS`. Imported here:
    lmms_eval.models runs the entry points while it initialises, so importing it at the top would be circular."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.PrunertLMMS")


@dataclass(frozen=True)
class Request:
    """One generate_until / loglikelihood request of a simple-model task, resolved against its document."""

    context: str
    image: Any  # the one visual doc_to_visual gave (PIL image or path)
    option: Any  # generate_until: the task's generation kwargs; loglikelihood: the continuation string


class PrunertLMMS(lmms):
    """lmms-eval's view of one exported prunert artifact (module docstring)."""

    is_simple = True

    def __init__(self, artifact: str = "", backend: str = "onnxruntime", precision: str = "fp32", threads: int = 0,
                 max_new_tokens: int = 0, batch_size: int | str = 1, max_batch_size: int | None = None,
                 device: str | None = None) -> None:
        """model_args: artifact, backend, precision, threads, max_new_tokens. lmms-eval passes batch_size (--batch_size),
        max_batch_size and device itself; the last two mean nothing here (the backend picks the device)."""
        super().__init__()
        if not artifact:
            raise ConfigError("--model_args: missing artifact=DIR (an artifact directory exported by `prunert export`)")
        batch = _batch_size(batch_size)
        self.config = EvalConfig(batch=batch, backend=str(backend), precision=str(precision), runtime=RuntimeConfig(threads=_int("threads", threads)))
        self.max_new_tokens = _int("max_new_tokens", max_new_tokens)  # a cap on the task's; 0: the task's own
        self.pipe = VLMPipeline(str(artifact), backend=self.config.backend, precision=self.config.precision, runtime=self.config.runtime)
        self.batch = min(batch, self.pipe.manifest.text.max_batch)

    # ---- lmms interface ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        resolved = [self._resolve(request, "generate_until") for request in requests]
        out: list[str] = []
        for chunk in _batches(resolved, self.batch):
            config = self._generation_config(chunk[0].option)
            prompts = [self._prompt(r.context) for r in chunk]
            generations = self.pipe.generate([r.image for r in chunk], prompts, config)
            out += [_cut(g.text, _until(r.option)) for r, g in zip(chunk, generations)]
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each request's (mean NLL per continuation token, is_greedy) (module docstring), carried in a
        GenerationResult: lmms-eval 0.7.3's evaluator passes every response through unwrap_generation_output,
        which turns anything but a str or a GenerationResult into its str() (a bare tuple reaches
        multiple_choice's process_results as text and fails); a GenerationResult's `.text` comes out as is."""
        return [GenerationResult(self._loglikelihood(self._resolve(request, "loglikelihood"))) for request in requests]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("prunert: generate_until_multi_round is not supported: an artifact answers one image and "
                                  "one turn per call; use a generate_until task")

    # ---- helpers -------------------------------------------------------------------------------------
    def _resolve(self, request: Instance, kind: str) -> Request:
        """A simple-model request's (context, option, doc_to_visual, doc_id, task, split) -> Request."""
        if len(request.args) != 6:
            raise NotImplementedError(f"prunert: {kind} request without an image ({len(request.args)} arguments, e.g. "
                                      "acc_mutual_info's unconditional loglikelihood): an artifact needs one image per prompt")
        context, option, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc)
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1:
            raise PromptError(f"task {task} doc {doc_id}: got {len(visuals)} visuals, expected exactly one image "
                              "(a prunert artifact takes one image per prompt)")
        if callable(option):  # loglikelihood's doc_to_target
            option = option(doc)
        return Request(str(context), visuals[0], option)

    def _prompt(self, context: str) -> str:
        """The task's text with the image placeholder first (question_prompt), unless the task placed it itself."""
        placeholder = self.pipe.manifest.text.placeholder
        return context if placeholder in context else question_prompt(placeholder, context)

    def _generation_config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        """A task's generation kwargs (HF names) -> GenerationConfig: greedy unless do_sample with a temperature."""
        wanted = int(kwargs.get("max_new_tokens") or GenerationConfig.max_new_tokens)
        cap = self.max_new_tokens or wanted
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature") or 0.0) if sample else 0.0
        top_p = float(kwargs.get("top_p") or 1.0) if sample else 1.0
        return GenerationConfig(max_new_tokens=min(wanted, cap), temperature=temperature, top_p=top_p)

    def _loglikelihood(self, request: Request) -> tuple[float, bool]:
        """Mean over the continuation's tokens of -log p(token | image, context, earlier tokens), and whether each
        was the argmax."""
        prompt = self._prompt(request.context)
        context_ids, continuation = self._split_tokens(prompt, str(request.option))
        limit = self.pipe.manifest.text.max_sequence
        if len(context_ids) + len(continuation) > limit:
            raise PromptError(f"loglikelihood: prompt and continuation are {len(context_ids)} + {len(continuation)} tokens "
                              f"with the visual tokens' placeholder, expected at most {limit} (the artifact's max_sequence)")
        vision = self.pipe.encode_images([request.image], [prompt])
        state = self.pipe.prefill([context_ids], vision)
        positions = self.pipe.artifact.host.next_position_ids(state.position_ids, state.attention_mask)  # [1, 1] (M-RoPE [3, 1, 1])
        forced = _forced(continuation)
        steps = decode_steps(state.session, state.logits[:, -1], state.attention_mask, positions,
                             table_embedder(self.pipe.artifact.embeddings, self.pipe.embeds_dtype), forced, len(continuation))
        total, greedy = 0.0, True
        for step, token in zip(steps, continuation):
            logits = step.logits[0].astype(np.float64)  # [V]
            total += float(logits[token] - _logsumexp(logits))
            greedy = greedy and int(logits.argmax()) == token
        return -total / len(continuation), greedy

    def _split_tokens(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """The context's ids (VLMPipeline.tokenize, as generate_until feeds them) and the continuation's: the ids
        that encoding the templated prompt with the continuation appended adds after them."""
        text, artifact = self.pipe.manifest.text, self.pipe.artifact
        (context_ids,) = self.pipe.tokenize([prompt])
        template = text.prompt_template + continuation.replace("{", "{{").replace("}", "}}")
        whole = encode_prompt(artifact.tokenizer, prompt, text.placeholder, artifact.special_ids, template).ids
        if whole[: len(context_ids)] != context_ids or len(whole) == len(context_ids):
            raise PromptError(f"loglikelihood: continuation {continuation[:40]!r} does not tokenize to tokens of its own "
                              "after the templated prompt (it merges with the prompt's last token, or is empty)")
        return context_ids, whole[len(context_ids):]


def _forced(tokens: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """A decode_steps chooser that ignores the logits and yields `tokens` in order (teacher forcing)."""
    queue: Iterator[int] = iter(tokens)
    return lambda logits: np.full(logits.shape[0], next(queue), np.int64)


def _logsumexp(values: np.ndarray) -> float:
    top = values.max()
    return float(top + np.log(np.exp(values - top).sum()))


def _batches(requests: list[Request], size: int) -> Iterator[list[Request]]:
    """Consecutive requests in chunks of at most `size` that share their generation kwargs."""
    chunk: list[Request] = []
    for request in requests:
        if chunk and (len(chunk) == size or request.option != chunk[0].option):
            yield chunk
            chunk = []
        chunk.append(request)
    if chunk:
        yield chunk


def _until(kwargs: dict[str, Any]) -> list[str]:
    until = kwargs.get("until") or []
    return [until] if isinstance(until, str) else [str(stop) for stop in until]


def _cut(text: str, until: Sequence[str]) -> str:
    """The text up to the first of the stop strings."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ConfigError(f"--model_args {name}={value}: expected a non-negative integer")
    return int(value)


def _batch_size(value: Any) -> int:
    if str(value).startswith("auto"):
        raise ConfigError(f"--batch_size {value}: prunert needs a number (the artifact's graphs take up to their max_batch)")
    return _int("batch_size", value) if not isinstance(value, int) else value
