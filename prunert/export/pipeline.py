"""Export a checkpoint into an artifact directory: vision graph, decoder graph, embedding table,
tokenizer, preprocessor config and manifest.json. Validated with ONNX Runtime after export.

The directory is built under a temporary name beside the target and renamed into place only after
validation, so a crash or Ctrl-C leaves nothing that `prunert run` would accept. prunert.artifact_publish
does the rename: exclusive for a new --out, a journaled swap for --overwrite (which replaces only an artifact).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import prunert
from prunert import pruning_ops
from prunert.adapters import ModelSource, export_adapter_class, resolve_source
from prunert.adapters.hf_loading import checkpoint_dtype
from prunert.artifact_publish import PARTIAL, Staging, clean_stale, publish, recover_swap, refuse_unless_artifact
from prunert.config import FUSED_DECODER, SCHEMA_VERSION, BudgetConfig, ExportConfig, PixelRange
from prunert.errors import ArtifactError, ExportError, ModelSourceError, PrunertError
from prunert.export.adapter import PREPROCESSOR_CONFIG, ExportAdapter
from prunert.export.fused_decoder import build_fused_decoder
from prunert.export.fused_validate import check_fused_decoder, fused_reference
from prunert.export.graphs import VisionPruneGraph, decoder_dims, decoder_export_spec, decoder_module, kept_dim, vision_export_spec
from prunert.export.validate import check_graph, check_symbolic_dims, reference
from prunert.export.weights import own_weights, release_weights
from prunert.manifest import MANIFEST_NAME, DecoderSpec, GraphSpec, Manifest, SourceSpec, TensorSpec, TextSpec, BudgetSpec, hash_directory

VERSIONED_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers")


def load_export_adapter(source: ModelSource, dtype: str = "fp32") -> ExportAdapter:
    """The family's export adapter on the checkpoint, its torch weights in `dtype` (an export dtype)."""
    return export_adapter_class(source.family)(source.path, dtype=dtype)


def fit_budget(adapter: ExportAdapter, budget: BudgetConfig, pixels: PixelRange = PixelRange()) -> None:
    """The adapter's `fit_pixel_range(pixels)` (export's --min-pixels / --max-pixels; parity: the manifest's record), then
    its `fit_budget(budget)`: K checked against N (default), or the adapter adapts its preprocessing to K where N varies
    per image. Export and parity both call it. A method that needs the tower's [CLS] token (MethodSpec.needs_cls) on a
    tower without one (adapter.has_cls_token) is refused first, in one line."""
    pruning_ops.check_applies(budget.method, adapter.has_cls_token)
    adapter.fit_pixel_range(pixels)
    adapter.fit_budget(budget)


def export_artifact(
    model: str,
    out_dir: Path,
    budget: BudgetConfig,
    cfg: ExportConfig = ExportConfig(),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    pixels: PixelRange = PixelRange(),
) -> Manifest:
    """pixels: --min-pixels / --max-pixels (the adapter's fit_pixel_range takes or refuses them)."""
    out_dir = Path(out_dir)
    recover_swap(out_dir)  # a swap a kill cut short: the previous artifact is put back first
    if os.path.lexists(out_dir):
        if not overwrite:
            raise ArtifactError(f"--out '{out_dir}': already exists; choose another directory or pass --overwrite")
        refuse_unless_artifact(out_dir, "--out")  # --overwrite replaces only a prunert artifact
    source = resolve_source(model)
    cfg = replace(cfg, dtype=cfg.dtype or checkpoint_dtype(source.config))  # None: the checkpoint's own
    log(f"loading {source.label} at {cfg.dtype}" + (" (synthetic checkpoint: seeded random weights)" if source.synthetic else "")
        + (f" ({source.note})" if source.note else ""))
    adapter = load_export_adapter(source, cfg.dtype)
    own_weights(adapter.model)  # held once, as the graphs read them: no transposed copy in the exporter, no file pages beside
    fit_budget(adapter, budget, pixels)
    pruning_ops.method_params(budget)  # unknown method -> ConfigError before any work
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not (source.path / name).is_file():
            raise ModelSourceError(f"--model {source.label!r}: no {name} in the checkpoint directory")

    created_parent = not out_dir.parent.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in clean_stale(out_dir):
        log(f"removed {leftover} (left by a prunert process that is gone)")
    staging = Staging.create(out_dir.parent, f".{out_dir.name}.{PARTIAL}-")  # owner record + payload/, umask's mode
    try:
        manifest = _write_artifact(staging.payload, source, adapter, budget, cfg, log)
        publish(staging, out_dir, overwrite)  # exclusive rename, or the journaled swap of an artifact
    finally:
        staging.remove()
        if created_parent and not out_dir.exists():
            with contextlib.suppress(OSError):
                out_dir.parent.rmdir()  # created only for this export and still empty: leave no trace
    log(f"wrote {out_dir} ({len(manifest.files)} files, manifest.json)")
    return manifest


