"""Checks at load that an artifact's manifest agrees with itself, its graphs' declared shapes, its tokenizer and its
preprocessor config, so values that still parse but contradict each other are one ArtifactError before anything runs.

prunert.manifest parses (standard library only: types, keys, paths inside the directory, hashes); this module
checks meaning, with the method registry and the tokenizer the runtime has loaded anyway. Artifact calls it.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import MISSING, fields
from typing import Any, Mapping

from prunert.errors import ArtifactError, ConfigError
from prunert.config import FUSED_DECODER
from prunert.manifest import KV_SHARED_BUFFER, MANIFEST_NAME, GraphSpec, Manifest, TensorSpec
from prunert.runtime.runner import LOGITS, cache_names


def _fail(key: str, value: Any, expected: str) -> ArtifactError:
    return ArtifactError(f"{MANIFEST_NAME} '{key}' is {json.dumps(value, default=str)}, {expected}")


def check_manifest(manifest: Manifest) -> None:
    """Every cross-field and manifest-vs-graph-spec check; the first contradiction is an ArtifactError."""
    from prunert.adapters import FAMILIES

    if manifest.source.family not in FAMILIES:
        raise _fail("source.family", manifest.source.family, f"expected one of {sorted(FAMILIES)}")
    check_budget(manifest)
    check_text(manifest)
    check_decoder(manifest)
    for where, spec in _graphs(manifest, "vision"):
        check_vision_outputs(manifest, where, spec)


def _graphs(manifest: Manifest, graph: str) -> list[tuple[str, GraphSpec]]:
    """The graph at every precision the artifact has: ("graphs.vision", spec), ("variants.fp16.graphs.vision", spec)."""
    found = [(f"graphs.{graph}", manifest.graphs[graph])] if graph in manifest.graphs else []
    return found + [(f"variants.{p}.graphs.{graph}", v.graphs[graph]) for p, v in manifest.variants.items() if graph in v.graphs]


def check_budget(manifest: Manifest) -> None:
    budget = manifest.budget
    if budget.budget < 1:
        raise _fail("budget.budget", budget.budget, "expected K >= 1 kept visual tokens")
    if budget.num_visual_tokens < budget.budget:
        raise _fail("budget.num_visual_tokens", budget.num_visual_tokens, f"expected N >= the budget K={budget.budget}")
    check_method_params(budget.method, budget.params)


def check_method_params(method: str, params: dict[str, Any]) -> None:
    """The recorded parameters against the method's config dataclass: known names, the field's type, finite and
    non-negative numbers, and whatever the config itself refuses (ResPrune epsilon > 0, ...)."""
    from prunert import pruning_ops

    if method not in pruning_ops.methods():
        raise _fail("budget.method", method, f"expected one of {pruning_ops.methods()}")
    config_type = pruning_ops.method_spec(method).config_type
    known = {f.name: f for f in fields(config_type)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise _fail("budget.params", params, f"has {unknown}, which {method} does not take (expected only {sorted(known)})")
    for name, value in params.items():
        default = known[name].default
        kind = type(default) if default is not MISSING else None
        key = f"budget.params.{name}"
        if kind is not None and not _same_kind(value, kind):
            raise _fail(key, value, f"expected {kind.__name__} (as {config_type.__name__}.{name})")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= 0):
            raise _fail(key, value, "expected a finite number >= 0")
    try:
        config_type(**params)
    except ConfigError as exc:
        raise ArtifactError(f"{MANIFEST_NAME} 'budget.params': {exc}") from None


def _same_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_text(manifest: Manifest) -> None:
    text, vocab = manifest.text, manifest.decoder.vocab_size
    if not text.eos_token_ids:
        raise _fail("text.eos_token_ids", [], "expected at least one end-of-sequence token id")
    for key, value in token_ids(manifest):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise _fail(key, value, f"expected a token id in 0..{vocab - 1} (decoder.vocab_size {vocab})")
    for key in ("max_prompt_tokens", "max_text_tokens", "max_batch"):
        if getattr(text, key) < 1:
            raise _fail(f"text.{key}", getattr(text, key), "expected >= 1")
    one_prompt = text.max_prompt_tokens - 1 + manifest.budget.budget  # the placeholder becomes K visual tokens
    if text.max_sequence < one_prompt:
        raise _fail("text.max_sequence", text.max_sequence,
                    f"expected >= {one_prompt} (one prompt: max_prompt_tokens {text.max_prompt_tokens} - 1 + budget {manifest.budget.budget})")
    check_prompt_template(text.prompt_template)


def token_ids(manifest: Manifest) -> list[tuple[str, Any]]:
    """(manifest key, id) of every special token id the manifest records (bos only when set)."""
    text = manifest.text
    ids = [("text.image_token_id", text.image_token_id), ("text.pad_token_id", text.pad_token_id)]
    ids += [(f"text.eos_token_ids[{i}]", value) for i, value in enumerate(text.eos_token_ids)]
    return ids + ([("text.bos_token_id", text.bos_token_id)] if text.bos_token_id is not None else [])


def check_prompt_template(template: str) -> None:
    """The template holds `{prompt}` exactly once and no other field, conversion or format spec."""
    try:
        parsed = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise _fail("text.prompt_template", template, f"is not a format string ({exc}); expected text around one {{prompt}}") from None
    if parsed != [("prompt", None, "")]:
        fields_found = ["{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}" for name, conv, spec in parsed]
        raise _fail("text.prompt_template", template, f"has the fields {fields_found}; expected exactly one {{prompt}} and no other field")


def check_decoder(manifest: Manifest) -> None:
    dec = manifest.decoder
    for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
        if getattr(dec, name) < 1:
            raise _fail(f"decoder.{name}", getattr(dec, name), "expected >= 1")
    for where, spec in _graphs(manifest, "decoder") + _graphs(manifest, FUSED_DECODER):
        if spec.kv_cache == KV_SHARED_BUFFER and "cache" not in spec.dim_ranges:
            raise _fail(f"{where}.dim_ranges", sorted(spec.dim_ranges), "a shared-buffer KV cache needs the range of its 'cache' dim")
        _dims_agree(where, _tensor(spec, "inputs_embeds", where), {-1: ("decoder.hidden_size", dec.hidden_size)})
        _dims_agree(where, _tensor(spec, LOGITS, where, output=True), {-1: ("decoder.vocab_size", dec.vocab_size)})
        past = [spec.input(name) for name in cache_names(spec).past]
        if len(past) != 2 * dec.num_layers:
            raise _fail("decoder.num_layers", dec.num_layers, f"but {where} has {len(past)} past key/value inputs (expected 2 per layer)")
        for tensor in past:
            if len(tensor.shape) != 4:
                raise _fail(f"{where}.inputs", tensor.name, f"has shape {list(tensor.shape)}; expected [batch, kv_heads, past, head_dim]")
            _dims_agree(where, tensor, {1: ("decoder.num_kv_heads", dec.num_kv_heads), 3: ("decoder.head_dim", dec.head_dim)})


def check_vision_outputs(manifest: Manifest, where: str, spec: GraphSpec) -> None:
    """visual_tokens [batch, K, D] and kept_indices [batch, K]: a static K is the budget, a static D the LLM's
    hidden size; a symbolic K (Qwen2.5-VL unpruned: "merged") is per image and accepted."""
    budget, hidden = manifest.budget.budget, manifest.decoder.hidden_size
    tokens = _tensor(spec, "visual_tokens", where, output=True)
    kept = _tensor(spec, "kept_indices", where, output=True)
    if len(tokens.shape) != 3 or len(kept.shape) != 2:
        raise ArtifactError(f"{MANIFEST_NAME} '{where}': outputs visual_tokens {tokens.describe()} and kept_indices "
                            f"{kept.describe()}, expected [batch, K, D] and [batch, K]")
    _dims_agree(where, tokens, {1: ("budget.budget", budget), 2: ("decoder.hidden_size", hidden)})
    _dims_agree(where, kept, {1: ("budget.budget", budget)})


def _tensor(spec: GraphSpec, name: str, where: str, output: bool = False) -> TensorSpec:
    tensors = spec.outputs if output else spec.inputs
    found = [tensor for tensor in tensors if tensor.name == name]
    if not found:
        kind = "outputs" if output else "inputs"
        raise ArtifactError(f"{MANIFEST_NAME} '{where}.{kind}': no {name!r} (it has {[t.name for t in tensors]})")
    return found[0]


def _dims_agree(where: str, tensor: TensorSpec, expected: Mapping[int, tuple[str, int]]) -> None:
    """Each static dim of the tensor at an axis equals the manifest value named for it; symbolic dims pass."""
    for axis, (key, value) in expected.items():
        if -len(tensor.shape) <= axis < len(tensor.shape) and isinstance(tensor.shape[axis], int) and tensor.shape[axis] != value:
            raise _fail(key, value, f"but {where} declares {tensor.name} {tensor.describe()}")


def check_tokenizer(manifest: Manifest, tokenizer: Any) -> None:
    """The recorded token ids exist in the tokenizer, and the image token is the id the manifest says."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for key, value in token_ids(manifest):
        if value >= size:
            raise _fail(key, value, f"but {manifest.text.tokenizer} has {size} tokens (ids 0..{size - 1})")
    image_id = tokenizer.token_to_id(manifest.text.image_token)
    if image_id != manifest.text.image_token_id:
        raise _fail("text.image_token_id", manifest.text.image_token_id,
                    f"but {manifest.text.tokenizer} gives {manifest.text.image_token!r} the id {image_id}")


