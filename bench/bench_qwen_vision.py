"""Qwen2.5-VL's vision graph at real resolutions: time and peak memory vs the patch count P, for

  new     prunert's graph: the window layers as padded windows, [W, heads, L, L] scores (prunert.adapters.qwen2_5_vl.windows)
  masked  the graph it replaced (commit f1178a2): every window layer one [heads, P, P] softmax with an additive
          window mask built in the graph from window_segments; rebuilt here only (MaskedVisionGraph), not in the product
  hf      Hugging Face eager: the tower's own forward (a loop over the windows' cu_seqlens splits), torch, fp32

on a synthetic checkpoint (default qwen2.5-vl-shaped: Qwen2.5-VL-3B's vision tower, 32 layers, 16 heads, 4 full).
Each (variant, P) runs in a child process of its own, so its peak RSS is its own: the child loads the graph, then
resets the kernel's high-water mark (/proc/self/clear_refs 5) and runs one warm-up and --runs timed calls; the peak
is VmHWM over those calls (weights resident + activations). Rounds interleave the variants and sizes; a speed probe
(bench_vlm.speed_probe) runs before every child. Threads are passed explicitly (ORT intra-op, torch). A size whose
full-attention layers cannot fit --max-rss-gb (every variant keeps [heads, P, P] fp32 scores there) is skipped with
the reason recorded. Weights are seeded random: speed and memory only; outputs are compared with HF's for equality.

    python bench/bench_qwen_vision.py                                           # P = 1296, 2304, 5120, 16384
    python bench/bench_qwen_vision.py --preset qwen2.5-vl-tiny --sizes 64,256 --rounds 1 --runs 1   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_vlm import machine, speed_probe, versions  # noqa: E402

VARIANTS = ("masked", "new", "hf")
UNIT = 4  # patches per merged token (merge 2 x 2)
STATEMENT = "weights are synthetic (seeded random): time and memory only; outputs checked equal to Hugging Face's"


def log(message: str) -> None:
    print(f"[bench_qwen_vision] {message}", file=sys.stderr, flush=True)


def grid_of(patches: int) -> tuple[int, int]:
    """The squarest merged grid rows x cols of patches / 4 tokens (1296 -> 18 x 18, 5120 -> 32 x 40)."""
    tokens = patches // UNIT
    if tokens * UNIT != patches:
        raise SystemExit(f"bench: error: --sizes {patches}: expected a multiple of {UNIT} patches")
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rows, tokens // rows


# ---- the masked graph of commit f1178a2 (bench only) ----------------------------------------------------------------
def masked_graph(adapter):
    import torch

    class MaskedVisionGraph(torch.nn.Module):
        """prunert's vision graph before the padded windows: window_segments [P] -> an additive [1, 1, P, P] mask, one
        softmax over all P patches in every layer (the window layers masked). Verbatim from QwenExportAdapter.vision_features
        at commit f1178a2."""

        def __init__(self):
            super().__init__()
            self.visual = adapter.visual

        def forward(self, pixel_values, rotary_cos, rotary_sin, window_segments, reverse_index):
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward

            visual = self.visual
            x = visual.patch_embed(pixel_values)  # [P, Dv]
            same = window_segments[:, None] == window_segments[None, :]  # [P, P]
            window_bias = torch.where(same, 0.0, torch.finfo(x.dtype).min).to(x.dtype)[None, None]  # [1, 1, P, P]
            for layer, block in enumerate(visual.blocks):
                attn, length = block.attn, x.shape[0]
                q, k, v = attn.qkv(block.norm1(x)).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, rotary_cos, rotary_sin)
                q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, P, head_dim]
                bias = None if layer in adapter.full_attention else window_bias
                out, _ = eager_attention_forward(attn, q, k, v, bias, scaling=attn.scaling)  # [1, P, heads, head_dim]
                x = x + attn.proj(out.reshape(length, -1))
                x = x + block.mlp(block.norm2(x))
            return visual.merger(x).index_select(0, reverse_index)[None]  # [1, N, D]

    return MaskedVisionGraph()


def masked_inputs(new_inputs: dict) -> dict:
    from prunert.adapters.qwen2_5_vl import host

    kept = {name: new_inputs[name] for name in ("pixel_values", "rotary_cos", "rotary_sin")}
    return {**kept, **host.masked_window_inputs(new_inputs), "reverse_index": new_inputs["reverse_index"]}


# ---- children ---------------------------------------------------------------------------------------------------------
def _adapter(checkpoint: Path, max_tokens: int):
    from prunert.adapters.qwen2_5_vl.export import QwenExportAdapter
    from prunert.config import PixelRange

    adapter = QwenExportAdapter(checkpoint)
    adapter.fit_pixel_range(PixelRange(max_pixels=max_tokens * adapter.preprocess.factor**2))  # dims up to the largest P
    return adapter


def export_child(variant: str, checkpoint: Path, max_tokens: int, out: Path) -> dict:
    import torch
    from torch.export import Dim

    from prunert.adapters.qwen2_5_vl import export as qwen
    from prunert.export.pipeline import _quiet_exporter

    start = time.perf_counter()
    adapter = _adapter(checkpoint, max_tokens)
    args, dynamic, inputs, outputs = qwen.vision_features_export_spec(adapter)
    module = qwen.QwenVisionGraph(adapter).eval()
    if variant == "masked":
        module = masked_graph(adapter).eval()
        example = {name: value.numpy() for name, value in zip(adapter.vision_input_names, args)}
        args = tuple(torch.from_numpy(v) for v in masked_inputs(example).values())
        merged = Dim("merged", min=adapter.min_visual_tokens, max=adapter.max_visual_tokens)
        dynamic = ({0: UNIT * merged},) * 4 + ({0: merged},)
        inputs = [(name, "", ()) for name in ("pixel_values", "rotary_cos", "rotary_sin", "window_segments", "reverse_index")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(module, args, str(out), dynamo=True, opset_version=20, dynamic_shapes=dynamic, external_data=True,
                          input_names=[n for n, _, _ in inputs], output_names=[n for n, _, _ in outputs], optimize=True, verbose=False)
    return {"export_s": time.perf_counter() - start, "file": str(out)}


def _memory_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def _reset_peak() -> float:
    """Give freed memory back (gc, malloc_trim), reset the kernel's high-water mark to the current RSS -> that RSS in MB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    return _memory_kb("VmRSS") / 1024


