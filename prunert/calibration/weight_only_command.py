"""`prunert quantize ARTIFACT --weights int4 [--algo rtn|awq] [--block-size 32|64|128] [--graphs decoder]`.

Adds the `int4` variant like `calibrate` does (prunert.artifact_update: staged, atomic, in the manifest with the
tool and settings): vision -> the top-level fp32 graph; decoder -> block-wise INT4 DequantizeLinear -> MatMul
(the TensorRT form, opset 21, checked with check-trt's int4 rules); decoder_fused (FUSED_DECODER, where the
artifact has it) -> MatMulNBits (the ONNX Runtime form). The drift against fp32 is measured on the
calibration set and written beside the graphs, as `calibrate` does.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from prunert.config import GRAPH_NAMES, WEIGHT_ONLY_ALGOS, WEIGHT_ONLY_BLOCK_SIZES, WEIGHT_ONLY_LM_HEAD, WeightOnlyConfig

FORM_OF = {"decoder": "dq", "decoder_fused": "nbits"}  # graph -> int4 form (weight_only.FORMS)
_DRIFT_GREEDY_TOKENS = 8


def add_quantize_parser(sub: Any) -> argparse.ArgumentParser:
    defaults = WeightOnlyConfig()
    p = sub.add_parser("quantize", help="add int4 weight-only decoder graphs (MatMulNBits for ONNX Runtime, INT4 DequantizeLinear for TensorRT)")
    p.add_argument("artifact", type=Path, help="artifact directory (the graphs are added to it)")
    p.add_argument("--weights", required=True, help="int4: block-wise symmetric int4 weights; activations stay in the graph's float dtype (weight-only)")
    p.add_argument("--algo", default=defaults.algo, help=f"{' | '.join(WEIGHT_ONLY_ALGOS)}: round to nearest, activation-aware "
                   "scales (AWQ) or error feedback (GPTQ) from the calibration set (default %(default)s)")
    p.add_argument("--block-size", type=int, default=defaults.block_size,
                   help=f"{' | '.join(map(str, WEIGHT_ONLY_BLOCK_SIZES))}: input rows per scale (default %(default)s, as ONNX Runtime GenAI)")
    p.add_argument("--graphs", default="decoder", help="decoder (both decoder forms; default). vision and all are refused: int4 is "
                   "weight-only for the decoder role, the vision graph stays fp32 so the selection stays exact")
    p.add_argument("--lm-head", default=defaults.lm_head, help=f"{' | '.join(WEIGHT_ONLY_LM_HEAD)}: the lm_head's weights "
                   "(default %(default)s, as ONNX Runtime GenAI); the embedding table stays the runtime's fp32 file")
    p.add_argument("--images", type=Path, help="calibration images for AWQ and the drift report (default: examples/calibration)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line with the artifact's image placeholder once (default: built-in)")
    p.add_argument("--max-samples", type=int, default=defaults.max_samples, help="image/prompt pairs used (default %(default)s)")
    return p


def run_quantize(args: argparse.Namespace, sample_set: Callable, report: Callable) -> int:
    """The CLI command: sample_set(artifact, images, prompts, max_samples) is the CLI's calibration-set loader;
    report(manifest, drift, precision, artifact) prints what `calibrate` prints (cli.variant_written)."""
    graphs = {"decoder": ("decoder",), "vision": ("vision",), "all": GRAPH_NAMES}.get(args.graphs, (args.graphs,))
    config = WeightOnlyConfig(precision=args.weights, algo=args.algo, block_size=args.block_size, graphs=tuple(graphs),
                              lm_head=args.lm_head, max_samples=args.max_samples)
    calibration = sample_set(args.artifact, args.images, args.prompts, config.max_samples)
    return report(*quantize_artifact(args.artifact, calibration, config), config.precision, args.artifact)


def quantize_artifact(directory: Path, calibration_set, config: WeightOnlyConfig = WeightOnlyConfig(),
                      log: Callable[[str], None] = print):
    """Quantize the decoder role's graphs to int4 and install them as variants[config.precision].

    -> (the new manifest, the DriftReport against fp32 of the standard decoder). Atomic: on any failure the
    staged folder is removed and the manifest is unchanged; quantizing again replaces the old variant."""
    import onnxruntime

    from prunert.artifact_update import ArtifactUpdate
    from prunert.config import FUSED_DECODER
    from prunert.manifest import VariantSpec, load_manifest

    directory, precision, start = Path(directory), config.precision, time.perf_counter()
    manifest = load_manifest(directory)
    if len(calibration_set.samples) > config.max_samples:
        calibration_set = replace(calibration_set, samples=calibration_set.samples[: config.max_samples])
    old = manifest.variants.get(precision)
    drop = sorted({spec.file.split("/")[0] for spec in old.graphs.values() if "/" in spec.file}) if old else []
    with ArtifactUpdate(directory, precision) as update:
        graphs = {"vision": manifest.graphs["vision"]}  # fp32: the selection stays exact
        summaries, drifts, plan = {}, {}, None
        for name in [name for name in FORM_OF if name in manifest.graphs]:
            plan, summary = _quantize_role_graph(directory, manifest, name, calibration_set, config, update.staging, plan, log)
            summaries[name] = summary
            external = update.file(summary.external_data) if summary.external_data else None
            graphs[name] = replace(manifest.graphs[name], file=update.file(summary.graph), external_data=external)
            if name != FUSED_DECODER:  # calibration's pipelines record and compare the standard form (dataset.collect_feeds)
                drifts[name] = _drift(directory, name, update.staging / summary.graph, graphs[name], calibration_set, precision, log)
        report_name = f"drift-{precision}.json"
        drifts["decoder"].write(update.staging / report_name)
        settings = _settings(config, calibration_set, summaries, manifest, drifts, update.file(report_name))
        tool = f"prunert.calibration.weight_only ({config.algo}), checked in onnxruntime {onnxruntime.__version__}"
        variant = VariantSpec(precision, graphs, tool, settings)
        new = update.commit(lambda m: replace(m, variants={**m.variants, precision: variant}), drop=drop)
    log(f"wrote {precision} variant {update.folder}/ in {time.perf_counter() - start:.1f} s")
    return new, drifts["decoder"]


def _quantize_role_graph(directory: Path, manifest, name: str, calibration_set, config: WeightOnlyConfig, staging: Path, plan, log):
    """One decoder-role graph in its int4 form (FORM_OF). The standard decoder is planned from the feeds the fp32
    pipeline gives it and checked with check-trt's int4 rules; the fused one takes that plan (int4_plan.transfer_plan).
    -> (the standard decoder's plan, the Int4Summary)."""
    import onnx
    from onnx import TensorProto

    from prunert.calibration.dataset import collect_feeds
    from prunert.calibration.int4_plan import plan_int4, transfer_plan, write_int4
    from prunert.errors import ExportError
    from prunert.export.trt_check import TrtCheckConfig, check_trt
    from prunert.runtime import VLMPipeline

    spec, form, dst = manifest.graphs[name], FORM_OF[name], staging / f"{name}.onnx"
    src, vocab = directory / spec.file, manifest.decoder.vocab_size
    model = onnx.load(str(src))  # with its weights
    external = any(init.data_location == TensorProto.EXTERNAL for init in onnx.load(str(src), load_external_data=False).graph.initializer)
    log(f"quantizing {spec.file} to {config.precision} ({config.algo}, block {config.block_size}, {form} form)")
    if plan is None:
        log(f"running the fp32 graphs on {len(calibration_set.samples)} calibration samples")
        inputs = {i.name for i in model.graph.input}
        feeds = [{k: v for k, v in feed.items() if k in inputs} for feed in collect_feeds(VLMPipeline(directory, decoder=name), calibration_set)["decoder"]]
        plan = plan_int4(src, model, config, vocab, feeds, log)
        summary = write_int4(model, plan, form, dst, config, external, feeds[0] if feeds else None)
        issues = check_trt(dst, TrtCheckConfig().for_int4()) if form == "dq" else []
        if issues:
            lines = "; ".join(issue.line() for issue in issues[:5])
            raise ExportError(f"{config.precision} {dst.name}: {len(issues)} TensorRT-compatibility problem(s): {lines}")
        return plan, summary
    carried = transfer_plan(plan, src, model, config, vocab)
    if carried is None:  # the graphs do not hold the same matrices in pairable groups
        raise ExportError(f"{spec.file}: its matmul weights do not pair with decoder.onnx's; cannot give it the same int4 numbers")
    return plan, write_int4(model, carried, form, dst, config, external)


def _drift(directory: Path, name: str, path: Path, spec, calibration_set, precision: str, log):
    from prunert.calibration.drift import compare, quantized_pipeline
    from prunert.runtime import VLMPipeline

    log(f"measuring the {precision} {name} drift against fp32 in ONNX Runtime CPU")
    pipe = VLMPipeline(directory, decoder=name)
    return compare(pipe, quantized_pipeline(pipe, {"decoder": path}, {"decoder": spec}, precision), calibration_set, precision, _DRIFT_GREEDY_TOKENS)


def _settings(config: WeightOnlyConfig, calibration_set, summaries, manifest, drifts, report: str) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "precision": config.precision,
        "quantizer": "prunert.calibration.weight_only",
        "algo": config.algo,
        "block_size": config.block_size,
        "scheme": "symmetric int4 [-8, 7], no zero point, one scale per block of block_size K rows per output column; fp32 activations",
        "forms": {name: s.form for name, s in summaries.items()},
        "opset": {"dq": "default domain 21 (INT4, DequantizeLinear block_size)", "nbits": "com.microsoft 1 (MatMulNBits)"},
        "accuracy_level": config.accuracy_level,
        "lm_head": config.lm_head,
        "embeddings": "fp32 (the runtime's embedding table file, not in the graphs)",
        "graphs": list(config.graphs),
        "fp32_graphs": {"vision": manifest.graphs["vision"].file},
        "awq": {"grid": config.awq_grid, "rows": config.sample_rows} if config.algo == "awq" else None,
        "gptq": {"damp": config.gptq_damp, "rows": config.sample_rows, "act_order": False} if config.algo == "gptq" else None,
        "summaries": {name: asdict(s) for name, s in summaries.items()},
        "calibration_set": calibration_set.summary(),
        "max_samples": config.max_samples,
        "drift": {name: drift.summary() for name, drift in drifts.items()},
        "drift_report": report,
    }
