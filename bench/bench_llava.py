"""First prunert benchmark: LLaVA-1.5-shaped TTFT and decode tokens/s, ONNX Runtime vs Hugging Face eager.

One run exports (or reuses) one artifact per budget K plus the unpruned baseline (method "none"),
times each with the ORT `VLMPipeline`, times Hugging Face eager `generate` on the same synthetic
checkpoint, and times the ResPrune selection op alone. Everything is reported as ratios measured side
by side in this run, plus a JSON file of raw numbers. Weights are synthetic (seeded random): this
measures speed only, never accuracy.

    python bench/bench_llava.py                                    # llava-1.5-shaped, K = 64,128,192
    python bench/bench_llava.py --preset llava-tiny --budgets 16,32  # smoke mode (~1-2 minutes)
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
SELECTION_RUNS = 20  # the selection op alone takes milliseconds: more runs for a stable median
STATEMENT = "weights are synthetic (seeded random): only speed is measured, not accuracy"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-shaped", help="synthetic preset (default: %(default)s)")
    p.add_argument("--budgets", default="64,128,192", help="comma-separated K values (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration, after one warm-up")
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


def median(values) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- 1. artifacts -----------------------------------------------------------------------------
def configurations(preset: str, budgets: list[int]) -> list[dict]:
    from prunert.adapters.llava.synthetic import get_preset

    n = get_preset(preset).num_patches
    bad = [k for k in budgets if not 0 < k < n]
    if bad:
        raise SystemExit(f"bench: error: budgets {bad} outside 1..{n - 1} for {preset} (N={n})")
    rows = [{"label": f"K={k}", "budget": k, "method": "resprune"} for k in budgets]
    return rows + [{"label": f"unpruned (N={n})", "budget": n, "method": "none"}]


def artifact_matches(directory: Path, preset: str, budget: int, method: str) -> bool:
    from prunert.config import BudgetConfig
    from prunert.errors import PrunertError
    from prunert.manifest import load_manifest
    from prunert.pruning_ops import method_params

    if not (directory / "manifest.json").is_file():
        return False
    try:
        m = load_manifest(directory, verify_hashes=True)  # a truncated file means re-export
    except PrunertError:
        return False
    wanted = method_params(BudgetConfig(budget=budget, method=method))
    return (m.source.model, m.budget.budget, m.budget.method, m.budget.params) == (f"synthetic:{preset}", budget, method, wanted)


def _export_child(model: str, out_dir: str, budget: int, method: str) -> dict:
    """Runs in a fresh process: export time and peak memory of one export, nothing else."""
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    start = time.perf_counter()
    export_artifact(model, Path(out_dir), BudgetConfig(budget=budget, method=method), ExportConfig(), overwrite=True,
                    log=lambda m: print(f"    export: {m}", flush=True))
    return {"export_s": time.perf_counter() - start, "export_peak_rss_mb": peak_rss_mb()}


def prepare_artifacts(args: argparse.Namespace, rows: list[dict]) -> None:
    for row in rows:
        directory = args.work / f"{args.preset}-{row['method']}-k{row['budget']}"
        row["artifact"] = str(directory)
        if artifact_matches(directory, args.preset, row["budget"], row["method"]):
            log(f"{row['label']}: reusing {directory}")
            row.update(reused=True, export_s=None, export_peak_rss_mb=None)
            continue
        log(f"{row['label']}: exporting to {directory}")
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # fresh process: peak RSS per export
            result = pool.submit(_export_child, f"synthetic:{args.preset}", str(directory), row["budget"], row["method"]).result()
        row.update(reused=False, **result)
        log(f"{row['label']}: exported in {result['export_s']:.1f} s, peak RSS {result['export_peak_rss_mb']:.0f} MB")
        row["artifact_bytes"] = sum(p.stat().st_size for p in directory.iterdir())


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
    return {
        "ttft_s": ttft, "tokenize_s": t_tok - start, "host_preprocess_s": (t_vis - t_tok) - pipe.timings.vision_s,
        "vision_s": pipe.timings.vision_s, "splice_s": (start + ttft - t_vis) - pipe.timings.prefill_s,
        "prefill_s": pipe.timings.prefill_s, "prefill_length": int(state.attention_mask.shape[1]),
        "decode_s": decode_s, "decode_tok_s": new_tokens / decode_s,
    }


def ort_decode(pipe, state, steps: int) -> float:
    table = pipe.artifact.embeddings
    logits, past = state.logits[:, -1], state.present  # [B, V]
    mask, positions = state.attention_mask, state.position_ids[:, -1:]
    one = np.ones((mask.shape[0], 1), np.int64)
    start = time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(axis=-1)  # greedy, EOS ignored
        mask, positions = np.concatenate([mask, one], axis=1), positions + 1
        step_logits, past = pipe.run_decoder(np.asarray(table[token], np.float32)[:, None], mask, positions, past)
        logits = step_logits[:, -1]
    return time.perf_counter() - start


def time_ort(row: dict, repeats: int, new_tokens: int) -> None:
    from prunert.runtime import Artifact, VLMPipeline

    pipe = VLMPipeline(Artifact(row["artifact"], verify_hashes=False))  # hashes were checked in prepare_artifacts
    ort_request(pipe, new_tokens)  # warm-up
    runs = [ort_request(pipe, new_tokens) for _ in range(repeats)]
    row["ort_runs"] = runs
    row["ort"] = {key: median(r[key] for r in runs) for key in runs[0]}
    row["ort"]["peak_rss_mb_so_far"] = peak_rss_mb()
    row["ort"]["load_avg"] = os.getloadavg()  # other processes on a shared machine skew timings
    o = row["ort"]
    log(f"{row['label']}: TTFT {o['ttft_s'] * 1e3:.0f} ms (vision {o['vision_s'] * 1e3:.0f}, prefill {o['prefill_s'] * 1e3:.0f}), "
        f"decode {o['decode_tok_s']:.2f} tok/s")
    if row["method"] == "none":
        row["_tokens"] = pipe.encode_images([IMAGE], [PROMPT]).visual_tokens  # the real projector outputs [1, N, D]
        from prunert.runtime.text import content_word_groups, text_relevance_inputs

        groups = [content_word_groups(pipe.artifact.tokenizer, PROMPT, pipe.artifact.special_ids)]
        row["_text"] = text_relevance_inputs(groups, pipe.artifact.embeddings, pipe.manifest.text.max_text_tokens)
        row["_ids"] = pipe.tokenize([PROMPT])[0]
    del pipe
    gc.collect()


# ---- 3. Hugging Face eager --------------------------------------------------------------------
def time_hf(preset: str, repeats: int, new_tokens: int, ort_ids: list[int]) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from prunert.adapters.llava.synthetic import LLAVA_PROMPT_TEMPLATE, synthetic_checkpoint

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    directory = synthetic_checkpoint(preset)
    model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)
    text = LLAVA_PROMPT_TEMPLATE.format(prompt=PROMPT)
    image_id = model.config.image_token_index

    def request(count: int) -> tuple[float, float]:
        start = time.perf_counter()
        with Image.open(IMAGE) as im:
            inputs = processor(images=im.convert("RGB"), text=text, return_tensors="pt")
        t_gen = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)
        assert out.shape[1] - inputs["input_ids"].shape[1] == count
        return time.perf_counter() - start, time.perf_counter() - t_gen

    with Image.open(IMAGE) as im:
        ids = processor(images=im.convert("RGB"), text=text)["input_ids"][0]
    collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
    request(1)  # warm-up
    first = [request(1) for _ in range(repeats)]
    full = [request(new_tokens) for _ in range(repeats)]
    ttft, gen1, gen_n = median(f[0] for f in first), median(f[1] for f in first), median(f[1] for f in full)
    tok_s = (new_tokens - 1) / (gen_n - gen1) if gen_n > gen1 else float("nan")  # nan: noise exceeded the decode time
    result = {
        "ttft_s": ttft, "generate_1_s": gen1, "generate_n_s": gen_n, "decode_tok_s": tok_s, "load_avg": os.getloadavg(),
        "image_tokens": int(sum(t == image_id for t in ids)), "prompt_matches_ort": collapsed == list(ort_ids),
        "runs_1": first, "runs_n": full, "threads": torch.get_num_threads(), "peak_rss_mb_so_far": peak_rss_mb(),
    }
    log(f"HF eager: TTFT {ttft * 1e3:.0f} ms (generate only {gen1 * 1e3:.0f}), decode {result['decode_tok_s']:.2f} tok/s, "
        f"{result['image_tokens']} image tokens, prompt ids match ORT: {result['prompt_matches_ort']}")
    del model
    gc.collect()
    return result


# ---- 4. the selection op alone ----------------------------------------------------------------
class _SelectOnly:
    """Built lazily (torch import): resprune_select + gather_tokens on [1, N, D]."""

    @staticmethod
    def module(budget: int):
        import torch

        from prunert.config import ResPruneConfig
        from prunert.pruning_ops.resprune import gather_tokens, resprune_select

        class SelectOnly(torch.nn.Module):
            def forward(self, tokens, text, text_mask):
                kept = resprune_select(tokens, text, text_mask, budget, ResPruneConfig())
                return gather_tokens(tokens, kept), kept

        return SelectOnly().eval()


def time_selection(budget: int, tokens: np.ndarray, text: tuple[np.ndarray, np.ndarray], work: Path) -> dict:
    import onnxruntime as ort
    import torch

    path = work / f"select-only-k{budget}.onnx"
    feeds = {"tokens": tokens.astype(np.float32), "text": text[0], "text_mask": text[1]}
    start = time.perf_counter()
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(_SelectOnly.module(budget), args, str(path), dynamo=True, input_names=list(feeds),
                          output_names=["visual_tokens", "kept_indices"], optimize=True, verbose=False)
    export_s = time.perf_counter() - start
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(SELECTION_RUNS):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return {"select_s": median(times), "runs": times, "export_s": export_s, "shape": list(tokens.shape)}


# ---- 5. report --------------------------------------------------------------------------------
def add_ratios(rows: list[dict], hf: dict | None) -> None:
    """Ratios are speed-ups: > 1 means this configuration is faster than the reference."""
    base = rows[-1]["ort"]
    for row in rows:
        o = row["ort"]
        row["vs_unpruned"] = {"ttft": base["ttft_s"] / o["ttft_s"], "decode_tok_s": o["decode_tok_s"] / base["decode_tok_s"]}
        if hf:
            row["vs_hf_eager"] = {"ttft": hf["ttft_s"] / o["ttft_s"], "decode_tok_s": o["decode_tok_s"] / hf["decode_tok_s"]}


def selection_shares(rows: list[dict], selection: dict) -> dict:
    base = rows[-1]["ort"]["vision_s"]
    shares = {}
    for row in rows[:-1]:
        vision = row["ort"]["vision_s"]
        direct = selection.get(row["budget"], {}).get("select_s")
        shares[row["label"]] = {
            "by_difference": (vision - base) / vision,  # noisy: the difference of two medians
            "direct": direct / vision if direct is not None else None,
            "select_ms": direct * 1e3 if direct is not None else None,
            "vision_ms": vision * 1e3,
        }
    return shares


def table(rows: list[dict], hf: dict | None) -> str:
    head = f"{'configuration':<18}{'TTFT ms':>10}{'tok/s':>8}{'vision ms':>11}{'prefill ms':>12}" \
           f"{'TTFT x unpr':>13}{'tok/s x unpr':>14}{'TTFT x HF':>11}{'tok/s x HF':>12}"
    lines = [head, "-" * len(head)]
    for row in rows:
        o, u, h = row["ort"], row["vs_unpruned"], row.get("vs_hf_eager", {})
        lines.append(f"{'ORT ' + row['label']:<18}{o['ttft_s'] * 1e3:>10.0f}{o['decode_tok_s']:>8.2f}{o['vision_s'] * 1e3:>11.0f}"
                     f"{o['prefill_s'] * 1e3:>12.0f}{u['ttft']:>13.2f}{u['decode_tok_s']:>14.2f}"
                     f"{h.get('ttft', float('nan')):>11.2f}{h.get('decode_tok_s', float('nan')):>12.2f}")
    if hf:
        base = rows[-1]["ort"]
        lines.append(f"{'HF eager (N)':<18}{hf['ttft_s'] * 1e3:>10.0f}{hf['decode_tok_s']:>8.2f}{'-':>11}{'-':>12}"
                     f"{base['ttft_s'] / hf['ttft_s']:>13.2f}{hf['decode_tok_s'] / base['decode_tok_s']:>14.2f}{1:>11.2f}{1:>12.2f}")
    return "\n".join(lines)


def headlines(rows: list[dict], hf: dict | None, shares: dict) -> list[str]:
    first, base = rows[0], rows[-1]
    out = [f"TTFT ratio {first['label']} vs unpruned: {first['vs_unpruned']['ttft']:.2f}x faster "
           f"({first['ort']['ttft_s'] * 1e3:.0f} ms vs {base['ort']['ttft_s'] * 1e3:.0f} ms); "
           f"decode tok/s {first['vs_unpruned']['decode_tok_s']:.2f}x"]
    if hf:
        for row in (base, first):
            out.append(f"ONNX Runtime ({row['label']}) vs Hugging Face eager: TTFT {row['vs_hf_eager']['ttft']:.2f}x faster, "
                       f"tokens/s {row['vs_hf_eager']['decode_tok_s']:.2f}x")
    parts = [f"{label}: {s['by_difference'] * 100:.1f}% by difference, "
             + (f"{s['direct'] * 100:.1f}% direct ({s['select_ms']:.1f} of {s['vision_ms']:.0f} ms)" if s["direct"] is not None else "direct n/a")
             for label, s in shares.items()]
    out.append("selection share of vision graph: " + "; ".join(parts))
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0")
    return {"cpu_model": cpu, "cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
            "mem_total_gib": round(int(mem) / 2**20, 1), "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("prunert", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    try:
        git = ["git", "-C", str(ROOT)]
        out["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        out["git_dirty"] = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.split("\n")
    except OSError:
        pass
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from prunert.adapters.llava.synthetic import synthetic_checkpoint

    log(f"preset {args.preset}: budgets {args.budgets} + unpruned, {args.repeats} repeats, {args.new_tokens} new tokens")
    t = time.perf_counter()
    checkpoint = synthetic_checkpoint(args.preset)
    log(f"synthetic checkpoint {checkpoint} ({time.perf_counter() - t:.1f} s)")
    rows = configurations(args.preset, args.budgets)
    prepare_artifacts(args, rows)
    for row in rows[::-1]:  # unpruned first: it also yields the real projector outputs for step 4
        time_ort(row, args.repeats, args.new_tokens)
    base = rows[-1]
    hf = None if args.skip_hf else time_hf(args.preset, args.repeats, args.new_tokens, base.pop("_ids"))
    selection = {row["budget"]: time_selection(row["budget"], base["_tokens"], base["_text"], args.work) for row in rows[:-1]}
    for k, s in selection.items():
        log(f"selection op alone, K={k}: {s['select_s'] * 1e3:.2f} ms on {s['shape']}")
    base.pop("_tokens"), base.pop("_text"), base.pop("_ids", None)
    add_ratios(rows, hf)
    shares = selection_shares(rows, selection)
    lines = headlines(rows, hf, shares)
    print("\n" + table(rows, hf) + "\n")
    for line in lines + [f"note: {STATEMENT}"]:
        print(line)
    report = {
        "statement": STATEMENT, "preset": args.preset, "image": str(IMAGE.relative_to(ROOT)), "prompt": PROMPT,
        "repeats": args.repeats, "new_tokens": args.new_tokens, "machine": machine(), "versions": versions(),
        "configurations": rows, "hf_eager": hf, "selection_op": {str(k): v for k, v in selection.items()},
        "selection_share": shares, "headlines": lines, "peak_rss_mb_bench_process": peak_rss_mb(),
        "total_wall_s": time.perf_counter() - started,
        "definitions": {
            "ttft_s": "wall clock from the request start (image file + prompt) to the first token's logits: "
                      "ORT = tokenize + image load/preprocess + content words + vision graph + splice + prefill; "
                      "HF = image load + AutoProcessor + generate(max_new_tokens=1)",
            "decode_tok_s": "ORT: new_tokens greedy decoder steps / their time; HF: (new_tokens-1) / (t(generate n) - t(generate 1))",
            "ratios": "speed-ups, > 1 = faster than the reference (vs_unpruned: ORT unpruned; vs_hf_eager: HF eager)",
            "selection_share": "by_difference = (vision_K - vision_unpruned) / vision_K; direct = selection op alone in ORT / vision_K",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {args.out} (total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
