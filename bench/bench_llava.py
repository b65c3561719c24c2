"""First prunert benchmark: LLaVA-1.5-shaped TTFT and decode tokens/s, ONNX Runtime vs Hugging Face eager.

Exports (or reuses) one artifact per budget K plus the unpruned baseline (method "none"), times each
with the ORT `VLMPipeline`, times Hugging Face eager `generate` on the same synthetic checkpoint, and
times the ResPrune selection op alone; reports ratios measured side by side in this run and a JSON
file of raw numbers. Weights are synthetic (seeded random): speed only, never accuracy.

    python bench/bench_llava.py                                      # llava-1.5-shaped, K = 64,128,192
    python bench/bench_llava.py --preset llava-tiny --budgets 16,32  # smoke mode
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = ROOT / "examples/images/astronaut.jpg"
PROMPT = "<image>\nWhat is the astronaut holding?"
SELECTION_RUNS = 20  # the selection op alone takes milliseconds: more runs
STATEMENT = "weights are synthetic (seeded random): only speed is measured, not accuracy"
STATS = {"median": statistics.median, "best": min}  # over rounds; "best" = the fastest run (min time)
DEFINITIONS = "bench/README.md, section 'What is measured'"  # TTFT, tok/s, ratios, rounds, median/best, probe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-shaped", help="synthetic preset (default: %(default)s)")
    p.add_argument("--budgets", default="64,128,192", help="comma-separated K values (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each times every configuration once after a warm-up")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps per run (EOS ignored)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/llava.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/results/artifacts", help="artifact directory")
    p.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face eager baseline")
    args = p.parse_args(argv)
    args.budgets = sorted({int(k) for k in args.budgets.split(",") if k.strip()})
    if args.repeats < 1 or args.new_tokens < 2:
        p.error("--repeats must be >= 1 and --new-tokens >= 2")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_mb() -> float:  # this process's peak resident memory; Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PROBE = np.random.default_rng(0).standard_normal((768, 768)).astype(np.float32)


def speed_probe() -> float:
    """ms of a fixed matmul on all cores (~25 ms at full speed), after ORT's worker threads stop spinning."""
    time.sleep(0.2)
    start = time.perf_counter()
    for _ in range(6):
        _PROBE @ _PROBE
    return (time.perf_counter() - start) * 1e3


# ---- 1. artifacts -----------------------------------------------------------------------------
def configurations(preset: str, budgets: list[int]) -> list[dict]:
    from prunert.adapters.llava.synthetic import get_preset

    n = get_preset(preset).num_patches
    if any(not 0 < k < n for k in budgets):
        raise SystemExit(f"bench: error: --budgets {budgets}: expected 1 <= K < {n} for {preset}")
    rows = [{"label": f"K={k}", "budget": k, "method": "resprune"} for k in budgets]
    return rows + [{"label": f"unpruned (N={n})", "budget": n, "method": "none"}]


def export_record(directory: Path) -> Path:
    return directory.with_name(directory.name + ".export.json")


def artifact_matches(directory: Path, preset: str, budget: int, method: str, checkpoint: str) -> bool:
    """Manifest loads, hashes verify, budget/method/params match, and it came from today's checkpoint
    (the manifest names only "synthetic:<preset>"; the record beside the artifact names the cache directory)."""
    from prunert.config import BudgetConfig
    from prunert.errors import PrunertError
    from prunert.manifest import load_manifest
    from prunert.pruning_ops import method_params

    record = export_record(directory)
    if not record.is_file() or json.loads(record.read_text()).get("checkpoint") != checkpoint:
        return False
    try:
        m = load_manifest(directory, verify_hashes=True)  # a truncated file or an older schema: re-export
    except PrunertError:
        return False
    wanted = (f"synthetic:{preset}", budget, method, method_params(BudgetConfig(budget=budget, method=method)))
    return (m.source.model, m.budget.budget, m.budget.method, m.budget.params) == wanted


