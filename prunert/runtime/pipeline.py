"""The runtime pipeline: preprocess -> tokenize -> content-word embeddings -> vision graph (pruned) ->
splice K visual tokens at each image's placeholder -> prefill -> decode with the KV cache.

Several images per prompt (where the host's max_images_per_prompt allows): one placeholder per image, in order,
or none (the images go where the chat template puts images). Each image is pruned to the artifact's own K, on its
own (the static vision graph's K per image), with its prompt's content words; a prompt of n images holds n * K
visual tokens. The vision graph sees images, not prompts: the prompts' images in order over the batch, in calls of
at most max_batch images (one per call with `one_image_per_vision_call`).

Family quirks come from the artifact's host adapter (prunert.runtime.host.HostAdapter): a host with
`one_image_per_vision_call` (Qwen2.5-VL) gets one vision-graph call per image; the host's own outputs go
back to it unread (kept_valid, visual_token_counts, and with the spliced layout to its position ids);
decode positions start at the host's next_position_ids.

numpy + tokenizers + one runner per graph; no torch, no transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from prunert.config import FUSED_DECODER, GenerationConfig, GraphPrecisions, RuntimeConfig
from prunert.errors import ArtifactError, ConfigError, PromptError
from prunert.runtime.artifact import Artifact
from prunert.runtime.host import SpliceLayout
from prunert.runtime.image import load_image
from prunert.runtime.decode import decode_steps, table_embedder
from prunert.runtime.finite import check_finite_outputs
from prunert.runtime.runner import HOST_INPUTS, LOGITS, DecoderSession, OnnxRuntimeRunner, Runner, cache_names, empty_past
from prunert.runtime.sampling import next_tokens
from prunert.runtime.chat import chat_format, user_turn
from prunert.runtime.text import ChatPrompt, content_word_groups, encode_prompt, text_relevance_inputs
from prunert.runtime.vision_result import (  # noqa: F401  (VisionResult, prompt_images: re-exported, the pipeline's API)
    VisionResult, check_image_count, placeholder_count, prompt_images, stack_calls as _stack_calls,
)

TokenCallback = Callable[[int, int, str], None]  # (row, token id, new text)
BACKENDS = ("onnxruntime", "ort-cuda", "ort-trt", "trt")
# The decoder graphs each backend runs, best first: the first the artifact has at the decoder's precision is used.
# ONNX Runtime's CPU kernels run the fused form (contrib ops, KV cache in place; prunert.export.fused_decoder);
# CUDA's GroupQueryAttention has no fp32 kernel and TensorRT parses standard ops only, so they run "decoder".
DECODER_GRAPHS = {"onnxruntime": (FUSED_DECODER, "decoder"), "ort-cuda": ("decoder",), "ort-trt": ("decoder",), "trt": ("decoder",)}


@dataclass
class Prefill:
    inputs_embeds: np.ndarray  # [B, L, D] left-padded
    attention_mask: np.ndarray  # [B, L]
    position_ids: np.ndarray  # [B, L] (M-RoPE: [3, B, L])
    logits: np.ndarray  # [B, L, V]
    session: DecoderSession  # holds the KV cache (on the backend's device where it can)

    @property
    def present(self) -> list[np.ndarray]:
        """Host copy of the KV cache: 2 x layers of [B, kv_heads, L, head_dim]."""
        return self.session.present()


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    kept_indices: np.ndarray  # [k] the real kept tokens' original positions (k = K per image unless slots were masked), image after image
    num_visual_tokens: int  # the images' own N, summed, of which k were kept
    kept_per_image: tuple[np.ndarray, ...] = ()  # each image's kept indices [k_i], in the prompt's image order
    tokens_per_image: tuple[int, ...] = ()  # each image's own N


@dataclass
class Timings:
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ttft_s(self) -> float:
        return self.vision_s + self.prefill_s


def make_runner(artifact: Artifact, graph: str, backend: str, precision: GraphPrecisions | str = "fp32",
                runtime: RuntimeConfig = RuntimeConfig()) -> Runner:
    """One graph of the artifact on a backend, at its role's precision (GraphPrecisions.of; a str is --precision's text)
    with that variant's session settings; runtime: threads and spinning of ONNX Runtime sessions. Backends beyond
    ONNX Runtime CPU are imported lazily; a missing package is a BackendUnavailableError that names it."""
    precision = GraphPrecisions.parse(precision).of(graph)
    try:
        spec = artifact.manifest.graph_spec(graph, precision)
    except ArtifactError as exc:
        raise ArtifactError(f"artifact '{artifact.directory}': {exc}") from None
    variant = artifact.manifest.variants.get(precision)
    session_config = dict(variant.settings.get("ort_session_config", {})) if variant else {}  # e.g. fp8 Q/DQ on CPU
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(artifact.path(spec.file), spec, runtime=runtime, session_config=session_config)
    if backend in ("ort-cuda", "ort-trt"):
        from prunert.runtime.ort_gpu import ort_gpu_runner

        return ort_gpu_runner(artifact, graph, backend, precision, spec, runtime)
    if backend == "trt":
        from prunert.runtime.trt_runner import load_trt_runner

        return load_trt_runner(artifact, graph, precision)
    raise ConfigError(f"--backend {backend!r}: unknown; expected one of {list(BACKENDS)}")


def decoder_graph(artifact: Artifact, backend: str, precision: GraphPrecisions) -> str:
    """The decoder graph `backend` runs at the decoder's precision (DECODER_GRAPHS): a variant made by `convert` or
    `calibrate` has only the standard form, so the fused one is used where the variant has it."""
    forms = DECODER_GRAPHS.get(backend, ("decoder",))  # an unknown backend fails in make_runner, naming BACKENDS
    return next((graph for graph in forms if artifact.manifest.has_graph(graph, precision.of(graph))), "decoder")


class VLMPipeline:
    def __init__(self, artifact: Artifact | Path | str, backend: str = "onnxruntime", precision: GraphPrecisions | str = "fp32",
                 runtime: RuntimeConfig = RuntimeConfig(), decoder: str | None = None):
        """precision: per graph role (GraphPrecisions, or --precision's text: "fp16", "vision=fp16,decoder=int8");
        runtime: threads and spinning of every ONNX Runtime session; decoder: the decoder graph to run (None: the
        backend's, decoder_graph(); calibration passes "decoder", the form it quantizes and records feeds of)."""
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
        self.manifest = self.artifact.manifest
        self.backend, self.precision, self.runtime = backend, GraphPrecisions.parse(precision), runtime
        self.vision = make_runner(self.artifact, "vision", backend, self.precision, runtime)
        graph = decoder or decoder_graph(self.artifact, backend, self.precision)
        self.decoder = make_runner(self.artifact, graph, backend, self.precision, runtime)
        self.timings = Timings()

    # ---- stages (public so parity can compare each one) ----------------------------------------
    def tokenize(self, prompts: Sequence[str], image_counts: Sequence[int] | None = None) -> list[list[int]]:
        """Token ids of each prompt, which holds image_counts[i] images (None: one each): a user's prompt in the
        manifest's prompt_template, with the image placeholder once per image where the user put them, or none: then
        the images go where the chat format puts them (the prompt as one user turn of that many image parts through
        chat_prompt, as llama.cpp's mtmd-cli and ollama do); a ChatPrompt (chat_prompt's) as rendered. PromptError:
        more images than the family takes, placeholders that are not one per image, or a prompt over the limits."""
        text = self.manifest.text
        counts = [1] * len(prompts) if image_counts is None else [int(count) for count in image_counts]
        if len(counts) != len(prompts):
            raise ConfigError(f"image_counts: got {len(counts)} for {len(prompts)} prompts, expected one per prompt")
        sequences = []
        for prompt, images in zip(prompts, counts):
            check_image_count(prompt, images, self.artifact.host.max_images_per_prompt, self.manifest.source.family)
            placeholders = placeholder_count(prompt, images, text.placeholder)
            rendered = self.chat_prompt(user_turn(prompt, images)) if placeholders == 0 else prompt
            # typed special tokens (`</s>`, `<|im_end|>`) are text; the template's and the placeholders' stay special
            ids = encode_prompt(self.artifact.tokenizer, rendered, text.placeholder, self.artifact.special_ids, text.prompt_template).ids
            if ids.count(text.image_token_id) != images:
                raise PromptError(f"prompt {prompt[:60]!r}: tokenizes to {ids.count(text.image_token_id)} image tokens, "
                                  f"expected {images} (one per image)")
            if len(ids) > text.max_prompt_tokens:
                raise PromptError(
                    f"prompt {prompt[:60]!r}: {len(ids)} tokens, expected at most {text.max_prompt_tokens} (the exported maximum)"
                )
            spliced = len(ids) + images * (self.manifest.budget.budget - 1)  # each placeholder becomes (at most) K tokens
            if spliced >= text.max_sequence:  # one image always fits (max_sequence = max_prompt_tokens - 1 + K + max_new_tokens)
                raise PromptError(f"prompt {prompt[:60]!r}: {images} images of K={self.manifest.budget.budget} visual tokens and "
                                  f"{len(ids) - images} text tokens make {spliced} positions, expected fewer than "
                                  f"{text.max_sequence} (the exported maximum sequence, room to generate included)")
            sequences.append(ids)
        return sequences

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
        """OpenAI-shaped messages ({"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text": ...},
        {"type": "image"}]}) rendered with the artifact's chat template (the checkpoint's own, else the family's default;
        prunert.runtime.chat): the prompt text with the image placeholder once where each image part was, ending with the
        generation prompt. A ChatPrompt, a str that tokenize, generate and the serving engine take as rendered (pass it on
        unchanged). PromptError: an unknown role, a part type other than text / image, no image part, or more than the
        family takes (the host's max_images_per_prompt)."""
        return chat_format(self.artifact).render(messages)

    def chat(self, messages: Sequence[Mapping[str, Any]], image: Any, config: GenerationConfig = GenerationConfig(),
             on_token: TokenCallback | None = None) -> Generation:
        """The assistant's answer to `messages` (chat_prompt) about `image` (a path or an RGB PIL image), or about a list
        of images, one per image part of the messages, in order."""
        return self.generate([image], [self.chat_prompt(messages)], config, on_token)[0]

    def content_words(self, prompts: Sequence[str]) -> list[list[list[int]]]:
        """Per prompt, the token ids of each content word (text relevance's input; runtime.text.content_word_groups)."""
        tokenizer, special, placeholder = self.artifact.tokenizer, self.artifact.special_ids, self.manifest.text.placeholder
        return [content_word_groups(tokenizer, prompt, special, placeholder) for prompt in prompts]

    def encode_images(self, images: Sequence[Any], prompts: Sequence[str]) -> VisionResult:
        """The vision graph on each prompt's images (images[i]: one image, or a list of them: prompt_images), each image
        with its prompt's content words -> one row per image, the prompts' images in order over the batch."""
        per_prompt = [prompt_images(item) for item in images]
        if len(per_prompt) != len(prompts):
            raise ConfigError(f"images and prompts: got {len(per_prompt)} images and {len(prompts)} prompts, expected one image "
                              "(or one list of images) per prompt")
        loaded = [load_image(image) if isinstance(image, (str, Path)) else image for group in per_prompt for image in group]
        words = self.content_words(prompts)
        groups = [words[b] for b, group in enumerate(per_prompt) for _ in group]  # each image: its prompt's content words
        host, names = self.artifact.host, {t.name for t in self.vision.spec.inputs}
        size = 1 if host.one_image_per_vision_call else self.manifest.text.max_batch  # no batch axis / the graphs' batch
        calls = [(loaded[at : at + size], groups[at : at + size]) for at in range(0, len(loaded), size)]
        pixel_inputs, tokens, kept, valid, counts, elapsed = [], [], [], [], [], 0.0
        for call_images, call_groups in calls:
            inputs = host.vision_inputs(call_images, self.artifact.preprocessor_config)  # graph inputs (+ the host's own data)
            text_embeds, text_mask = text_relevance_inputs(call_groups, self.artifact.embeddings, self.manifest.text.max_text_tokens)
            text_embeds = text_embeds.astype(self.vision.spec.input("text_embeds").dtype, copy=False)  # [b, M, D] as the graph declares
            feeds = {name: value for name, value in inputs.items() if name in names}
            start = time.perf_counter()
            out = self.vision.infer({**feeds, "text_embeds": text_embeds, "text_mask": text_mask})
            elapsed += time.perf_counter() - start
            check_finite_outputs(out, "vision", self.vision.spec.file, self.precision.vision, self.backend)  # NaN / inf: overflow
            pixel_inputs.append(inputs)
            tokens.append(out["visual_tokens"])  # [b, K, D]
            kept.append(out["kept_indices"])  # [b, K]
            valid.append(host.kept_valid(inputs, kept[-1]))  # [b, K]: slots holding a real token (tiles: not padding)
            counts.append(host.visual_token_counts(inputs, len(call_images)))  # [b]: each image's own N
        self.timings.vision_s = elapsed
        visual, indices, valid = _stack_calls(tokens, kept, valid)
        several = any(len(group) != 1 for group in per_prompt)
        return VisionResult(pixel_inputs if host.one_image_per_vision_call or len(calls) > 1 else pixel_inputs[0], visual, indices,
                            None if valid.all() else valid, np.concatenate(counts),
                            tuple(len(group) for group in per_prompt) if several else None)

    def splice(self, sequences: list[list[int]], vision: VisionResult | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replace each image placeholder of each sequence by its image's kept visual tokens (a sequence's placeholders
        take its images in order); left-pad the batch. `vision`: the VisionResult (its kept indices and the host's own
        outputs go to the host's position ids; masked slots are left out, so an image may have fewer than K), or just
        visual tokens [B, K, D], one image per sequence, for families whose positions need only the mask (LLaVA).

        -> inputs_embeds [B, L, D], attention_mask [B, L], position_ids [B, L] (or the family's layout, [3, B, L])
        """
        table, text = self.artifact.embeddings, self.manifest.text
        rows, spliced, kept = [], [], []
        for b, ids in enumerate(sequences):
            places = [at for at, token in enumerate(ids) if token == text.image_token_id]
            images = vision.image_rows(b) if isinstance(vision, VisionResult) else range(b, b + 1)
            if len(places) != len(images):
                raise ConfigError(f"sequence {b}: {len(places)} image tokens for {len(images)} images, expected one per image (tokenize)")
            pieces, row_ids, last = [], [], 0
            for at, image in zip(places, images):
                visual, indices = vision.kept(image) if isinstance(vision, VisionResult) else (vision[image], None)  # [k, D], [k]
                kept.append(indices)
                pieces += [table[ids[last:at]], visual]
                row_ids += ids[last:at] + [text.image_token_id] * len(visual)  # one placeholder per kept token
                last = at + 1
            rows.append(np.concatenate([*pieces, table[ids[last:]]]).astype(self.embeds_dtype))  # [L_i, D]
            spliced.append(row_ids + ids[last:])
        length = max(len(row) for row in rows)
        embeds = np.repeat(np.asarray(table[text.pad_token_id], self.embeds_dtype)[None, None], len(rows), 0).repeat(length, 1)
        mask = np.zeros((len(rows), length), np.int64)
        input_ids = np.full((len(rows), length), text.pad_token_id, np.int64)  # [B, L]
        for b, row in enumerate(rows):
            embeds[b, length - len(row) :] = row
            mask[b, length - len(row) :] = 1
            input_ids[b, length - len(row) :] = spliced[b]
        layout = SpliceLayout(input_ids, kept, vision.host_outputs) if isinstance(vision, VisionResult) else SpliceLayout(input_ids)
        positions = self.artifact.host.position_ids(mask, layout)
        return embeds, mask, positions

    @property
    def embeds_dtype(self) -> np.dtype:
        """The decoder graph's declared inputs_embeds type (float32; a variant with 16-bit I/O declares float16)."""
        return np.dtype(self.decoder.spec.input(HOST_INPUTS[0]).dtype)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past tensors [B, kv_heads, 0, head_dim] in the decoder graph's declared KV dtype, in its past_key_values order."""
        return empty_past(self.decoder.spec, batch)

    def run_decoder(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]):
        """One stateless decoder call with the cache in numpy: -> logits [B, S, V], present (2 x layers, in the
        order of the graph's past_key_values.* inputs; the cache tensors are found by name, runner.cache_names).
        A shared-buffer graph (the fused decoder) keeps its cache in a session: from an empty past it runs a fresh
        one; a non-empty past needs a graph whose present is past + new (kv_cache unset)."""
        if self.decoder.spec.kv_cache is not None:
            if any(p.shape[2] for p in past):
                raise ConfigError(f"{self.decoder.spec.file}: its KV cache is a {self.decoder.spec.kv_cache} buffer; a past of "
                                  f"{past[0].shape[2]} positions is fed through a decoder session (prefill), not run_decoder")
            session = self.decoder.decoder_session(self.manifest.decoder.num_layers)
            session.reset(embeds.shape[0])
            return session.run(embeds, mask, positions), session.present()
        names = cache_names(self.decoder.spec)
        out = self.decoder.infer({**dict(zip(HOST_INPUTS, (embeds, mask, positions))), **dict(zip(names.past, past))})
        return out[LOGITS], [out[name] for name in names.present]

    def prefill(self, sequences: list[list[int]], vision: VisionResult) -> Prefill:
        embeds, mask, positions = self.splice(sequences, vision)
        session = self.decoder.decoder_session(self.manifest.decoder.num_layers)
        start = time.perf_counter()
        session.reset(len(sequences))
        logits = session.run(embeds, mask, positions)  # [B, L, V]; the cache stays in the session
        self.timings.prefill_s = time.perf_counter() - start
        return Prefill(embeds, mask, positions, logits, session)

    # ---- the whole thing -------------------------------------------------------------------------
    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        config: GenerationConfig = GenerationConfig(),
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Each prompt's answer about its images: images[i] is prompt i's image, or a list of its images (one per
        placeholder, in order; prompt_images)."""
        if len(images) != len(prompts):
            raise ConfigError(f"images and prompts: got {len(images)} images and {len(prompts)} prompts, expected one image "
                              "(or one list of images) per prompt")
        if len(prompts) > self.manifest.text.max_batch:
            raise ConfigError(f"batch: got {len(prompts)} prompts, expected at most {self.manifest.text.max_batch} (the exported maximum)")
        self.timings = Timings()
        per_prompt = [prompt_images(item) for item in images]
        sequences = self.tokenize(prompts, [len(group) for group in per_prompt])  # before any image is read
        vision = self.encode_images(per_prompt, prompts)
        state = self.prefill(sequences, vision)
        tokens = self.decode(state, config, on_token)
        results = []
        eos = set(self.manifest.text.eos_token_ids)
        for row, ids in enumerate(tokens):
            finish = "eos" if ids and ids[-1] in eos else "length"
            text = self.artifact.tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
            kept, counts = vision.prompt_kept(row)
            results.append(Generation(text, ids, finish, np.concatenate(kept), sum(counts), kept, counts))
        return results

    def decode(self, state: Prefill, config: GenerationConfig = GenerationConfig(), on_token: TokenCallback | None = None) -> list[list[int]]:
        """Each row's token ids after a prefill (its EOS id last where one ended it), through the one decode loop
        (prunert.runtime.decode.decode_steps): at most config.max_new_tokens, capped by the artifact's max_sequence.
        Each row samples from its own generator seeded with config.seed, so its tokens do not depend on the batch."""
        out: list[list[int]] = [[] for _ in range(state.attention_mask.shape[0])]
        start, calls = time.perf_counter(), 0
        for step in decode_steps(state.session, state.logits[:, -1], *self.decode_inputs(state, config)):
            for row in np.flatnonzero(step.active):
                out[row].append(int(step.tokens[row]))
                if on_token is not None:  # the row's final token flushes held-back text
                    on_token(int(row), int(step.tokens[row]), self._new_text(out[row], bool(step.last[row])))
            calls = step.index  # decoder calls so far
        self.timings.decode_steps += calls
        self.timings.decode_s = time.perf_counter() - start
        return out

    def decode_inputs(self, state: Prefill, config: GenerationConfig) -> tuple:
        """What the decode loop needs after `state`, in decode_steps' order from `mask`: the prefill's mask, each row's
        next positions, the embedder, one chooser per row (its own generator), each row's step budget (max_new_tokens,
        capped so its own length stays within max_sequence), the EOS ids and the pad id."""
        text, mask = self.manifest.text, state.attention_mask
        positions = self.artifact.host.next_position_ids(state.position_ids, mask)  # [B, 1] (M-RoPE: [3, B, 1])
        choosers = [_chooser(config) for _ in range(mask.shape[0])]
        budgets = [int(min(config.max_new_tokens, text.max_sequence - length)) for length in mask.sum(axis=1)]
        return (mask, positions, table_embedder(self.artifact.embeddings, self.embeds_dtype), choosers, budgets,
                text.eos_token_ids, text.pad_token_id)

    def text_of(self, ids: Sequence[int]) -> str:
        """Generated ids (EOS ids excluded) as text, special tokens skipped."""
        return self.artifact.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _new_text(self, ids: list[int], last: bool = False) -> str:
        """Text added by the last token. A character split over byte-level tokens decodes to U+FFFD
        until complete, so trailing U+FFFD is held back (and emitted later) unless this is the last token."""
        decode = self.artifact.tokenizer.decode
        before = decode(ids[:-1], skip_special_tokens=True).rstrip("\ufffd")
        now = decode(ids, skip_special_tokens=True)
        return (now if last else now.rstrip("\ufffd"))[len(before) :]


def _chooser(config: GenerationConfig) -> Callable[[np.ndarray], np.ndarray]:
    """A row's chooser: logits [1, V] -> [1], sampling with a generator of its own seeded by config.seed."""
    rng = np.random.default_rng(config.seed)
    return lambda logits: next_tokens(logits, config, rng)