def _inputs(patches: int, family: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Seeded pixels of the squarest grid of `patches` (HF order), its grid_thw, and the new graph's host inputs."""
    from prunert.adapters.qwen2_5_vl import host

    rows, cols = grid_of(patches)
    grid = np.array([[1, 2 * rows, 2 * cols]])
    pixels = np.random.default_rng(patches).standard_normal((patches, 1176)).astype(np.float32)
    return pixels, grid, host.graph_vision_inputs(pixels, grid, family)


def _runner(variant: str, checkpoint: Path, graph: str, threads: int):
    """variant -> call(pixels, grid, feeds) -> tokens [1, N, D] (numpy); feeds: the variant's graph inputs."""
    import torch

    if variant == "hf":
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
        visual = model.model.visual
        del model  # the decoder's weights go: only the tower is measured

        def call(pixels, grid, feeds):
            with torch.inference_mode():
                return visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()[None]
        return call
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_cpu_mem_arena = False  # every tensor freed when dead: RSS is the live set, measurable per call
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def call(pixels, grid, feeds):
        return session.run(None, feeds)[0]
    return call


def measure_child(variant: str, checkpoint: Path, graph: str, sizes: list[int], threads: int, runs: int, work: Path) -> list[dict]:
    """One variant at every size, in one process: load, one warm-up call at the smallest size, then per size: the
    high-water mark reset, `runs` timed calls, VmHWM (weights resident + that size's activations); outputs saved."""
    import torch

    from prunert.adapters.qwen2_5_vl import host

    torch.set_num_threads(threads)
    family = host.family_config(json.loads((checkpoint / "config.json").read_text()))
    start = time.perf_counter()
    call = _runner(variant, checkpoint, graph, threads)
    load_s = time.perf_counter() - start

    def inputs(patches: int):
        pixels, grid, feeds = _inputs(patches, family)
        return pixels, grid, masked_inputs(feeds) if variant == "masked" else feeds

    call(*inputs(min(sizes)))  # warm-up: kernels, thread pools
    records = []
    for patches in sizes:
        pixels, grid, feeds = inputs(patches)
        layout = host.graph_vision_inputs(pixels, grid, family)["window_gather"].shape  # [windows, window_len] of the new graph
        resident = _reset_peak()
        seconds, out = [], None
        for _ in range(runs):
            begin = time.perf_counter()
            out = call(pixels, grid, feeds)
            seconds.append(time.perf_counter() - begin)
        peak = _memory_kb("VmHWM") / 1024
        np.save(work / f"out-{variant}-{patches}.npy", out)
        del out
        records.append({"variant": variant, "patches": patches, "merged": patches // UNIT, "grid": list(grid_of(patches)),
                        "windows": int(layout[0]), "window_len": int(layout[1]),
                        "threads": threads, "load_s": load_s, "seconds": seconds, "rss_before_mb": resident, "peak_rss_mb": peak})
    return records


# ---- parent ---------------------------------------------------------------------------------------------------------
def code_key(checkpoint: Path, max_tokens: int) -> str:
    """The exported graphs' cache key: the checkpoint, the largest P, and the source of what the graphs compute."""
    import inspect

    from prunert.adapters.qwen2_5_vl import export, host, windows

    digest = hashlib.sha256(f"{checkpoint.name}:{max_tokens}".encode())
    for part in (export.QwenExportAdapter.vision_features, export._attention, export.QwenExportAdapter.vision_dim_ranges,
                 export.QwenExportAdapter.vision_dynamic_shapes, host.graph_vision_inputs, windows, masked_graph, export_child):
        digest.update(inspect.getsource(part).encode())
    return digest.hexdigest()[:12]


def child(*argv: str, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large buffers mmapped: freed memory leaves RSS at once
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"child {argv[:3]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


LIVE_HEADS = {"masked": None, "hf": None, "new": 1}  # heads whose [P, P] scores a full-attention layer holds at once (None: all)


def skip_reason(variant: str, patches: int, heads: int, weights_gb: float, max_rss_gb: float) -> str | None:
    """A full-attention layer holds [live heads, P, P] fp32 scores, at least two such tensors at once (scores and their
    softmax): a size where that and the tower's weights exceed the memory budget is not run (masked and HF eager hold
    every head's at once; the new graph one head's)."""
    live = LIVE_HEADS[variant] or heads
    scores = live * patches**2 * 4 / 1e9
    need = 2 * scores + weights_gb
    if need <= max_rss_gb:
        return None
    return (f"full-attention scores [{live}, P, P] fp32 are {scores:.1f} GB, at least two live (scores, softmax), plus {weights_gb:.1f} GB "
            f"of weights: >= {need:.0f} GB > {max_rss_gb:g} GB")


def summary(runs: list[dict]) -> dict:
    seconds = [s for run in runs for s in run["seconds"]]
    return {"median_s": statistics.median(seconds), "best_s": min(seconds), "runs_s": seconds,
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs), "rss_before_mb": statistics.median(run["rss_before_mb"] for run in runs),
            **{k: runs[0][k] for k in ("merged", "grid", "windows", "window_len") if k in runs[0]}}


def table(results: dict, sizes: list[int]) -> str:
    """Per P: each variant's median (best) seconds over the rounds and its peak RSS; ratios of the best runs (another
    process on the machine only ever slows a run: the speed probe says how much)."""
    head = ("| P (merged) | windows x len | masked: s median (best) / peak MB | new: s median (best) / peak MB | "
            "HF eager: s median (best) / peak MB | new vs masked | new vs HF | window-layer scores per head: masked -> new |")
    lines = [head, "|" + "---|" * 8]
    for patches in sizes:
        row = results[str(patches)]
        new = row.get("new", {})
        cell = {v: (f"{row[v]['median_s']:.1f} ({row[v]['best_s']:.1f}) / {row[v]['peak_rss_mb']:.0f}" if "median_s" in row[v]
                    else "skipped: " + row[v]["skipped"]) for v in VARIANTS if v in row}
        ratio = {v: f"{row[v]['best_s'] / new['best_s']:.2f}x faster" for v in ("masked", "hf")
                 if "best_s" in row.get(v, {}) and "best_s" in new}
        windows, width = (new.get("windows", 0), new.get("window_len", 0))
        layout = f"{windows} x {width}" if windows else "-"
        scores = f"{patches**2 / 1e6:.1f}M -> {windows * width**2 / 1e6:.2f}M" if windows else "-"
        lines.append(f"| {patches} ({patches // UNIT}) | {layout} | {cell.get('masked', '-')} | {cell.get('new', '-')} | "
                     f"{cell.get('hf', '-')} | {ratio.get('masked', '-')} | {ratio.get('hf', '-')} | {scores} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-vl-shaped")
    p.add_argument("--sizes", default="1296,2304,5120,16384", help="patch counts P (4 per merged token)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="timed calls per child after its warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-rss-gb", type=float, default=24.0)
    p.add_argument("--once-above", type=int, default=5120, help="sizes above this P run in the first round only (minutes each)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", type=Path, default=ROOT / "build" / "bench_qwen_vision")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qwen_vision.json")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args, started = parse_args(argv), time.perf_counter()
    from prunert.adapters import resolve_source

    checkpoint = resolve_source(f"synthetic:{args.preset}").path
    if args.child:
        kind, *rest = args.child
        if kind == "export":
            print(json.dumps(export_child(rest[0], checkpoint, int(rest[1]), Path(rest[2]))))
        else:
            sizes = [int(p) for p in rest[2].split(",")]
            print(json.dumps(measure_child(rest[0], checkpoint, rest[1], sizes, args.threads, args.runs, args.work)))
        return 0
    sizes, variants = [int(s) for s in args.sizes.split(",")], [v for v in args.variants.split(",") if v]
    environment = {"machine": machine(), "versions": versions()}
    vision = json.loads((checkpoint / "config.json").read_text())["vision_config"]
    from prunert.adapters.qwen2_5_vl.synthetic import get_preset, parameter_counts

    weights_gb = parameter_counts(get_preset(args.preset))["vision"] * 4 / 1e9  # the tower's fp32 weights
    skipped = {(v, p): skip_reason(v, p, vision["num_heads"], weights_gb, args.max_rss_gb) for v in variants for p in sizes}
    runnable = {v: [p for p in sizes if skipped[(v, p)] is None] for v in variants}
    max_tokens = max(p for sizes_of in runnable.values() for p in sizes_of) // UNIT
    graphs = {}
    for variant in (v for v in variants if v != "hf"):
        path = args.work / f"{variant}-{code_key(checkpoint, max_tokens)}" / "vision.onnx"
        if not path.exists():
            log(f"exporting the {variant} graph (up to {max_tokens} merged tokens) -> {path}")
            record = child("--preset", args.preset, "--child", "export", variant, str(max_tokens), str(path), timeout=args.timeout_s)
            log(f"  {record['export_s']:.0f} s")
        graphs[variant] = str(path)
    runs: dict[tuple[str, int], list[dict]] = {}
    probes: list[float] = []
    args.work.mkdir(parents=True, exist_ok=True)
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:  # interleaved: the order rotates every round
            sizes_now = [p for p in runnable[variant] if round_index == 0 or p <= args.once_above]  # the largest: one round
            if not sizes_now:
                continue
            probe, load = speed_probe(), os.getloadavg()[0]
            records = child("--preset", args.preset, "--threads", str(args.threads), "--runs", str(args.runs), "--work", str(args.work),
                            "--child", "measure", variant, graphs.get(variant, "-"), ",".join(map(str, sizes_now)),
                            timeout=args.timeout_s)
            probes.append(probe)
            for record in records:
                record.update(round=round_index, probe_ms=probe, load_avg=load)
                runs.setdefault((variant, record["patches"]), []).append(record)
                log(f"round {round_index}: {variant:6s} P={record['patches']}: {min(record['seconds']):.2f} s, "
                    f"peak {record['peak_rss_mb']:.0f} MB (probe {probe:.0f} ms, load {load:.2f})")
        results = collect(runs, variants, runnable, sizes, skipped, args.work)
        write(args, environment, checkpoint, sizes, probes, runs, results, started)  # after every round: a cut-short run keeps its rounds
    return 0


def collect(runs: dict, variants: list[str], runnable: dict, sizes: list[int], skipped: dict, work: Path) -> dict:
    results: dict[str, Any] = {}
    for patches in sizes:
        row = results[str(patches)] = {v: summary(runs[(v, patches)]) if (v, patches) in runs else {"skipped": skipped[(v, patches)]}
                                       for v in variants if (v, patches) in runs or skipped[(v, patches)]}
        if (("hf", patches)) in runs:
            ref = np.load(work / f"out-hf-{patches}.npy")
            for v in row:
                if v != "hf" and (v, patches) in runs:
                    row[v]["max_abs_vs_hf"] = float(np.abs(np.load(work / f"out-{v}-{patches}.npy") - ref).max())
    return results


def write(args, environment: dict, checkpoint: Path, sizes: list[int], probes: list[float], runs: dict, results: dict,
          started: float) -> None:
    markdown = table(results, sizes)
    print(markdown, flush=True)
    report = {"statement": STATEMENT, "preset": args.preset, "checkpoint": str(checkpoint), "sizes": sizes, "rounds": args.rounds, "once_above": args.once_above,
              "runs_per_child": args.runs, "threads": args.threads, "max_rss_gb": args.max_rss_gb, **environment,
              "speed_probe_ms": {"median": statistics.median(probes) if probes else None, "max": max(probes, default=None)},
              "results": results, "raw": [r for rs in runs.values() for r in rs], "table": markdown,
              "total_wall_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