def _export_child(preset: str, out_dir: str, budget: int, method: str) -> dict:
    """Runs in a fresh process, so its peak RSS is this export's."""
    from prunert.adapters.llava.synthetic import synthetic_checkpoint
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    checkpoint, start = synthetic_checkpoint(preset).name, time.perf_counter()
    export_artifact(f"synthetic:{preset}", Path(out_dir), BudgetConfig(budget=budget, method=method), ExportConfig(),
                    overwrite=True, log=lambda m: print(f"    export: {m}", flush=True))
    if synthetic_checkpoint(preset).name != checkpoint:
        raise RuntimeError(f"synthetic preset {preset} changed during the export; re-run")
    return {"export_s": time.perf_counter() - start, "export_peak_rss_mb": peak_rss_mb(), "checkpoint": checkpoint}


def prepare_artifacts(args: argparse.Namespace, rows: list[dict], checkpoint: str) -> None:
    for row in rows:
        directory = args.work / f"{args.preset}-{row['method']}-k{row['budget']}"
        row["artifact"] = str(directory)
        if artifact_matches(directory, args.preset, row["budget"], row["method"], checkpoint):
            log(f"{row['label']}: reusing {directory}")
            row.update(json.loads(export_record(directory).read_text()), reused=True)  # export time survives a reuse
            continue
        log(f"{row['label']}: exporting to {directory}")
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(_export_child, args.preset, str(directory), row["budget"], row["method"]).result()
        result["artifact_bytes"] = sum(p.stat().st_size for p in directory.iterdir())
        export_record(directory).write_text(json.dumps(result) + "\n")
        row.update(result, reused=False)
        log(f"{row['label']}: exported in {result['export_s']:.1f} s, peak RSS {result['export_peak_rss_mb']:.0f} MB")


# ---- 2. ONNX Runtime --------------------------------------------------------------------------
def ort_request(pipe, new_tokens: int) -> dict:
    """One request, timed by stage; then exactly `new_tokens` greedy decoder steps (EOS ignored)."""
    start = time.perf_counter()
    sequences = pipe.tokenize([PROMPT])
    t_tok = time.perf_counter()
    vision = pipe.encode_images([IMAGE], [PROMPT])  # load + preprocess + content words + vision graph
    t_vis = time.perf_counter()
    state = pipe.prefill(sequences, vision)  # splice + prefill graph
    ttft = time.perf_counter() - start
    decode_s = ort_decode(pipe, state, new_tokens)
    t = pipe.timings
    return {"ttft_s": ttft, "tokenize_s": t_tok - start, "host_preprocess_s": t_vis - t_tok - t.vision_s, "vision_s": t.vision_s,
            "splice_s": start + ttft - t_vis - t.prefill_s, "prefill_s": t.prefill_s, "decode_s": decode_s,
            "prefill_length": int(state.attention_mask.shape[1])}


def ort_decode(pipe, state, steps: int) -> float:
    table = pipe.artifact.embeddings
    logits, session = state.logits[:, -1], state.session  # [B, V]; the session holds the KV cache (IOBinding)
    mask, positions = state.attention_mask, state.position_ids[:, -1:]
    one = np.ones((mask.shape[0], 1), np.int64)
    start = time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(axis=-1)  # greedy, EOS ignored
        mask, positions = np.concatenate([mask, one], axis=1), positions + 1
        logits = session.run(np.asarray(table[token], np.float32)[:, None], mask, positions)[:, -1]
    return time.perf_counter() - start