def _write_artifact(staging: Path, source: ModelSource, adapter: ExportAdapter, budget: BudgetConfig, cfg: ExportConfig, log) -> Manifest:
    """Every graph is exported and its torch reference outputs kept (a GraphCheck) while the torch model exists;
    then the torch weights are freed and ONNX Runtime validates the graphs one at a time. cfg.dtype: the resolved
    export dtype ("fp32" / "fp16"), the dtype of every top-level graph's weights."""
    dims = decoder_dims(adapter)
    checks: list[Callable[[], object]] = []  # ONNX Runtime validations, run after release_weights: torch and ONNX Runtime never hold the weights together
    low = adapter.min_visual_tokens  # N varies per image for some families
    count = f"{low}..{adapter.num_visual_tokens} per image" if low != adapter.num_visual_tokens else str(low)
    log(f"exporting vision graph (tower + projector + {budget.method}, K={budget.budget} of N={count})")
    vision = VisionPruneGraph(adapter, budget).eval()
    args, dynamic, inputs, outputs = vision_export_spec(adapter, cfg, kept_dim(adapter, budget), dims["hidden_size"])
    hint = f" (--method {budget.method} may need a fixed number of visual tokens)"  # the selection: the usual cause
    vision_spec = _export(vision, args, dynamic, inputs, outputs, staging / "vision.onnx", cfg, hint)
    ranges = adapter.vision_dim_ranges()  # adapter-bounded dims (Qwen2.5-VL: patches, merged)
    vision_spec = replace(vision_spec, dim_ranges={name: tuple(int(v) for v in triple) for name, triple in ranges.items()})
    checks.append(partial(check_graph, reference(vision, args, staging / "vision.onnx", vision_spec, cfg.dtype)))
    _check_tensorrt(staging / "vision.onnx", cfg)

    log(f"exporting decoder graph ({dims['num_layers']} layers, KV cache)")
    decoder = decoder_module(adapter).eval()
    leading = tuple(adapter.position_ids_leading_dims)
    args, dynamic, inputs, outputs = decoder_export_spec(dims, cfg, budget.budget, leading)
    decoder_spec = _export(decoder, args, dynamic, inputs, outputs, staging / "decoder.onnx", cfg)
    checks.append(partial(check_graph, reference(decoder, args, staging / "decoder.onnx", decoder_spec, cfg.dtype)))
    _check_tensorrt(staging / "decoder.onnx", cfg)

    log("building the fused decoder graph (ONNX Runtime's fused ops, KV cache written in place)")
    fused_dtype = {"fp32": "float32", "fp16": "float16"}[cfg.dtype]  # its weights, compute and KV buffers (I/O stays float32)
    fused_spec = build_fused_decoder(adapter, cfg.max_sequence(budget.budget), staging / "decoder_fused.onnx", fused_dtype)
    checks.append(partial(check_fused_decoder, fused_reference(decoder, dims, leading), staging / "decoder_fused.onnx", fused_spec, dims,
                          cfg.dtype))

    table = adapter.embedding_table().detach().float().numpy()  # [V, D]
    np.save(staging / "embed_tokens.npy", table)
    shutil.copyfile(source.path / "tokenizer.json", staging / "tokenizer.json")
    _write_preprocessor_config(adapter, source.path, staging / "preprocessor_config.json")

    text, family_config = adapter.text_info(source.path), adapter.family_config()
    chat_template = _copy_chat_template(source, text.get("image_placeholder", text["image_token"]), staging, log)
    del vision, decoder
    release_weights(adapter.model)
    log(f"validating {len(checks)} graphs with ONNX Runtime, one at a time (torch weights freed)")
    for check in checks:
        check()

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        prunert_version=prunert.__version__,
        versions={name: _version(name) for name in VERSIONED_PACKAGES},
        opset=cfg.opset,
        source=SourceSpec(
            model=source.label, family=source.family, architecture=adapter.architecture, synthetic=source.synthetic, revision=source.revision,
            note=source.note, dtype=cfg.dtype
        ),
        budget=BudgetSpec(budget=budget.budget, method=budget.method, params=pruning_ops.method_params(budget), num_visual_tokens=adapter.num_visual_tokens),
        graphs={"vision": vision_spec, "decoder": decoder_spec, FUSED_DECODER: fused_spec},
        text=TextSpec(
            embeddings="embed_tokens.npy",
            tokenizer="tokenizer.json",
            image_token=text["image_token"],
            image_placeholder=text.get("image_placeholder", text["image_token"]),
            image_token_id=text["image_token_id"],
            bos_token_id=text["bos_token_id"],
            eos_token_ids=tuple(text["eos_token_ids"]),
            pad_token_id=text["pad_token_id"],
            prompt_template=text["prompt_template"],
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_sequence=cfg.max_sequence(budget.budget),
            max_text_tokens=cfg.max_text_tokens,
            max_batch=cfg.max_batch,
            chat_template=chat_template,
        ),
        decoder=DecoderSpec(**dims),
        image_preprocessor="preprocessor_config.json",
        family_config=family_config,
        files=hash_directory(staging),
    )
    (staging / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _copy_chat_template(source: ModelSource, placeholder: str, staging: Path, log: Callable[[str], None]) -> str:
    """The checkpoint's own chat template (chat_template.jinja / .json / tokenizer_config.json) into the artifact as
    chat_template.jinja -> the name for the manifest's text.chat_template; "" where it has none, or one that cannot
    render an image as the placeholder (a note says so): the runtime then uses its family's default."""
    from prunert.runtime.chat import ARTIFACT_CHAT_TEMPLATE, ChatFormat, checkpoint_chat_template, user_turn

    found = checkpoint_chat_template(source.path)
    if found is None:
        return ""
    template, name = found
    try:  # the sandboxed render the runtime does, on one user turn with an image
        ChatFormat(template, f"the checkpoint's {name}", placeholder).render(user_turn("Describe the image."))
    except PrunertError as exc:
        log(f"note: the checkpoint's chat template is not stored ({exc}); the artifact uses its family's default")
        return ""
    (staging / ARTIFACT_CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    return ARTIFACT_CHAT_TEMPLATE


def _write_preprocessor_config(adapter: ExportAdapter, model_dir: Path, path: Path) -> None:
    """What the adapter's `artifact_preprocessor_config(model_dir)` makes of the checkpoint's preprocessor_config.json
    (keys its host adapter needs, the pixel range fit_budget chose); the checkpoint's own bytes where it changes nothing."""
    original = model_dir / PREPROCESSOR_CONFIG
    config = adapter.artifact_preprocessor_config(model_dir)
    if config == json.loads(original.read_text()):
        shutil.copyfile(original, path)
    else:
        path.write_text(json.dumps(config, indent=2) + "\n")


def _check_tensorrt(path: Path, cfg: ExportConfig) -> None:
    """Every exported graph must parse in TensorRT >= 10.3: checked on the CPU, no TensorRT needed."""
    from prunert.export.trt_check import TrtCheckConfig, check_trt

    issues = check_trt(path, TrtCheckConfig(max_opset=cfg.opset))
    if issues:
        lines = "; ".join(issue.line() for issue in issues[:5])
        raise ExportError(f"{path.name}: {len(issues)} TensorRT-compatibility problem(s): {lines}")


def _export(module, args, dynamic, inputs, outputs, path: Path, cfg: ExportConfig, fixed_dims_hint: str = "") -> GraphSpec:
    """torch.onnx.export one graph module; `fixed_dims_hint` ends the error of a symbolic dim the export fixed."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > cfg.external_data_threshold_bytes
    log_sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log_sink), _quiet_exporter():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=cfg.opset,
                dynamic_shapes=dynamic,
                input_names=[name for name, _, _ in inputs],
                output_names=[name for name, _, _ in outputs],
                external_data=external,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; surface one clear error
        cause = exc
        while cause is not None:  # a PrunertError raised inside the traced module is the real message
            if isinstance(cause, PrunertError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise ExportError(f"export of {path.name} failed: {type(exc).__name__}: {_exporter_message(exc)}") from exc
    data_file = path.name + ".data"
    check_symbolic_dims(path, inputs, fixed_dims_hint)
    return GraphSpec(
        file=path.name,
        inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
        external_data=data_file if (path.parent / data_file).exists() else None,
    )


def _exporter_message(exc: Exception) -> str:
    """One clean line of an exporter error: ANSI colour codes stripped, and the line under torch.export's
    "## Exception summary" (the actual error, e.g. a shape mismatch) rather than its generic first line."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(exc)).splitlines()]
    lines = [line for line in lines if line]
    if "## Exception summary" in lines[:-1]:
        summary = lines[lines.index("## Exception summary") + 1]
        return re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:", r"\1:", summary)  # "<class 'RuntimeError'>: ..." -> "RuntimeError: ..."
    return lines[0] if lines else "(no message)"


@contextlib.contextmanager
def _quiet_exporter():
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
