"""The whole GPU path in one command: export -> convert / calibrate / quantize (int4) -> build engines at every precision
-> parity against PyTorch on the engines -> timings (vision engine, selection step, TTFT, decode tok/s)
for K=64 vs unpruned, each precision vs fp32, and per-graph mixes (vision=fp16,decoder=int4). One JSON report; exits 1 if any parity fails.

    bash bench/gpu_check.sh                                  # llava-1.5-shaped (realistic shapes)
    bash bench/gpu_check.sh --preset llava-tiny --budget 16  # a smoke run in about a minute

Needs an NVIDIA GPU, tensorrt (>= 10.3) and cuda-python; torch (CPU is enough) for export and parity.
Weights are synthetic (seeded random): the figures show speed and agreement, never task accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = ROOT / "examples/images/astronaut.jpg"
QUESTION = "\nWhat is the astronaut holding?"  # after the artifact's image placeholder (manifest.text.placeholder)
CALIBRATION = ROOT / "examples/calibration"
STATEMENT = "synthetic checkpoint (seeded random weights): speed and agreement only, never task accuracy"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-shaped")
    p.add_argument("--budget", type=int, default=64, help="K of the pruned artifact (default: %(default)s)")
    p.add_argument("--precisions", default="fp32,fp16,bf16,int8,fp8,int4", help="fp8 is skipped below compute capability 8.9")
    p.add_argument("--mixed", action="append", default=None, metavar="SPEC",
                   help="a per-graph precision also checked, e.g. vision=fp16,decoder=int4 (repeat; default: that one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work", type=Path, default=ROOT / "bench/results/gpu_artifacts")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_check.json")
    return p.parse_args(argv)


def environment() -> dict:
    try:
        import tensorrt

        from prunert.runtime.cuda import compute_capability, device_name
    except ImportError as exc:
        sys.exit(f"gpu_check: needs tensorrt and cuda-python ({exc}); see docs/deploy.md")
    import onnxruntime
    import torch

    return {"gpu": device_name(), "compute_capability": compute_capability(), "tensorrt": tensorrt.__version__,
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "statement": STATEMENT}


def export(preset: str, budget: int, method: str, work: Path, log) -> Path:
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.errors import PrunertError
    from prunert.export.pipeline import export_artifact
    from prunert.manifest import load_manifest

    out = work / f"{preset}-{method}-k{budget}"
    try:
        manifest = load_manifest(out)
        if (manifest.budget.budget, manifest.budget.method) == (budget, method):
            log(f"{out.name}: reusing")
            return out
    except PrunertError:
        pass
    start = time.perf_counter()
    export_artifact(f"synthetic:{preset}", out, BudgetConfig(budget=budget, method=method), ExportConfig(), overwrite=True, log=log)
    log(f"{out.name}: exported in {time.perf_counter() - start:.0f} s")
    return out


def make_variant(artifact: Path, precision: str, log) -> dict:
    """Make one precision's graphs if the artifact lacks them (convert, calibrate or quantize); record the costs."""
    from prunert.calibration.dataset import collect_feeds, load_calibration_set
    from prunert.calibration.quantize import calibrate_artifact
    from prunert.calibration.weight_only_command import quantize_artifact
    from prunert.config import CalibrationConfig, PrecisionConfig
    from prunert.export.precision import convert_artifact
    from prunert.manifest import load_manifest
    from prunert.runtime import VLMPipeline

    record: dict = {}
    if precision == "fp32" or precision in load_manifest(artifact, verify_hashes=False).variants:
        return record
    start = time.perf_counter()
    calibration = load_calibration_set(CALIBRATION, None, 16)
    if precision in ("fp16", "bf16"):
        feeds = collect_feeds(VLMPipeline(artifact), calibration)
        convert_artifact(artifact, PrecisionConfig(precision=precision), feeds, log=log)
    elif precision in ("int8", "fp8"):
        _, drift = calibrate_artifact(artifact, calibration, CalibrationConfig(precision=precision), log=log)
        record["cpu_drift"] = drift.to_dict()
    elif precision == "int4":
        _, drift = quantize_artifact(artifact, calibration, log=log)
        record["cpu_drift"] = drift.to_dict()
    record[f"{precision}_graphs_s"] = time.perf_counter() - start
    return record