def ort_round(row: dict, new_tokens: int) -> dict:
    """Load the artifact's pipeline, warm up, time one request, unload (memory: one artifact at a time)."""
    from prunert.runtime import Artifact, VLMPipeline

    start = time.perf_counter()
    pipe = VLMPipeline(Artifact(row["artifact"], verify_hashes=False))  # hashes were checked in prepare_artifacts
    load_s = time.perf_counter() - start
    ort_request(pipe, 2)  # warm-up: the first run allocates
    probe = speed_probe()
    run = ort_request(pipe, new_tokens)
    run.update(load_s=load_s, probe_ms=probe, probe_after_ms=speed_probe(), peak_rss_mb=peak_rss_mb())
    if row["method"] == "none" and "_tokens" not in row:
        keep_selection_inputs(row, pipe)
    del pipe
    gc.collect()
    return run


def keep_selection_inputs(row: dict, pipe) -> None:
    """The real projector outputs [1, N, D] (the unpruned graph keeps all, in order), the prompt's words and ids."""
    from prunert.runtime.text import content_word_groups, text_relevance_inputs

    row["_tokens"] = pipe.encode_images([IMAGE], [PROMPT]).visual_tokens
    groups = [content_word_groups(pipe.artifact.tokenizer, PROMPT, pipe.artifact.special_ids)]
    row["_text"] = text_relevance_inputs(groups, pipe.artifact.embeddings, pipe.manifest.text.max_text_tokens)
    row["_ids"] = pipe.tokenize([PROMPT])[0]


def ort_summary(runs: list[dict], new_tokens: int) -> dict:
    out = {}
    for stat, f in STATS.items():
        out[stat] = {key: float(f(r[key] for r in runs)) for key in runs[0] if key.endswith("_s")}
        out[stat]["decode_tok_s"] = new_tokens / out[stat]["decode_s"]
    return out


# ---- 3. Hugging Face eager --------------------------------------------------------------------
class HFEager:
    """The baseline a user would pick instead: transformers eager attention, its own processor, `generate`."""

    def __init__(self, preset: str):
        import torch
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        from prunert.adapters.llava import LLAVA_PROMPT_TEMPLATE
        from prunert.adapters.llava.synthetic import synthetic_checkpoint

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.directory, self.model = torch, synthetic_checkpoint(preset), None
        self.processor = AutoProcessor.from_pretrained(self.directory)
        self.text = LLAVA_PROMPT_TEMPLATE.format(prompt=PROMPT)

    def load(self) -> float:
        from transformers import LlavaForConditionalGeneration

        start = time.perf_counter()
        self.model = LlavaForConditionalGeneration.from_pretrained(self.directory, attn_implementation="eager",
                                                                   dtype=self.torch.float32).eval()
        return time.perf_counter() - start

    def inputs(self, **kwargs):
        from PIL import Image

        with Image.open(IMAGE) as image:
            return self.processor(images=image.convert("RGB"), text=self.text, **kwargs)

    def request(self, count: int) -> tuple[float, float]:
        """(request wall clock, generate alone) for exactly `count` new tokens."""
        start = time.perf_counter()
        inputs = self.inputs(return_tensors="pt")
        t_gen = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                      pad_token_id=self.model.config.pad_token_id)
        end = time.perf_counter()
        assert out.shape[1] - inputs["input_ids"].shape[1] == count
        return end - start, end - t_gen

    def prompt_check(self, ort_ids: list[int]) -> dict:
        """The processor expands <image> to N image tokens; collapsed back, the ids must equal prunert's."""
        ids = list(self.inputs()["input_ids"][0])
        image_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
        return {"image_tokens": ids.count(image_id), "prompt_matches_ort": collapsed == list(ort_ids),
                "threads": self.torch.get_num_threads(), "checkpoint": self.directory.name}


def hf_round(hf: HFEager, new_tokens: int) -> dict:
    load_s = hf.load()
    hf.request(2)  # warm-up
    probe = speed_probe()
    first, full = hf.request(1), hf.request(new_tokens)
    hf.model = None
    gc.collect()
    return {"load_s": load_s, "probe_ms": probe, "probe_after_ms": speed_probe(), "ttft_s": first[0],
            "generate_1_s": first[1], "generate_n_s": full[1], "peak_rss_mb": peak_rss_mb()}


