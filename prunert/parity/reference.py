"""Stage-by-stage parity: the exported pipeline (ONNX Runtime) against the PyTorch reference, which
is the Hugging Face model (its own image processor, tokenizer, `get_image_features`, language model
and `generate`) plus the same selection op run in torch.

The reference never runs the adapter's own vision code: its unpruned visual tokens (and a method's
cls_attention / patch_keys) come from the adapter's `hf_vision_features` hook, i.e. HF's processor and
HF's get_image_features with the checkpoint's feature layer and select strategy (extras from that same
tower run), and the selection runs on those. Stage "visual tokens before pruning" compares the adapter's
vision_features (what the vision graph computes) with HF's, every token HF gives the LLM, so an adapter
that reads the tower differently from HF (a wrong N, a dropped or kept [CLS] row) fails there.

Families with their own position ids (the adapter's `hf_position_ids` hook, Qwen2.5-VL's M-RoPE): the
reference runs HF's language model with HF's own positions of the pruned prompt (HF's get_rope_index on
the unpruned prompt, restricted to the kept tokens), and greedy decoding is a short loop over HF's
forward with its KV cache and explicit positions (cache length + rope_deltas, HF's decode rule), because
`generate` recomputes M-RoPE positions from input ids, which a pruned prompt of embeddings does not have."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from prunert import pruning_ops
from prunert.adapters import resolve_source
from prunert.config import GRAPH_NAMES, GenerationConfig, GraphPrecisions, ParityTolerances, RuntimeConfig
from prunert.errors import ParityError, PromptError
from prunert.export.graphs import selection_module
from prunert.export.pipeline import fit_budget, load_export_adapter
from prunert.manifest import load_manifest
from prunert.metrics import common_rows
from prunert.parity.report import TIE, Check, ParityReport
from prunert.runtime.image import load_image
from prunert.runtime.pipeline import VisionResult, VLMPipeline
from prunert.runtime.text import text_relevance_inputs


def parity_bars(artifact_dir: Path, precision: GraphPrecisions, greedy_tokens: int = ParityTolerances.greedy_tokens
                ) -> tuple[GraphPrecisions, ParityTolerances]:
    """The precisions whose bars apply, and those bars: a role at "fp32" runs the top-level graphs, whose weights are
    in the artifact's export dtype (manifest source.dtype: fp16 after `export --dtype fp16`), so it gets that dtype's.
    A bad greedy_tokens is the error before the artifact is read."""
    ParityTolerances(greedy_tokens=greedy_tokens)
    dtype = load_manifest(artifact_dir, verify_hashes=False).source.dtype
    exported = replace(precision, **{role: dtype for role in GRAPH_NAMES if getattr(precision, role) == "fp32"})
    return exported, ParityTolerances.for_precisions(exported, greedy_tokens=greedy_tokens)


def run_parity(
    artifact_dir: Path,
    image: Path | Sequence[Path],
    prompt: str,
    tolerances: ParityTolerances | None = None,
    model: str | None = None,
    backend: str = "onnxruntime",
    precision: GraphPrecisions | str = "fp32",
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ParityReport:
    """image: one image file, or several (the prompt then holds the image placeholder once per image, in order).
    precision: per graph role (or --precision's text). tolerances None: the precisions' own bars
    (ParityTolerances.for_precisions: vision-stage bars from the vision precision, decoder-stage the looser of both).

    Several images: the stages up to the kept tokens run per image (named "image i: ..."), each image through HF's
    processor and its own get_image_features as HF's processor treats every image of a prompt; token ids, prefill
    logits and greedy tokens run on the whole prompt, the reference with each image's kept tokens at its placeholder
    and, where the family has its own positions (hf_position_ids), HF's positions of the whole multi-image prompt."""
    precision = GraphPrecisions.parse(precision)
    tolerances = tolerances or parity_bars(artifact_dir, precision)[1]
    paths = [Path(image)] if isinstance(image, (str, Path)) else [Path(path) for path in image]
    pipe = VLMPipeline(artifact_dir, backend=backend, precision=precision, runtime=runtime)
    manifest = pipe.manifest
    ids = pipe.tokenize([prompt], [len(paths)])  # the family's image count and one placeholder per image, before HF loads
    if prompt.count(manifest.text.placeholder) != len(paths):
        raise PromptError(f"parity --prompt {prompt[:60]!r}: no image placeholder {manifest.text.placeholder!r}; expected it once "
                          f"per image ({len(paths)}): parity compares the prompt in the model's prompt template, as HF takes it")
    source = resolve_source(model or manifest.source.model)
    adapter = load_export_adapter(source)
    budget = pruning_ops.config_from_params(manifest.budget.method, manifest.budget.params, manifest.budget.budget)
    pixels = adapter.exported_pixel_range(manifest.family_config)  # export's --min/--max-pixels (default: the checkpoint's)
    fit_budget(adapter, budget, pixels)  # the adapter's preprocessing as at export (Qwen2.5-VL: min_pixels raised to K)
    report = ParityReport(str(artifact_dir), source.label, source.synthetic, backend, precision.label, asdict(tolerances),
                          ", ".join(str(path) for path in paths), prompt, note=source.note, runtime=runtime.record())
    tol = tolerances
    pictures = [load_image(path) for path in paths]
    labels = [""] if len(pictures) == 1 else [f"image {number}: " for number in range(1, len(pictures) + 1)]
    same = source.revision == manifest.source.revision
    report.add("source", "checkpoint revision", source.revision, f"== {manifest.source.revision} (exported from)", same,
               "" if same else "the reference weights differ from the exported ones: re-export, or pass --model")

    # 1. preprocessing, per image: numpy re-implementation vs the Hugging Face processor
    ref_pixels = [adapter.hf_vision_inputs([picture], source.path) for picture in pictures]
    for label, picture, refs in zip(labels, pictures, ref_pixels):
        ours_pixels = pipe.artifact.host.vision_inputs([picture], pipe.artifact.preprocessor_config)
        for name, ref in refs.items():
            report.add_max_abs(f"{label}pixels:{name}", ref.numpy(), ours_pixels[name], tol.pixels_max_abs)

    # 2. tokens: the runtime's tokenizer.json vs the Hugging Face tokenizer
    ref_ids = adapter.hf_token_ids(manifest.text.prompt_template.format(prompt=prompt), source.path)
    report.add("token ids", "equal", "yes" if ids[0] == ref_ids else f"{len(ids[0])} vs {len(ref_ids)} ids", "identical", ids[0] == ref_ids)

    # 3. per image: visual tokens before pruning (the adapter's vision_features vs HF's get_image_features, every token),
    #    then vision + selection: the selection on HF's features is the reference; kept index sets equal, kept tokens close
    vision = pipe.encode_images([pictures], [prompt])
    needs = pruning_ops.method_spec(budget.method).needs
    with torch.no_grad():
        table = adapter.embedding_table().detach().float().numpy()
        text_embeds, text_mask = text_relevance_inputs(pipe.content_words([prompt]), table, manifest.text.max_text_tokens)
        text_inputs = {"text": torch.from_numpy(text_embeds), "text_mask": torch.from_numpy(text_mask)}
        select = selection_module(adapter, budget, manifest.family_config)  # the exported graph's selection, in torch
    kept_refs = [_compare_image(report, label, adapter, source.path, picture, refs, select, text_inputs, needs, vision, row, tol)
                 for row, (label, picture, refs) in enumerate(zip(labels, pictures, ref_pixels))]

    # 4. prefill logits over the whole spliced prompt (without masked slots: the unpruned tile layout's padding)
    state = pipe.prefill(ids, vision)
    ref_embeds = _reference_embeds(adapter, ref_ids, manifest.text.image_token_id, [visual for visual, _ in kept_refs])
    kept = [indices[0] for _, indices in kept_refs]  # per image [k_i]
    positions = adapter.hf_position_ids(ref_ids, pictures, source.path, kept)  # ([..., 1, L], rope_deltas), or None: HF's default
    with torch.no_grad():
        extra = {} if positions is None else {"position_ids": positions[0]}
        ref_logits = adapter.model(inputs_embeds=ref_embeds, attention_mask=torch.ones(ref_embeds.shape[:2], dtype=torch.long), **extra).logits
    report.add_max_abs("prefill logits", ref_logits.numpy(), state.logits, tol.logits_max_abs)
    report.add_cosine("prefill logits", ref_logits.numpy(), state.logits, tol.logits_min_cosine)
    report.add_kl("prefill logits", ref_logits.numpy(), state.logits, tol.logits_max_kl)

    # 5. first N greedy tokens: identical, except after a step whose top-2 margin is within tolerance
    ours_tokens = pipe.decode(state, GenerationConfig(max_new_tokens=tol.greedy_tokens))[0]
    if positions is None:
        ref_tokens, ref_scores = _reference_greedy(adapter, ref_embeds, manifest.text, tol.greedy_tokens)
    else:
        ref_tokens, ref_scores = _reference_greedy_positions(adapter, ref_embeds, *positions, manifest.text, tol.greedy_tokens)
    report.checks.append(_compare_greedy(ours_tokens, ref_tokens, ref_scores, tol))
    return report


def _compare_image(report: ParityReport, label: str, adapter, model_dir: Path, picture, ref_pixels: dict[str, torch.Tensor],
                   select, text_inputs: dict[str, torch.Tensor], needs: tuple[str, ...], vision: VisionResult, row: int,
                   tol: ParityTolerances) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages "visual tokens before pruning" (and a method's extras), "kept indices" and "kept tokens" of one image
    (vision row `row`), each named with `label` -> the reference's kept tokens [1, k, D] and indices [1, k] where HF
    has a token (a static layout's masked slots left out)."""
    with torch.no_grad():
        ours_features = adapter.vision_features(*[ref_pixels[name] for name in adapter.vision_input_names], extras=needs)
        features, valid = adapter.hf_vision_features([picture], model_dir, needs)  # HF's own; valid [1, *slots]
        ref_visual, kept = select({**features, **text_inputs})  # [1, K, D], [1, K]
    for name in ("tokens", *needs):
        _compare_before_pruning(report, label, name, features[name], ours_features[name], valid, tol)
    real = valid.reshape(1, -1)[0, kept[0]]  # [K] bool: kept slots holding one of HF's tokens (not a masked slot)
    _compare_kept(report, label, vision, row, ref_visual, kept, real, tol)
    return ref_visual[:, real], kept[:, real]  # all slots, except where a static layout has masked ones


def _compare_kept(report: ParityReport, label: str, vision: VisionResult, row: int, ref_visual: torch.Tensor, kept: torch.Tensor,
                  real: torch.Tensor, tol: ParityTolerances) -> None:
    """Stages "kept indices" (set overlap with the reference's kept [1, K]) and "kept tokens" (vision row `row` vs
    ref_visual [1, K, D] where both kept the same index and HF has a token there: real [K] bool), named with `label`."""
    ours_kept, ours_tokens = vision.kept_indices[row], vision.visual_tokens[row : row + 1]  # [K], [1, K, D]
    ours_set, ref_set = set(ours_kept.tolist()), set(kept[0].tolist())
    overlap = len(ours_set & ref_set) / len(ref_set)
    detail = "" if ours_set == ref_set else f"{len(ours_set ^ ref_set) // 2} of {len(ref_set)} differ"
    bound = "all" if tol.kept_min_overlap >= 1 else f">= {tol.kept_min_overlap:g}"
    report.add(f"{label}kept indices", "set overlap", overlap, bound, overlap >= tol.kept_min_overlap, detail)
    # tokens are compared where both kept the same original index (a swapped token shifts every later row), HF has one
    ours_rows, ref_rows = common_rows(ours_kept, kept[0].numpy())
    ours_rows, ref_rows = ours_rows[real.numpy()[ref_rows]], ref_rows[real.numpy()[ref_rows]]
    stage = f"{label}kept tokens" if ours_set == ref_set else f"{label}kept tokens ({len(ours_rows)} both kept)"
    if len(ours_rows):
        report.add_max_abs(stage, ref_visual.numpy()[:, ref_rows], ours_tokens[:, ours_rows], tol.tokens_max_abs)
        report.add_cosine(stage, ref_visual.numpy()[:, ref_rows], ours_tokens[:, ours_rows], tol.tokens_min_cosine)
    else:
        report.add(stage, "tokens compared", 0, ">= 1", False, "no kept index in common")


def _compare_before_pruning(report: ParityReport, label: str, name: str, hf: torch.Tensor, ours: torch.Tensor, valid: torch.Tensor,
                            tol: ParityTolerances) -> None:
    """Stage "visual tokens before pruning" (and "<extra> before pruning" for a method's cls_attention /
    patch_keys), named with `label`: every one of HF's tokens (valid [1, *slots]) against the adapter's, max-abs and cosine."""
    stage = label + ("visual tokens before pruning" if name == "tokens" else f"{name} before pruning")
    if tuple(ours.shape) != tuple(hf.shape):
        report.add(stage, "shape", str(tuple(ours.shape)), f"== {tuple(hf.shape)} (Hugging Face's)", False)
        return
    expected, actual = hf[valid].numpy(), ours[valid].numpy()  # [V, ...]: the slots HF has a token for
    report.add_max_abs(stage, expected, actual, tol.tokens_max_abs)
    report.add_cosine(stage, expected, actual, tol.tokens_min_cosine)


def _reference_embeds(adapter, ids: list[int], image_token_id: int, visual: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """HF's input embeddings of `ids` with each image token replaced by its image's visual tokens ([1, k_i, D]; one
    tensor for a prompt of one image, else one per image token, in order) -> [1, L, D]."""
    visuals = [visual] if isinstance(visual, torch.Tensor) else list(visual)
    places = [at for at, token in enumerate(ids) if token == image_token_id]
    if len(places) != len(visuals):
        raise ParityError(f"reference prompt: {len(places)} image tokens for {len(visuals)} images, expected one per image")
    pieces, last = [], 0
    with torch.no_grad():
        embed = adapter.model.get_input_embeddings()
        for at, tokens in zip(places, visuals):
            pieces += [embed(torch.tensor([ids[last:at]], dtype=torch.long)), tokens]
            last = at + 1
        pieces.append(embed(torch.tensor([ids[last:]], dtype=torch.long)))
    return torch.cat(pieces, dim=1)  # [1, L, D]


def _reference_greedy(adapter, embeds: torch.Tensor, text, count: int):
    with torch.no_grad():
        out = adapter.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=count,
            do_sample=False,
            eos_token_id=list(text.eos_token_ids) or None,
            pad_token_id=text.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0].tolist(), [s[0].numpy() for s in out.scores]


def _reference_greedy_positions(adapter, embeds: torch.Tensor, positions: torch.Tensor, deltas: torch.Tensor, text, count: int):
    """Greedy decoding through HF's forward with its KV cache and explicit position ids: prefill with
    `positions` [..., 1, L], then each step at cache length c with position c + deltas (HF's decode rule,
    compute_3d_position_ids), broadcast over the leading dims. -> (tokens, per-step logits), like generate."""
    from transformers import DynamicCache

    eos = set(text.eos_token_ids)
    tokens, scores, length = [], [], embeds.shape[1]
    cache = DynamicCache(config=adapter.model.config)
    step_embeds, step_positions = embeds, positions
    with torch.no_grad():
        for step in range(count):
            mask = torch.ones(1, length + step, dtype=torch.long)
            out = adapter.model(inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_positions,
                                past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]  # [V]
            scores.append(logits.numpy())
            token = int(logits.argmax())
            tokens.append(token)
            if token in eos:
                break
            step_embeds = adapter.model.get_input_embeddings()(torch.tensor([[token]]))  # [1, 1, D]
            place = (length + step) + deltas.reshape(-1)[0]
            step_positions = torch.full((*positions.shape[:-1], 1), int(place), dtype=torch.long)  # [..., 1, 1]
    return tokens, scores


def _compare_greedy(ours: list[int], ref: list[int], scores: list[np.ndarray], tol: ParityTolerances) -> Check:
    bound = "identical"
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        top2 = np.sort(scores[step])[-2:]
        margin = float(top2[1] - top2[0])
        if margin <= tol.tie_margin:
            return Check("greedy tokens", f"first {len(ref)}", f"{step}/{len(ref)} agree", bound, TIE,
                         f"step {step}: top-2 margin {margin:.2g} <= tie margin {tol.tie_margin:g}; later steps not compared")
        return Check("greedy tokens", f"first {len(ref)}", f"{step}/{len(ref)} agree", bound, "FAIL",
                     f"step {step}: ours {a}, reference {b}, margin {margin:.3g}")
    same = len(ours) == len(ref)
    detail = "" if same else f"lengths {len(ours)} vs {len(ref)}"
    return Check("greedy tokens", f"first {len(ref)}", f"{min(len(ours), len(ref))}/{len(ref)} agree", bound, "PASS" if same else "FAIL", detail)