def prepare_precision(artifact: Path, spec: str, log) -> dict:
    """Make the graphs of a precision spec ("fp16", or per graph "vision=fp16,decoder=int4") and build each graph's
    engine from its own variant; record the costs."""
    from prunert.config import GRAPH_NAMES, EngineBuildConfig, GraphPrecisions
    from prunert.engines.builder import build_engines

    precisions = GraphPrecisions.parse(spec)
    record: dict = {}
    for precision in sorted({precisions.of(role) for role in GRAPH_NAMES}):
        record.update(make_variant(artifact, precision, log))
    start = time.perf_counter()
    engines = {}
    for role in GRAPH_NAMES:
        manifest = build_engines(artifact, EngineBuildConfig(precision=precisions.of(role), graphs=(role,)), log=log)
        engines.update({e.graph: {"precision": e.precision, "bytes": (artifact / e.file).stat().st_size, "build_s": e.build_seconds}
                        for e in manifest.engines if e.graph == role and e.precision == precisions.of(role)})
    record["build_s"] = time.perf_counter() - start
    record["engines"] = engines
    return record


def parity(artifact: Path, precision: str) -> dict:
    from prunert.parity.reference import run_parity

    report = run_parity(artifact, IMAGE, prompt_for(artifact), backend="trt", precision=precision)
    print(report.table())
    return {"verdict": report.verdict, "tolerances": report.tolerances,
            "checks": [{"stage": c.stage, "metric": c.metric, "value": c.value, "status": c.status} for c in report.checks]}


def timings(artifact: Path, precision: str, repeats: int, new_tokens: int) -> dict:
    """Median and best over repeats of one request: vision engine, prefill, TTFT, decode tok/s."""
    from prunert.runtime import VLMPipeline

    pipe = VLMPipeline(artifact, backend="trt", precision=precision)
    runs = [_request(pipe, new_tokens) for _ in range(repeats + 1)][1:]  # first = warm-up
    out = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        out[key] = {"median": statistics.median(values), "best": min(values) if key.endswith("_s") else max(values)}
    return out


def prompt_for(artifact: Path) -> str:
    from prunert.manifest import load_manifest

    return load_manifest(artifact, verify_hashes=False).text.placeholder + QUESTION