def hf_summary(runs: list[dict], new_tokens: int) -> dict:
    out = {}
    for stat, f in STATS.items():
        out[stat] = {key: float(f(r[key] for r in runs)) for key in ("ttft_s", "generate_1_s", "generate_n_s")}
        span = out[stat]["generate_n_s"] - out[stat]["generate_1_s"]
        out[stat]["decode_tok_s"] = (new_tokens - 1) / span if span > 0 else float("nan")  # nan: noise > decode time
    return out


def measure(args: argparse.Namespace, rows: list[dict]) -> dict | None:
    """Round-robin: each round times every configuration once, so a slow spell of the shared machine hits
    all of them alike instead of whichever ran then."""
    hf, hf_runs = (None if args.skip_hf else HFEager(args.preset)), []
    for round_ in range(1, args.repeats + 1):
        for row in rows[::-1]:  # unpruned first: it also yields the real projector outputs for step 4
            row.setdefault("ort_runs", []).append(r := ort_round(row, args.new_tokens))
            log(f"round {round_}/{args.repeats} ORT {row['label']}: TTFT {r['ttft_s'] * 1e3:.0f} ms (vision "
                f"{r['vision_s'] * 1e3:.0f}, prefill {r['prefill_s'] * 1e3:.0f}), decode {args.new_tokens / r['decode_s']:.2f} "
                f"tok/s, probe {r['probe_ms']:.0f}/{r['probe_after_ms']:.0f} ms")
        if hf:
            hf_runs.append(r := hf_round(hf, args.new_tokens))
            log(f"round {round_}/{args.repeats} HF eager: TTFT {r['ttft_s'] * 1e3:.0f} ms, generate 1/{args.new_tokens}: "
                f"{r['generate_1_s']:.2f}/{r['generate_n_s']:.2f} s, probe {r['probe_ms']:.0f}/{r['probe_after_ms']:.0f} ms")
    for row in rows:
        row["ort"] = ort_summary(row["ort_runs"], args.new_tokens)
    if not hf:
        return None
    result = {**hf_summary(hf_runs, args.new_tokens), **hf.prompt_check(rows[-1]["_ids"]), "runs": hf_runs}
    log(f"HF eager: {result['image_tokens']} image tokens, prompt ids match ORT: {result['prompt_matches_ort']}")
    return result


# ---- 4. the selection op alone ----------------------------------------------------------------
def select_only_module(budget: int):
    """The registered ResPrune op (resprune_select + gather_tokens) on [1, N, D], as in the vision graph."""
    import torch

    from prunert import pruning_ops
    from prunert.config import BudgetConfig

    class SelectOnly(torch.nn.Module):
        def forward(self, tokens, text, text_mask):
            inputs = {"tokens": tokens, "text": text, "text_mask": text_mask}
            return pruning_ops.select(inputs, BudgetConfig(budget=budget, method="resprune"))  # tokens, indices

    return SelectOnly().eval()


def time_selection(budget: int, tokens: np.ndarray, text: tuple[np.ndarray, np.ndarray], work: Path) -> dict:
    import onnxruntime as ort
    import torch

    path, start = work / f"select-only-k{budget}.onnx", time.perf_counter()
    feeds = {"tokens": tokens.astype(np.float32), "text": text[0], "text_mask": text[1]}
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(select_only_module(budget), args, str(path), dynamo=True, input_names=list(feeds),
                          output_names=["visual_tokens", "kept_indices"], optimize=True, verbose=False)
    export_s = time.perf_counter() - start
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(SELECTION_RUNS):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return {**{stat: float(f(times)) for stat, f in STATS.items()}, "runs": times, "export_s": export_s, "shape": list(tokens.shape)}


