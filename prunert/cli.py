"""`prunert` command line: export, run, parity, inspect, check-trt, visualize, convert, calibrate, quantize, build, eval,
sweep, plan.

`run`, `inspect`, `visualize`, `build`, `plan` and `eval` (but for `--reference hf`) stay on the runtime path (no torch import);
`export` and `parity` import torch; `convert`, `calibrate` and `quantize` need onnx (prunert[export]).
Bad input prints one line `prunert: error: ...` and exits 2; a parity FAIL exits 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from prunert.errors import report_errors

EXAMPLE_CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "examples" / "calibration"
SYNTHETIC_NOTE = "note: synthetic checkpoint (seeded random weights): outputs show the plumbing, not a trained model's answers"


def source_note(source) -> str | None:
    """The line `run` and `eval` print about the model an artifact came from (its manifest's source); None: nothing."""
    if source.note:
        return f"note: {source.note}"
    return SYNTHETIC_NOTE if source.synthetic else None


def _export(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from prunert import pruning_ops
    from prunert.config import BudgetConfig, ExportConfig, PixelRange
    from prunert.errors import ConfigError
    from prunert.export.pipeline import export_artifact

    config_type = pruning_ops.method_spec(args.method).config_type
    own = {f.name for f in fields(config_type)}
    for other in pruning_ops.methods():
        for f in fields(pruning_ops.method_spec(other).config_type):
            if f.name not in own and getattr(args, f.name, None) is not None:
                raise ConfigError(f"--{f.name.replace('_', '-')}: applies to --method {other}, not {args.method}")
    given = {name: getattr(args, name) for name in own if getattr(args, name, None) is not None}
    budget = BudgetConfig(budget=args.budget, method=args.method, params=config_type(**given))
    cfg = ExportConfig(opset=args.opset, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                       dtype=args.dtype)
    pixels = PixelRange(min_pixels=args.min_pixels, max_pixels=args.max_pixels)  # checked before the checkpoint loads
    manifest = export_artifact(args.model, args.out, budget, cfg, overwrite=args.overwrite, pixels=pixels)
    if source_note(manifest.source):
        print(source_note(manifest.source))
    return 0


def _kept_summary(manifest, results) -> str:
    """`kept k/N visual tokens (method)` with each image's own N (Qwen2.5-VL's dynamic resolution, LLaVA-NeXT's
    valid tile tokens) and k its real kept tokens; one k/N per image, of every prompt of a batch."""
    kept = ", ".join(f"{len(k)}/{n}" for r in results for k, n in zip(r.kept_per_image, r.tokens_per_image))
    return f"kept {kept} visual tokens ({manifest.budget.method})"


def _run(args: argparse.Namespace) -> int:
    from prunert.config import GenerationConfig
    from prunert.errors import ConfigError
    from prunert.runtime import Artifact, VLMPipeline

    images, prompts = args.image, args.prompt
    if len(prompts) == 1 and len(images) > 1:  # one prompt about several images (one placeholder each, or none)
        images = [images]
    if len(images) != len(prompts):
        raise ConfigError(f"--image/--prompt: got {len(images)} images and {len(prompts)} prompts, expected one prompt (about all "
                          "the images) or one image per prompt (a batch)")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=GenerationConfig().seed if args.seed is None else args.seed)  # checked before anything runs
    pipe = VLMPipeline(Artifact(args.artifact, verify_hashes=not args.no_verify), backend=args.backend, precision=args.precision,
                       runtime=runtime_config(args))
    config = _run_seed(args, config)
    stream = args.stream and len(prompts) == 1

    def on_token(row: int, token: int, text: str) -> None:
        print(text, end="", flush=True)

    results = pipe.generate(images, prompts, config, on_token=on_token if stream else None)
    if stream:
        print()
    for image, result in zip(images, results):
        if not stream:
            print(f"[{image}] {result.text}" if len(prompts) > 1 else result.text)
    t = pipe.timings
    print(
        f"{_kept_summary(pipe.manifest, results)}; "
        f"{args.backend} {args.precision.label}; "
        f"vision {t.vision_s * 1e3:.0f} ms, prefill {t.prefill_s * 1e3:.0f} ms, "
        f"{len(results[0].token_ids)} tokens ({results[0].finish_reason})",
        file=sys.stderr,
    )
    note = source_note(pipe.manifest.source)
    if note:
        print(note, file=sys.stderr)
    return 0


def _run_seed(args: argparse.Namespace, config):
    """The checked config with --seed, else for a sampled run (--temperature > 0) a fresh seed, printed on stderr (once
    the run is about to start) so it can be repeated; greedy decoding draws nothing."""
    from dataclasses import replace

    from prunert.config import fresh_seed

    if args.seed is not None or config.temperature == 0:
        return config
    seed = fresh_seed()
    print(f"seed: {seed} (pass --seed {seed} to repeat)", file=sys.stderr)
    return replace(config, seed=seed)


def _parity(args: argparse.Namespace) -> int:
    from prunert.artifact_publish import refuse_unless_replaceable_file, replace_file
    from prunert.parity.reference import parity_bars, run_parity

    out = args.out or Path(args.artifact) / "parity.json"
    report_file = ("--out", frozenset({"artifact", "checks", "verdict"}), "a parity report")  # what --out may replace
    refuse_unless_replaceable_file(out, *report_file)  # before the long run: a directory, link or other file stays
    bars, tolerances = parity_bars(args.artifact, args.precision, args.greedy_tokens)  # the export dtype's where fp32 graphs run
    report = run_parity(args.artifact, args.image, args.prompt, tolerances, model=args.model, backend=args.backend, precision=args.precision,
                        runtime=runtime_config(args))
    replace_file(out, report.write_json, *report_file)
    label = args.precision.label
    print(f"{args.backend}, {label} graphs; the {bars.label} bars (ParityTolerances.for_precisions, docs/deploy.md)")
    print(report.table())
    if source_note(report):  # the report carries its source's synthetic flag and note
        print(source_note(report))
    print(f"report: {out}")
    print(f"parity: {report.verdict}")
    return 0 if report.passed else 1


def _sample_set(artifact: Path, images: Path | None, prompts: Path | None, max_samples: int):
    """The calibration set: --images, else the real photos that ship in examples/calibration."""
    from prunert.calibration.dataset import load_calibration_set
    from prunert.errors import ConfigError
    from prunert.manifest import load_manifest

    placeholder = load_manifest(artifact, verify_hashes=False).text.placeholder  # --prompts lines must hold it once
    if images is None:
        images = EXAMPLE_CALIBRATION_DIR
        if not images.is_dir():
            raise ConfigError(f"--images: not given, and the bundled set {images} is not here (installed without examples/); pass --images DIR")
    return load_calibration_set(images, prompts, max_samples, placeholder=placeholder)


def _sample_feeds(artifact: Path, images: Path | None, prompts: Path | None, max_samples: int):
    from prunert.calibration.dataset import collect_feeds
    from prunert.runtime import VLMPipeline

    return collect_feeds(VLMPipeline(artifact), _sample_set(artifact, images, prompts, max_samples))


def _convert(args: argparse.Namespace) -> int:
    from prunert.config import PrecisionConfig
    from prunert.export.precision import convert_artifact

    config = PrecisionConfig(precision=args.precision, fp32_node_patterns=tuple(args.fp32_layer or ()),
                             fp32_op_types=tuple(args.fp32_op) if args.fp32_op is not None else PrecisionConfig().fp32_op_types,
                             auto_islands=args.auto_islands)
    feeds = _sample_feeds(args.artifact, args.images, None, args.max_samples) if config.auto_islands else None
    convert_artifact(args.artifact, config, feeds)
    print(f"wrote the {args.precision} graphs into {args.artifact} (listed in its manifest)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from prunert.calibration.quantize import calibrate_artifact
    from prunert.config import CalibrationConfig

    config = CalibrationConfig(precision=args.precision, method=args.calibration_method, max_samples=args.max_samples,
                               graphs=tuple(args.graph) if args.graph else CalibrationConfig().graphs)
    calibration = _sample_set(args.artifact, args.images, args.prompts, config.max_samples)
    return variant_written(*calibrate_artifact(args.artifact, calibration, config), args.precision, args.artifact)


def variant_written(manifest, drift, precision: str, artifact: Path) -> int:
    """What `calibrate` and `quantize` print after adding a variant: its drift table, the source note, where it went."""
    print(drift.table())
    if source_note(manifest.source):
        print(source_note(manifest.source))
    print(f"wrote the {precision} graphs into {artifact} (listed in its manifest)")
    return 0


def _build(args: argparse.Namespace) -> int:
    """One build_engines per precision of --precision's graph roles (vision=fp16,decoder=fp8: each graph from its own variant)."""
    from dataclasses import replace

    from prunert.config import EngineBuildConfig
    from prunert.engines import import_tensorrt
    from prunert.engines.builder import build_engines
    from prunert.manifest import load_manifest

    base = EngineBuildConfig(precision=args.precision.decoder, max_batch=args.max_batch, max_seq=args.max_seq, opt_batch=args.opt_batch,
                             workspace_bytes=EngineBuildConfig.workspace_from_gib(args.workspace_gb), optimization_level=args.opt_level,
                             graphs=tuple(args.graph) if args.graph else EngineBuildConfig().graphs)
    configs = [replace(base, precision=precision, graphs=roles) for precision, roles in args.precision.groups(base.graphs).items()]
    import_tensorrt()  # before anything is converted: no tensorrt, no change to the artifact
    for config in configs:
        _convert_before_build(args, config.precision, load_manifest(args.artifact))
    for config in configs:
        manifest = build_engines(args.artifact, config)
        for engine in manifest.engines:
            if engine.precision == config.precision and engine.graph in config.graphs:
                print(f"{engine.graph}: {engine.file} (TensorRT {engine.tensorrt_version}, sm {engine.compute_capability})")
    return 0


def _convert_before_build(args: argparse.Namespace, precision: str, manifest) -> None:
    """`prunert build` at fp16/bf16 without those graphs yet: convert first (prunert convert's defaults)."""
    from prunert.config import FLOAT_PRECISIONS, PrecisionConfig
    from prunert.errors import BackendUnavailableError

    if precision not in FLOAT_PRECISIONS or precision in manifest.variants:
        return
    print(f"no {precision} graphs in the artifact yet: converting (prunert convert) first")
    try:
        from prunert.export.precision import convert_artifact
    except ImportError as exc:
        raise BackendUnavailableError(
            f"--precision {precision}: converting needs the onnx package ({exc}); "
            f"install it, or run `prunert convert {args.artifact} --precision {precision}` on the workstation"
        ) from None
    feeds = None
    if args.images or EXAMPLE_CALIBRATION_DIR.is_dir():
        feeds = _sample_feeds(args.artifact, args.images, None, 4)
    else:
        print("note: no --images and no examples/calibration here: converting without the fp16 overflow run")
    convert_artifact(args.artifact, PrecisionConfig(precision=precision), feeds)


def _inspect(args: argparse.Namespace) -> int:
    from prunert.artifact_publish import leftovers
    from prunert.manifest import load_manifest
    from prunert.inspect import manifest_table

    if args.image:
        return _inspect_images(args)
    manifest = load_manifest(Path(args.artifact), verify_hashes=not args.no_verify)
    found = leftovers(Path(args.artifact))  # staging folders and swap journals beside and inside it
    if args.json:  # stdout stays the raw manifest; leftovers go to stderr
        print(manifest.to_json())
        for leftover in found:
            print(f"prunert: note: {leftover.line()}", file=sys.stderr)
    else:
        print(manifest_table(manifest, found))
    from prunert.errors import ArtifactError
    from prunert.runtime.manifest_checks import check_manifest

    try:  # shown as it is, but a contradiction `run` would refuse is still one error line, exit 2
        check_manifest(manifest)
    except ArtifactError as exc:
        raise ArtifactError(f"artifact '{args.artifact}': {exc}") from None
    return 0


def _inspect_images(args: argparse.Namespace) -> int:
    """`inspect A --image x.jpg`: per image, its visual tokens before and after pruning (--json: one JSON object)."""
    import json

    from prunert.inspect import image_tokens
    from prunert.runtime import Artifact

    rows = image_tokens(Artifact(args.artifact, verify_hashes=not args.no_verify), args.image)
    print(json.dumps({"images": [row.to_dict() for row in rows]}, indent=2) if args.json else "\n".join(row.line() for row in rows))
    return 0


def _check_trt(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from prunert.errors import BackendUnavailableError

    try:
        from prunert.export.trt_check import TrtCheckConfig, check_target
    except ImportError as exc:
        raise BackendUnavailableError(f"check-trt needs the onnx package ({exc}); install prunert[export]") from None
    flags = {"max_opset": args.max_opset, "max_topk": args.max_topk, "trt_version": args.trt_version}
    config = replace(TrtCheckConfig(), **{k: v for k, v in flags.items() if v is not None},
                     allow_dynamic_topk_k=args.allow_dynamic_topk_k, assume_constant_folding=args.assume_constant_folding)
    results = check_target(args.path, config)
    for result in results:
        for issue in result.issues:
            print(issue.line())
        print(result.summary(config), file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(result.ok for result in results) else 1


def _eval(args: argparse.Namespace) -> int:
    from prunert.evaluation.command import run_eval

    return run_eval(args, source_note)


def _sweep(args: argparse.Namespace) -> int:
    from prunert.evaluation.sweep_command import run_sweep_command

    return run_sweep_command(args, source_note)


def _visualize(args: argparse.Namespace) -> int:
    from prunert.config import check_panel_scale
    from prunert.visualize import visualize

    out = visualize(args.artifact, args.image, args.prompt, args.out, scale=check_panel_scale(args.scale))
    print(f"wrote {out}")
    return 0


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of every method's config (--alpha, --seed, ...); unset flags keep the method's default."""
    from dataclasses import MISSING, fields

    from prunert import pruning_ops

    seen: dict[str, list[str]] = {}
    defaults: dict[str, object] = {}
    kinds: dict[str, type] = {}
    for name in pruning_ops.methods():
        for f in fields(pruning_ops.method_spec(name).config_type):
            seen.setdefault(f.name, []).append(name)
            defaults.setdefault(f.name, f.default if f.default is not MISSING else None)
            kinds[f.name] = type(defaults[f.name])
    group = parser.add_argument_group("method parameters (each applies to the methods named)")
    for field_name, owners in sorted(seen.items()):
        flag = "--" + field_name.replace("_", "-")
        owners_text = ", ".join(owners)
        if kinds[field_name] is bool:
            group.add_argument(flag, dest=field_name, action="store_const", const=True, default=None, help=f"[{owners_text}]")
        else:
            group.add_argument(flag, dest=field_name, type=kinds[field_name], default=None,
                               help=f"[{owners_text}] default {defaults[field_name]}")


def _add_precision_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--precision P (every graph) or --precision vision=P,decoder=P (per graph role): a GraphPrecisions; bad text is
    one error line, exit 2 (GraphPrecisions.parse raises ConfigError, which argparse passes through)."""
    from prunert.config import GRAPH_NAMES, PRECISIONS, GraphPrecisions

    parser.add_argument("--precision", type=GraphPrecisions.parse, default=GraphPrecisions(), metavar="P | ROLE=P,...",
                        help=f"{' | '.join(PRECISIONS)} for every graph, or per graph role ({', '.join(GRAPH_NAMES)}), e.g. "
                        f"vision=fp16,decoder=int8 (a role not named: fp32; default fp32 for every graph); {help_text}")


def _add_backend_flags(parser: argparse.ArgumentParser) -> None:
    """The runtime flags of every command that runs an artifact (run, parity, eval; a serve command takes the same):
    --backend, --precision (per graph), --threads and --spin (runtime_config)."""
    from prunert.runtime.pipeline import BACKENDS

    parser.add_argument("--backend", default="onnxruntime",
                        help=f"{' | '.join(BACKENDS)}: onnxruntime (CPU), ort-cuda / ort-trt (onnxruntime-gpu), "
                        "trt (engines from `prunert build`); default %(default)s")
    _add_precision_flag(parser, "fp32 is the exported graphs, others are variants made by `prunert convert` / `prunert calibrate`")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of every ONNX Runtime session (default 0: its own choice)")
    parser.add_argument("--spin", action="store_true",
                        help="let ONNX Runtime's idle threads spin (busy-wait) between ops; off by default, which suits a shared machine")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="do not back CPU sessions' weights and the KV cache with transparent huge pages (Linux; on by default)")


def runtime_config(args: argparse.Namespace):
    """The RuntimeConfig of _add_backend_flags' --threads / --spin / --no-huge-pages."""
    from prunert.config import RuntimeConfig

    return RuntimeConfig(threads=args.threads, spinning=args.spin, huge_pages=not args.no_huge_pages)


def build_parser() -> argparse.ArgumentParser:
    from prunert import pruning_ops
    from prunert.config import (FLOAT_PRECISIONS, GRAPH_NAMES, PRECISIONS, QUANTIZED_PRECISIONS, TRT_MAX_TOPK, BudgetConfig, CalibrationConfig,
                                EngineBuildConfig, ExportConfig, GenerationConfig, ParityTolerances, PrecisionConfig)

    import prunert

    parser = argparse.ArgumentParser(prog="prunert", description="Static-budget visual-token pruning for VLMs: export, run, parity.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {prunert.__version__}", help="print prunert's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    ex, gen = ExportConfig(), GenerationConfig()

    p = sub.add_parser("export", help="export a checkpoint to an artifact directory (ONNX graphs + manifest.json)")
    p.add_argument("--model", required=True, help="synthetic:<preset> (llava-tiny, llava-1.5-shaped, llava-next-tiny, llava-next-shaped, "
                   "qwen2.5-vl-tiny, qwen2.5-vl-shaped) or a local Hugging Face LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL directory (safetensors)")
    p.add_argument("--budget", type=int, default=BudgetConfig().budget, help="visual tokens kept per image (K; default %(default)s)")
    p.add_argument("--method", default=BudgetConfig().method, help="selection method: " + ", ".join(pruning_ops.methods()) + " (default: %(default)s)")
    _add_method_flags(p)
    p.add_argument("--opset", type=int, default=ex.opset, help="ONNX opset (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=ex.max_prompt_tokens, help="longest prompt the artifact accepts, in tokens (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=ex.max_new_tokens, help="longest generation the artifact is sized for (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=ex.max_batch, help="largest batch the graphs declare (default %(default)s)")
    p.add_argument("--dtype", help="fp32 | fp16: the dtype the checkpoint is loaded and exported in (graph I/O stays float32, the "
                   "selection fp32); default: the checkpoint's config.json torch_dtype (fp16 as is, bf16 and fp32 at fp32)")
    p.add_argument("--min-pixels", type=int, help="Qwen2.5-VL: smallest image area in pixels after resizing (smart_resize; 28 x 28 "
                   "pixels = one visual token; raised to K tokens' worth); default: the checkpoint's preprocessor_config.json")
    p.add_argument("--max-pixels", type=int, help="Qwen2.5-VL: largest image area in pixels after resizing, the visual-token budget "
                   "before pruning (e.g. 1003520 = 1,280 tokens); default: the checkpoint's preprocessor_config.json")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)

    p = sub.add_parser("run", help="answer a prompt about an image with an exported artifact (no torch needed)")
    p.add_argument("artifact", type=Path, help="artifact directory (from `prunert export`)")
    p.add_argument("--image", action="append", required=True,
                   help="image file; repeat for several images in one prompt (one --prompt; LLaVA-NeXT, Qwen2.5-VL), or for a "
                   "batch (one --prompt per --image)")
    p.add_argument("--prompt", action="append", required=True,
                   help="the question; the images go where the model's chat template puts them, or where the prompt has the "
                   "artifact's image placeholder (<image>; Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>) once per "
                   "image, in order; repeat for a batch, one per --image")
    p.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens, help="most tokens generated (default %(default)s)")
    p.add_argument("--temperature", type=float, default=gen.temperature, help="sampling temperature; 0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=gen.top_p, help="nucleus sampling: keep the tokens of this probability mass (default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, to repeat a run (default: a fresh one when --temperature > 0, printed on stderr)")
    _add_backend_flags(p)
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer at the end instead of streaming")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files (seconds on multi-GB artifacts)")
    p.set_defaults(func=_run)

    p = sub.add_parser("parity", help="compare the exported pipeline with the PyTorch reference, stage by stage")
    p.add_argument("artifact", type=Path, help="artifact directory (from `prunert export`)")
    p.add_argument("--image", type=Path, action="append", required=True,
                   help="image file; repeat for a prompt of several images (LLaVA-NeXT, Qwen2.5-VL)")
    p.add_argument("--prompt", required=True, help="prompt with the artifact's image placeholder once per --image, in order "
                   "(<image>; Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>)")
    p.add_argument("--model", help="source checkpoint, if it moved since export (default: the manifest's)")
    p.add_argument("--greedy-tokens", type=int, default=ParityTolerances().greedy_tokens, help="greedy steps compared (default %(default)s)")
    p.add_argument("--out", type=Path, help="parity.json path (default: ARTIFACT/parity.json)")
    _add_backend_flags(p)
    p.set_defaults(func=_parity)

    p = sub.add_parser("convert", help="add fp16/bf16 graphs (cast weights, fp32 islands) to an artifact, for strongly typed engines")
    p.add_argument("artifact", type=Path, help="artifact directory (the graphs are added to it)")
    p.add_argument("--precision", required=True, help=" | ".join(FLOAT_PRECISIONS))
    p.add_argument("--fp32-layer", action="append", metavar="PATTERN",
                   help="keep nodes whose name or name scope matches this fnmatch pattern in fp32 (repeat), e.g. '*layers.23.mlp.fc2*' "
                   "(default: none)")
    p.add_argument("--fp32-op", action="append", metavar="OP_TYPE",
                   help=f"op types kept in fp32 (repeat; default: {', '.join(PrecisionConfig().fp32_op_types)})")
    p.add_argument("--no-auto-islands", dest="auto_islands", action="store_false",
                   help="skip the fp32 run that keeps every node whose outputs would overflow in fp16")
    p.add_argument("--images", type=Path, help="images for the overflow run (default: examples/calibration)")
    p.add_argument("--max-samples", type=int, default=4, help="images used for the overflow run (default %(default)s)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("calibrate", help="add int8/fp8 Q/DQ graphs (explicit quantization) calibrated on images and prompts")
    p.add_argument("artifact", type=Path, help="artifact directory (the graphs are added to it)")
    p.add_argument("--images", type=Path, help="folder of calibration images (default: the real set in examples/calibration)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line, each with the artifact's image placeholder once "
                   "(<image>; Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>) (default: built-in prompts)")
    p.add_argument("--precision", required=True, help=" | ".join(QUANTIZED_PRECISIONS))
    p.add_argument("--calibration-method", default=CalibrationConfig().method, help="activation ranges: minmax (default) | percentile | entropy")
    p.add_argument("--max-samples", type=int, default=CalibrationConfig().max_samples, help="image/prompt pairs used (default %(default)s)")
    p.add_argument("--graph", action="append",
                   help=f"{' | '.join(GRAPH_NAMES)}: quantize only this graph (repeat; default: all). On ONNX Runtime CPU "
                   "only the vision graph gains (docs/deploy.md); TensorRT gains on both")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("build", help="build TensorRT engines for an artifact on this GPU (strongly typed; needs tensorrt)")
    p.add_argument("artifact", type=Path, help="artifact directory (the engines are added to it)")
    _add_precision_flag(p, "the graphs each engine is built from: fp16/bf16 are converted first if missing; int8/fp8 need `prunert calibrate`")
    p.add_argument("--max-batch", type=int, help="largest batch of the engine profiles (default and ceiling: the manifest's)")
    p.add_argument("--max-seq", type=int, help="longest decoder sequence of the profiles (default and ceiling: the manifest's)")
    p.add_argument("--opt-batch", type=int, default=EngineBuildConfig().opt_batch, help="batch the profiles are tuned for (default %(default)s)")
    p.add_argument("--graph", action="append", help=f"{' | '.join(GRAPH_NAMES)}: build only this graph (repeat); default: all")
    p.add_argument("--workspace-gb", type=float, default=EngineBuildConfig().workspace_bytes / (1 << 30), help="builder workspace limit in GiB (default %(default)s)")
    p.add_argument("--opt-level", type=int, default=EngineBuildConfig().optimization_level, help="builder optimization level 0..5 (default %(default)s)")
    p.add_argument("--images", type=Path, help="images for the fp16 overflow run when converting first (default: examples/calibration)")
    p.set_defaults(func=_build)

    p = sub.add_parser("inspect", help="print an artifact's manifest as a table")
    p.add_argument("artifact", type=Path, help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    p.add_argument("--image", action="append", help="instead of the manifest: how many visual tokens this image gives before and after "
                   "pruning, through the artifact's own preprocessing (repeat for several; with --json, a JSON object; default: none, "
                   "the manifest is shown)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("check-trt", help="report what TensorRT's ONNX parser would reject in a graph (CPU only, no TensorRT needed)")
    p.add_argument("path", type=Path, help="an .onnx file, or an artifact directory (checks every graph in its manifest)")
    p.add_argument("--max-opset", type=int, help=f"highest default-domain opset allowed (default: {ex.opset})")
    p.add_argument("--max-topk", type=int, help=f"largest TopK K allowed (default: TensorRT's limit, {TRT_MAX_TOPK})")
    p.add_argument("--trt-version", help="oldest TensorRT the engines must build with; gates version-dependent rules (default: 10.3)")
    p.add_argument("--allow-dynamic-topk-k", action="store_true", help="accept a TopK K computed at run time")
    p.add_argument("--assume-constant-folding", action="store_true",
                   help="accept inputs computed from constants where the parser needs initializers (fold them before building)")
    p.set_defaults(func=_check_trt)

    p = sub.add_parser("visualize", help="draw the visual tokens each artifact keeps on a photo, as a PNG (no torch needed)")
    p.add_argument("artifact", type=Path, nargs="+", help="one or more artifact directories; one panel each, side by side")
    p.add_argument("--image", type=Path, required=True, help="image file")
    p.add_argument("--prompt", required=True, help="prompt, as `run` takes it (the image placeholder once, or none; text-aware methods use its words)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write (its directory is created)")
    p.add_argument("--scale", type=int, help="integer zoom of each panel (default: enough for a panel >= 300 px)")
    p.set_defaults(func=_visualize)

    from prunert.evaluation.command import add_eval_parser

    add_eval_parser(sub, _add_backend_flags).set_defaults(func=_eval)
    from prunert.evaluation.sweep_command import add_sweep_parser

    add_sweep_parser(sub).set_defaults(func=_sweep)
    from prunert.runtime.plan_command import add_plan_parser
    add_plan_parser(sub)  # `prunert plan`: memory per component and a verdict per device (manifest and file sizes only)
    from prunert.calibration.weight_only_command import add_quantize_parser, run_quantize
    add_quantize_parser(sub).set_defaults(func=lambda args: run_quantize(args, _sample_set, variant_written))
    from prunert.serving.cli import add_serve_parser
    add_serve_parser(sub)  # `prunert serve`: the OpenAI-compatible HTTP server, or --triton (prunert.serving)
    return parser


# Errors of the machine, not of prunert: a full disk, a read-only or foreign directory. Any other OSError
# (ENOENT of a file prunert should have checked, EBADF, ...) stays a traceback: it is a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _environment_error(exc: OSError, args: argparse.Namespace | None) -> str:
    """One line for an OSError of ENVIRONMENT_ERRNOS, naming the path: the error's own, else (a failed
    write() carries none) the output or artifact the command was writing."""
    target = exc.filename or getattr(args, "out", None) or getattr(args, "artifact", None) or getattr(args, "path", None) or "prunert"
    reason = exc.strerror or os.strerror(exc.errno)
    return f"'{target}': {reason} ({errno.errorcode[exc.errno]})"


def main(argv: list[str] | None = None) -> int:
    """The console script and `python -m prunert`: parsing is inside the try, so Ctrl-C while the parser's
    imports load (method registry, configs) is exit 130 too."""
    parsed: list[argparse.Namespace] = []

    def command() -> int:
        parsed.append(build_parser().parse_args(argv))
        return parsed[0].func(parsed[0])

    try:
        return report_errors(command)
    except BrokenPipeError:  # the reader closed early (`prunert inspect A | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"prunert: error: {_environment_error(exc, parsed[0] if parsed else None)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