PIL_RESAMPLE_CODES = range(6)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad")
_COUNTS = ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels")


def check_preprocessor_config(name: str, config: Any) -> None:
    """The Hugging Face image-processor keys any family reads have the types HF gives them (other keys pass)."""
    if not isinstance(config, dict):
        raise ArtifactError(f"{name}: is {type(config).__name__}, expected a JSON object (a Hugging Face preprocessor config)")

    def bad(key: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{name}: '{key}' is {json.dumps(config[key])}, expected {expected}")

    for key in _FLAGS:
        if key in config and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    for key in _COUNTS:
        if key in config and not _positive_int(config[key]):
            raise bad(key, "an integer >= 1")
    if "rescale_factor" in config and not (_number(config["rescale_factor"]) and config["rescale_factor"] > 0):
        raise bad("rescale_factor", "a number > 0")
    resample = config.get("resample")
    if "resample" in config and not (isinstance(resample, int) and not isinstance(resample, bool) and resample in PIL_RESAMPLE_CODES):
        raise bad("resample", "a Pillow resample code 0..5")
    for key in ("image_mean", "image_std"):
        value = config.get(key)
        if key in config and not (_number(value) or (isinstance(value, list) and len(value) == 3 and all(map(_number, value)))):
            raise bad(key, "a number or 3 numbers (R, G, B)")
    if any(v == 0 for v in _as_list(config.get("image_std"))):
        raise bad("image_std", "non-zero values")
    for key in ("size", "crop_size"):
        if key in config and not _size(config[key]):
            raise bad(key, "an integer >= 1, [height, width] or an object of integers >= 1")
    pinpoints = config.get("image_grid_pinpoints")
    if "image_grid_pinpoints" in config and not (isinstance(pinpoints, list) and pinpoints and all(
            isinstance(p, list) and len(p) == 2 and all(map(_positive_int, p)) for p in pinpoints)):
        raise bad("image_grid_pinpoints", "a non-empty list of [height, width] integers >= 1")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _size(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) == 2 and all(map(_positive_int, value))
    if isinstance(value, dict):
        return bool(value) and all(v is None or _positive_int(v) for v in value.values())
    return _positive_int(value)