def _request(pipe, new_tokens: int) -> dict:
    from prunert.runtime.decode import decode_steps, greedy, table_embedder

    prompt = pipe.manifest.text.placeholder + QUESTION
    start = time.perf_counter()
    sequences = pipe.tokenize([prompt])
    vision = pipe.encode_images([IMAGE], [prompt])
    state = pipe.prefill(sequences, vision)
    ttft = time.perf_counter() - start
    positions = pipe.artifact.host.next_position_ids(state.position_ids, state.attention_mask)  # [1, 1] (M-RoPE: [3, 1, 1]), as VLMPipeline decodes
    start = time.perf_counter()
    for _ in decode_steps(state.session, state.logits[:, -1], state.attention_mask, positions, table_embedder(pipe.artifact.embeddings, pipe.embeds_dtype),
                          greedy, new_tokens + 1):  # greedy, EOS ignored: new_tokens decoder calls after the prefill's choice
        pass
    decode = time.perf_counter() - start
    return {"vision_s": pipe.timings.vision_s, "prefill_s": pipe.timings.prefill_s, "ttft_s": ttft,
            "decode_s": decode, "decode_tok_per_s": new_tokens / decode}


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    report: dict = {"environment": environment(), "preset": args.preset, "budget": args.budget, "question": QUESTION,
                    "image": str(IMAGE.relative_to(ROOT)), "artifacts": {}}
    cc = float(report["environment"]["compute_capability"])
    precisions = [p for p in args.precisions.split(",") if p and not (p == "fp8" and cc < 8.9)]
    precisions += args.mixed if args.mixed is not None else ["vision=fp16,decoder=int4"]
    report["skipped"] = [] if "fp8" in precisions else [f"fp8: compute capability {cc} < 8.9"]
    from prunert.adapters import resolve_source
    from prunert.errors import PrunertError
    from prunert.manifest import load_manifest

    pruned = export(args.preset, args.budget, "resprune", args.work, log)
    num_tokens = load_manifest(pruned).budget.num_visual_tokens
    unpruned = export(args.preset, num_tokens, "none", args.work, log)
    resolve_source(f"synthetic:{args.preset}")  # the parity reference loads the same checkpoint
    failed = False
    for label, artifact in (("pruned", pruned), ("unpruned", unpruned)):
        rows = report["artifacts"][label] = {"path": str(artifact), "precisions": {}}
        for precision in precisions:
            row = rows["precisions"][precision] = {}
            try:
                row.update(prepare_precision(artifact, precision, log))
                row["parity"] = parity(artifact, precision)
                failed |= row["parity"]["verdict"] != "PASS"
                row["timings"] = timings(artifact, precision, args.repeats, args.new_tokens)
            except PrunertError as exc:
                row["error"] = str(exc)
                failed = True
                log(f"{label} {precision}: {exc}")
    report["ratios"] = ratios(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_summary(report)
    print(f"report: {args.out}")
    return 1 if failed else 0


def ratios(report: dict) -> dict:
    """Side-by-side ratios from this run: unpruned / K (TTFT, vision), K / unpruned (decode tok/s), fp32 / precision."""
    pruned, unpruned = (report["artifacts"][k]["precisions"] for k in ("pruned", "unpruned"))
    out: dict = {}
    for precision, row in pruned.items():
        other = unpruned.get(precision, {})
        if "timings" not in row or "timings" not in other:
            continue
        t, u = row["timings"], other["timings"]
        out[precision] = {
            "ttft_unpruned_over_pruned": u["ttft_s"]["best"] / t["ttft_s"]["best"],
            "decode_pruned_over_unpruned": t["decode_tok_per_s"]["best"] / u["decode_tok_per_s"]["best"],
            # the selection step: vision engine with the ResPrune op minus the unpruned vision engine
            "selection_s_by_difference": t["vision_s"]["best"] - u["vision_s"]["best"],
        }
        if precision != "fp32" and "timings" in pruned.get("fp32", {}):
            base = pruned["fp32"]["timings"]
            out[precision]["ttft_fp32_over_this"] = base["ttft_s"]["best"] / t["ttft_s"]["best"]
            out[precision]["vision_fp32_over_this"] = base["vision_s"]["best"] / t["vision_s"]["best"]
    return out


def print_summary(report: dict) -> None:
    print(f"\n{report['environment']['gpu']} (sm {report['environment']['compute_capability']}), TensorRT {report['environment']['tensorrt']}")
    print(f"{'artifact':<9} {'prec':<5} {'parity':<7} {'vision ms':>9} {'TTFT ms':>8} {'tok/s':>7}")
    for label, rows in report["artifacts"].items():
        for precision, row in rows["precisions"].items():
            t = row.get("timings")
            cells = (f"{t['vision_s']['best'] * 1e3:9.1f} {t['ttft_s']['best'] * 1e3:8.1f} {t['decode_tok_per_s']['best']:7.1f}"
                     if t else f"{'error: ' + row.get('error', '')[:60]}")
            print(f"{label:<9} {precision:<5} {row.get('parity', {}).get('verdict', '-'):<7} {cells}")
    for precision, r in report["ratios"].items():
        print(f"{precision}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
    print(STATEMENT)


if __name__ == "__main__":
    sys.exit(main())