# ---- 5. report --------------------------------------------------------------------------------
def speedups(ref: dict, row: dict) -> dict:
    return {"ttft": ref["ttft_s"] / row["ttft_s"], "decode_tok_s": row["decode_tok_s"] / ref["decode_tok_s"]}


def add_ratios(rows: list[dict], hf: dict | None, selection: dict) -> None:
    """Ratios are speed-ups (> 1: faster than the reference), per statistic."""
    base = rows[-1]["ort"]
    for row in rows:
        row["vs_unpruned"] = {s: speedups(base[s], row["ort"][s]) for s in STATS}
        if hf:
            row["vs_hf_eager"] = {s: speedups(hf[s], row["ort"][s]) for s in STATS}
        if row is not rows[-1]:
            row["selection_share"] = {s: {"direct": selection[row["budget"]][s] / row["ort"][s]["vision_s"],
                                          "by_difference": 1 - base[s]["vision_s"] / row["ort"][s]["vision_s"]} for s in STATS}


def table(rows: list[dict], hf: dict | None, stat: str) -> str:
    head = (f"{'configuration':<22}{'TTFT ms':>9}{'tok/s':>8}{'vision ms':>11}{'prefill ms':>12}"
            f"{'TTFT x unpr':>13}{'tok/s x unpr':>14}{'TTFT x HF':>11}{'tok/s x HF':>12}")
    lines, nan = [head, "-" * len(head)], {"ttft": float("nan"), "decode_tok_s": float("nan")}
    for row in rows:
        o, u, h = row["ort"][stat], row["vs_unpruned"][stat], row.get("vs_hf_eager", {}).get(stat, nan)
        lines.append(f"{'ORT ' + row['label']:<22}{o['ttft_s'] * 1e3:>9.0f}{o['decode_tok_s']:>8.2f}{o['vision_s'] * 1e3:>11.0f}"
                     f"{o['prefill_s'] * 1e3:>12.0f}{u['ttft']:>13.2f}{u['decode_tok_s']:>14.2f}{h['ttft']:>11.2f}{h['decode_tok_s']:>12.2f}")
    if hf:
        u = speedups(rows[-1]["ort"][stat], hf[stat])
        lines.append(f"{'HF eager (all N)':<22}{hf[stat]['ttft_s'] * 1e3:>9.0f}{hf[stat]['decode_tok_s']:>8.2f}{'-':>11}{'-':>12}"
                     f"{u['ttft']:>13.2f}{u['decode_tok_s']:>14.2f}{1:>11.2f}{1:>12.2f}")
    return "\n".join(lines)


def headlines(rows: list[dict], hf: dict | None, selection: dict, probes: dict) -> list[str]:
    first, base = rows[0], rows[-1]

    def both(get, fmt="{:.2f}x") -> str:
        return ", ".join(f"{fmt.format(get(s))} ({s})" for s in STATS)

    out = [f"TTFT ratio {first['label']} vs unpruned: {both(lambda s: first['vs_unpruned'][s]['ttft'])} faster; "
           f"decode tok/s {both(lambda s: first['vs_unpruned'][s]['decode_tok_s'])}"]
    for row in (base, first) if hf else ():
        out.append(f"ONNX Runtime {row['label']} vs Hugging Face eager: TTFT {both(lambda s: row['vs_hf_eager'][s]['ttft'])} "
                   f"faster; tokens/s {both(lambda s: row['vs_hf_eager'][s]['decode_tok_s'])}")
    out.append("selection share of vision graph: " + "; ".join(
        f"{row['label']}: {both(lambda s: row['selection_share'][s]['direct'] * 100, '{:.1f}%')} direct "
        f"({selection[row['budget']]['median'] * 1e3:.1f} ms median), "
        f"{both(lambda s: row['selection_share'][s]['by_difference'] * 100, '{:.0f}%')} by difference" for row in rows[:-1]))
    out.append(f"machine speed probe: {probes['min_ms']:.0f}-{probes['max_ms']:.0f} ms (max/min {probes['max_over_min']:.2f}; "
               "above ~1.3 the machine's speed changed during the run: trust 'best' over 'median')")
    return out


def probe_summary(rows: list[dict], hf: dict | None) -> dict:
    runs = [r for row in rows for r in row["ort_runs"]] + (hf["runs"] if hf else [])
    probes = [p for r in runs for p in (r["probe_ms"], r["probe_after_ms"])]
    return {"min_ms": min(probes), "median_ms": statistics.median(probes), "max_ms": max(probes),
            "max_over_min": max(probes) / min(probes)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((line.split(":", 1)[1].strip() for line in open("/proc/meminfo") if line.startswith("MemTotal")), "?")
    return {"cpu_model": cpu, "cores": os.cpu_count(), "mem_total": mem, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def versions() -> dict:
    import importlib.metadata as md

    names = ("prunert", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers")
    out = {name: md.version(name) for name in names}
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout  # noqa: E731
    out["git_commit"] = git("rev-parse", "HEAD").strip()
    out["git_modified"] = git("status", "--porcelain", "--untracked-files=no").split()[1::2]
    return out


def main(argv=None) -> int:
    args, started = parse_args(argv), time.perf_counter()
    from prunert.adapters.llava.synthetic import synthetic_checkpoint

    environment = {"machine": machine(), "versions": versions()}  # at the start: the code that exports
    log(f"preset {args.preset}: budgets {args.budgets} + unpruned, {args.repeats} rounds, {args.new_tokens} new tokens")
    checkpoint = synthetic_checkpoint(args.preset)
    log(f"synthetic checkpoint {checkpoint} ({time.perf_counter() - started:.1f} s)")
    rows = configurations(args.preset, args.budgets)
    prepare_artifacts(args, rows, checkpoint.name)
    hf = measure(args, rows)
    base = rows[-1]
    selection = {row["budget"]: time_selection(row["budget"], base["_tokens"], base["_text"], args.work) for row in rows[:-1]}
    for k, sel in selection.items():
        log(f"selection op alone, K={k}: {sel['median'] * 1e3:.2f} ms median, {sel['best'] * 1e3:.2f} ms best on {sel['shape']}")
    for key in ("_tokens", "_text", "_ids"):
        base.pop(key)
    add_ratios(rows, hf, selection)
    report = {"statement": STATEMENT, "preset": args.preset, "checkpoint": str(checkpoint), "image": str(IMAGE.relative_to(ROOT)),
              "prompt": PROMPT, "rounds": args.repeats, "new_tokens": args.new_tokens, **environment, "configurations": rows,
              "hf_eager": hf, "selection_op": {str(k): v for k, v in selection.items()}, "definitions": DEFINITIONS}
    write_report(args, report, started)
    return 0


def write_report(args: argparse.Namespace, report: dict, started: float) -> None:
    rows, hf = report["configurations"], report["hf_eager"]
    probes = report["speed_probe"] = probe_summary(rows, hf)
    lines = headlines(rows, hf, {int(k): v for k, v in report["selection_op"].items()}, probes)
    checkpoints = {row["checkpoint"] for row in rows} | ({hf["checkpoint"]} if hf else set())
    report["same_checkpoint"] = checkpoints == {Path(report["checkpoint"]).name}
    if not report["same_checkpoint"]:  # the preset changed under us (another process rewrote the cache)
        lines.append("WARNING: configurations come from different checkpoints; re-run to re-export")
    for stat, title in (("median", f"median of {args.repeats} rounds"), ("best", f"best of {args.repeats} rounds (fastest run)")):
        print(f"\n{title}\n{table(rows, hf, stat)}")
    print("\n" + "\n".join(lines) + f"\nnote: {STATEMENT}")
    report.update(headlines=lines, peak_rss_mb_bench_process=peak_rss_mb(), total_wall_s=time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {args.out} (total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
