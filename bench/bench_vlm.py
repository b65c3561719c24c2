"""prunert benchmark: TTFT and decode tokens/s of ResPrune budgets K vs unpruned vs Hugging Face eager, any family.

Exports (or reuses) one artifact per budget K plus the unpruned baseline (method "none"), times each
with the ORT `VLMPipeline`, times Hugging Face eager `generate` on the same synthetic checkpoint, and
times the ResPrune selection op alone; reports ratios measured side by side in this run and a JSON
file of raw numbers. Weights are synthetic (seeded random): speed only, never accuracy.

Generic over the families of prunert.adapters (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL): the prompt template and
image placeholder come from each artifact's manifest, N from the family's export adapter, the Hugging Face
class from the manifest's architecture, decode positions from the artifact's host adapter.

    python bench/bench_vlm.py --preset qwen2.5-vl-tiny --budgets 16            # smoke mode
    python bench/bench_vlm.py --preset llava-next-shaped                       # K = 64,128,192 + unpruned
    python bench/bench_llava.py                                                 # the LLaVA-1.5 entry point
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # hf_eager.py beside this file

from hf_eager import HFEager, hf_processor, pixel_overrides  # noqa: E402, F401  (the tests use the last two from here)

IMAGE = ROOT / "examples/images/astronaut.jpg"
QUESTION = "\nWhat is the astronaut holding?"  # after the family's image placeholder (LLaVA: "<image>\nWhat is ...")
SELECTION_RUNS = 20  # the selection op alone takes milliseconds: more runs
STATEMENT = "weights are synthetic (seeded random): only speed is measured, not accuracy"
STATS = {"median": statistics.median, "best": min}  # over rounds; "best" = the fastest run (min time)
DEFINITIONS = "bench/README.md, section 'What is measured'"  # TTFT, tok/s, ratios, rounds, median/best, probe
DEFAULTS = {"preset": None, "budgets": "64,128,192", "out": None}  # out None: bench/results/<preset>.json


def parse_args(argv=None, defaults: dict | None = None, description: str | None = None) -> argparse.Namespace:
    """`defaults`: the entry point's (bench_llava.py: preset llava-1.5-shaped, out bench/results/llava.json)."""
    defaults = {**DEFAULTS, **(defaults or {})}
    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    p.add_argument("--preset", default=defaults["preset"], required=defaults["preset"] is None,
                   help="synthetic preset, any family (default: %(default)s)")
    p.add_argument("--budgets", default=defaults["budgets"], help="comma-separated K values (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each times every configuration once after a warm-up")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps per run (EOS ignored)")
    p.add_argument("--out", type=Path, default=defaults["out"],
                   help="JSON report (default: %(default)s)" if defaults["out"] else "JSON report (default: bench/results/<preset>.json)")
    p.add_argument("--work", type=Path, default=ROOT / "bench/results/artifacts", help="artifact directory")
    p.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face eager baseline")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of the ONNX Runtime sessions (default 0: its own choice)")
    p.add_argument("--spin", action="store_true", help="let ONNX Runtime's idle threads spin (default: off, as `prunert run`)")
    p.add_argument("--no-unpruned", action="store_true",
                   help="no unpruned baseline (method none): time the budgets K (and Hugging Face) only")
    args = p.parse_args(argv)
    args.budgets = sorted({int(k) for k in args.budgets.split(",") if k.strip()})
    if args.out is None:
        args.out = ROOT / f"bench/results/{args.preset}.json"
    if args.repeats < 1 or args.new_tokens < 2:
        p.error("--repeats must be >= 1 and --new-tokens >= 2")
    if not args.budgets:
        p.error("--budgets: expected at least one K")
    from prunert.config import RuntimeConfig

    args.runtime = RuntimeConfig(threads=args.threads, spinning=args.spin)  # recorded in the report's "runtime"
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


def user_prompt(text: Any) -> str:
    """The user's prompt: the family's image placeholder (the manifest's text.image_placeholder, else its
    image_token) once, then the question. LLaVA: "<image>\\nWhat is the astronaut holding?"."""
    placeholder = getattr(text, "image_placeholder", None) or text.image_token
    return placeholder + QUESTION


def checkpoint_dir(preset: str) -> Path:
    """The synthetic checkpoint of a preset of any family (written to the cache on first use)."""
    from prunert.adapters import resolve_source

    return resolve_source(f"synthetic:{preset}").path


# ---- 1. artifacts -----------------------------------------------------------------------------
def configurations(budgets: list[int], num_visual_tokens: int | None) -> list[dict]:
    """One row per K, then the unpruned row (method none, budget N) unless `num_visual_tokens` is None.
    The unpruned row's label gets the image's actual visual-token count once it has run."""
    n = num_visual_tokens
    if any(k < 1 or (n is not None and k >= n) for k in budgets):
        raise SystemExit(f"bench: error: --budgets {budgets}: expected 1 <= K" + (f" < {n}" if n is not None else ""))
    rows = [{"label": f"K={k}", "budget": k, "method": "resprune"} for k in budgets]
    return rows + ([{"label": "unpruned", "budget": n, "method": "none"}] if n is not None else [])


def unpruned_row(rows: list[dict]) -> dict | None:
    return next((row for row in rows if row["method"] == "none"), None)


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


def _adapter_child(preset: str) -> dict:
    """Runs in a fresh process (it loads the checkpoint with torch): what the family's export adapter says."""
    from prunert.adapters import resolve_source
    from prunert.export.adapter import ExportAdapter
    from prunert.export.pipeline import load_export_adapter

    start = time.perf_counter()
    source = resolve_source(f"synthetic:{preset}")
    adapter = load_export_adapter(source)
    return {"checkpoint": source.path.name, "family": source.family, "num_visual_tokens": int(adapter.num_visual_tokens),
            # the base class's selection_module: the vision graph runs the plain registry op on [B, N, D] (else e.g. per tile)
            "plain_selection": type(adapter).selection_module is ExportAdapter.selection_module,
            "load_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def adapter_facts(preset: str, checkpoint: str, work: Path) -> dict:
    """N (the export adapter's num_visual_tokens: the unpruned budget) and whether the selection is the plain
    op, from a child process; kept in <work>/<preset>.adapter.json for as long as the checkpoint is the same."""
    path = work / f"{preset}.adapter.json"
    if path.is_file():
        facts = json.loads(path.read_text())
        if facts.get("checkpoint") == checkpoint and {"num_visual_tokens", "plain_selection"} <= set(facts):
            return {**facts, "reused": True}
    log(f"loading the export adapter of {preset} in a child process (N, selection kind)")
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        facts = pool.submit(_adapter_child, preset).result()
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts) + "\n")
    return {**facts, "reused": False}


def _export_child(preset: str, out_dir: str, budget: int, method: str) -> dict:
    """Runs in a fresh process, so its peak RSS is this export's."""
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    checkpoint, start = checkpoint_dir(preset).name, time.perf_counter()
    export_artifact(f"synthetic:{preset}", Path(out_dir), BudgetConfig(budget=budget, method=method), ExportConfig(),
                    overwrite=True, log=lambda m: print(f"    export: {m}", flush=True))
    if checkpoint_dir(preset).name != checkpoint:
        raise RuntimeError(f"synthetic preset {preset} changed during the export; re-run")
    return {"export_s": time.perf_counter() - start, "export_peak_rss_mb": peak_rss_mb(), "checkpoint": checkpoint}


def prepare_artifacts(args: argparse.Namespace, rows: list[dict], checkpoint: str) -> None:
    from prunert.errors import PrunertError

    for row in rows:
        directory = args.work / f"{args.preset}-{row['method']}-k{row['budget']}"
        row["artifact"] = str(directory)
        if artifact_matches(directory, args.preset, row["budget"], row["method"], checkpoint):
            log(f"{row['label']}: reusing {directory}")
            row.update(json.loads(export_record(directory).read_text()), reused=True)  # export time survives a reuse
            continue
        log(f"{row['label']}: exporting to {directory}")
        try:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                result = pool.submit(_export_child, args.preset, str(directory), row["budget"], row["method"]).result()
        except PrunertError as exc:  # e.g. a K the family refuses, or method none where the family has no fixed N
            hint = " (pass --no-unpruned to time the budgets alone)" if row["method"] == "none" else ""
            raise SystemExit(f"bench: error: {row['label']} (method {row['method']}, K={row['budget']}) of {args.preset}: "
                             f"export failed: {type(exc).__name__}: {exc}{hint}") from None
        result["artifact_bytes"] = sum(p.stat().st_size for p in directory.iterdir())
        export_record(directory).write_text(json.dumps(result) + "\n")
        row.update(result, reused=False)
        log(f"{row['label']}: exported in {result['export_s']:.1f} s, peak RSS {result['export_peak_rss_mb']:.0f} MB")


# ---- 2. ONNX Runtime --------------------------------------------------------------------------
def ort_request(pipe, prompt: str, new_tokens: int) -> tuple[dict, Any]:
    """One request, timed by stage; then exactly `new_tokens` greedy decoder steps (EOS ignored).
    -> (stage times, the VisionResult)."""
    start = time.perf_counter()
    sequences = pipe.tokenize([prompt])
    t_tok = time.perf_counter()
    vision = pipe.encode_images([IMAGE], [prompt])  # load + preprocess + content words + vision graph
    t_vis = time.perf_counter()
    state = pipe.prefill(sequences, vision)  # splice + prefill graph
    ttft = time.perf_counter() - start
    decode_s = ort_decode(pipe, state, new_tokens)
    t = pipe.timings
    return {"ttft_s": ttft, "tokenize_s": t_tok - start, "host_preprocess_s": t_vis - t_tok - t.vision_s, "vision_s": t.vision_s,
            "splice_s": start + ttft - t_vis - t.prefill_s, "prefill_s": t.prefill_s, "decode_s": decode_s,
            "prefill_length": int(state.attention_mask.shape[1]), "visual_tokens": len(vision.kept(0)[1])}, vision


def ort_decode(pipe, state, steps: int) -> float:
    """`steps` greedy decoder calls, EOS ignored, through the runtime's one decode loop (decode_steps: positions
    as VLMPipeline.decode, the host's next_position_ids after the prefill, [B, 1] or M-RoPE [3, B, 1], + 1 per step)."""
    from prunert.runtime.decode import decode_steps, greedy, table_embedder

    mask, max_sequence = state.attention_mask, pipe.manifest.text.max_sequence
    if mask.shape[1] + steps > max_sequence:
        raise SystemExit(f"bench: error: --new-tokens {steps}: the prompt has {mask.shape[1]} tokens and the artifact "
                         f"at most {max_sequence} (prompt + generated)")
    positions = pipe.artifact.host.next_position_ids(state.position_ids, mask)
    start = time.perf_counter()
    for _ in decode_steps(state.session, state.logits[:, -1], mask, positions, table_embedder(pipe.artifact.embeddings, pipe.embeds_dtype), greedy,
                          steps + 1):  # step 0 chooses from the prefill's logits: steps + 1 steps make `steps` decoder calls
        pass
    return time.perf_counter() - start


def ort_round(row: dict, new_tokens: int, selection_inputs: bool, runtime) -> dict:
    """Load the artifact's pipeline, warm up, time one request, unload (memory: one artifact at a time).
    selection_inputs: keep what step 4 times the selection op on (the unpruned row, first round); runtime: RuntimeConfig."""
    from prunert.runtime import Artifact, VLMPipeline

    start = time.perf_counter()
    pipe = VLMPipeline(Artifact(row["artifact"], verify_hashes=False), runtime=runtime)  # hashes were checked in prepare_artifacts
    load_s = time.perf_counter() - start
    prompt = user_prompt(pipe.manifest.text)
    ort_request(pipe, prompt, 2)  # warm-up: the first run allocates
    probe = speed_probe()
    run, vision = ort_request(pipe, prompt, new_tokens)
    run.update(load_s=load_s, probe_ms=probe, probe_after_ms=speed_probe(), peak_rss_mb=peak_rss_mb())
    if "visual_tokens" not in row:  # what the decoder sees for this image (unpruned: the image's own N, not the static max)
        graph_inputs = {t.name for t in pipe.vision.spec.inputs}  # image_info: the host's own outputs (Qwen2.5-VL: image_grid_thw)
        image_info = {k: np.asarray(v).tolist() for out in vision.host_outputs for k, v in out.items() if k not in graph_inputs}
        row.update(visual_tokens=run["visual_tokens"], image_info=image_info,
                   prompt=prompt, _ids=pipe.tokenize([prompt])[0])
        if row["method"] == "none":
            row["label"] = f"unpruned (N={run['visual_tokens']})"
    if selection_inputs and "_tokens" not in row:
        keep_selection_inputs(row, pipe, prompt, vision)
    del pipe, vision
    gc.collect()
    return run


def keep_selection_inputs(row: dict, pipe, prompt: str, vision) -> None:
    """The real projector outputs [1, N, D] (the unpruned graph keeps all, in order) and the prompt's words."""
    from prunert.runtime.text import text_relevance_inputs

    row["_tokens"] = vision.visual_tokens
    groups = pipe.content_words([prompt])
    row["_text"] = text_relevance_inputs(groups, pipe.artifact.embeddings, pipe.manifest.text.max_text_tokens)


def ort_summary(runs: list[dict], new_tokens: int) -> dict:
    out = {}
    for stat, f in STATS.items():
        out[stat] = {key: float(f(r[key] for r in runs)) for key in runs[0] if key.endswith("_s")}
        out[stat]["decode_tok_s"] = new_tokens / out[stat]["decode_s"]
    return out


# ---- 3. Hugging Face eager (the model and processor: hf_eager.py) ------------------------------
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


def measure(args: argparse.Namespace, rows: list[dict], checkpoint: Path, keep_selection: bool) -> dict | None:
    """Round-robin: each round times every configuration once, so a slow spell of the shared machine hits
    all of them alike instead of whichever ran then. The HF processor gets the pixel settings of the
    unpruned artifact (else of the first K's)."""
    base = unpruned_row(rows)
    reference = base or rows[0]
    hf, hf_runs = (None if args.skip_hf else HFEager(reference["artifact"], checkpoint, IMAGE, QUESTION)), []
    for round_ in range(1, args.repeats + 1):
        for row in rows[::-1]:  # unpruned first: it also yields the real projector outputs for step 4
            run = ort_round(row, args.new_tokens, keep_selection and row is base, args.runtime)
            row.setdefault("ort_runs", []).append(run)
            log(f"round {round_}/{args.repeats} ORT {row['label']}: TTFT {run['ttft_s'] * 1e3:.0f} ms (vision "
                f"{run['vision_s'] * 1e3:.0f}, prefill {run['prefill_s'] * 1e3:.0f}), decode {args.new_tokens / run['decode_s']:.2f} "
                f"tok/s, probe {run['probe_ms']:.0f}/{run['probe_after_ms']:.0f} ms")
        if hf:
            hf_runs.append(r := hf_round(hf, args.new_tokens))
            log(f"round {round_}/{args.repeats} HF eager: TTFT {r['ttft_s'] * 1e3:.0f} ms, generate 1/{args.new_tokens}: "
                f"{r['generate_1_s']:.2f}/{r['generate_n_s']:.2f} s, probe {r['probe_ms']:.0f}/{r['probe_after_ms']:.0f} ms")
    for row in rows:
        row["ort"] = ort_summary(row["ort_runs"], args.new_tokens)
    if not hf:
        return None
    result = {**hf_summary(hf_runs, args.new_tokens), **hf.prompt_check(reference["_ids"]), "runs": hf_runs}
    log(f"HF eager ({hf.architecture}): {result['image_tokens']} image tokens, prompt ids match ORT: {result['prompt_matches_ort']}"
        + (f", image processor settings from {reference['label']}: {hf.overrides}" if hf.overrides else ""))
    return result


# ---- 4. the selection op alone ----------------------------------------------------------------
def selection_skip_reason(base: dict | None, facts: dict | None) -> str | None:
    """Why the selection op cannot be timed alone here (None: it can)."""
    if base is None:
        return "no unpruned row (--no-unpruned): the real projector outputs it is timed on come from that artifact"
    if not facts["plain_selection"]:
        return (f"the {facts['family']} vision graph does not run the plain [1, N, D] op (its export adapter has its own "
                "selection_module, e.g. per-tile budgets): only 'by difference' is reported")
    return None


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


def time_selection(budget: int, tokens: np.ndarray, text: tuple[np.ndarray, np.ndarray], work: Path, preset: str = "") -> dict:
    import onnxruntime as ort
    import torch

    path, start = work / f"{preset + '-' if preset else ''}select-only-k{budget}.onnx", time.perf_counter()
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
NAN = {"ttft": float("nan"), "decode_tok_s": float("nan")}


def speedups(ref: dict, row: dict) -> dict:
    return {"ttft": ref["ttft_s"] / row["ttft_s"], "decode_tok_s": row["decode_tok_s"] / ref["decode_tok_s"]}


def add_ratios(rows: list[dict], hf: dict | None, selection: dict) -> None:
    """Ratios are speed-ups (> 1: faster than the reference), per statistic."""
    base = unpruned_row(rows)
    for row in rows:
        if base:
            row["vs_unpruned"] = {s: speedups(base["ort"][s], row["ort"][s]) for s in STATS}
        if hf:
            row["vs_hf_eager"] = {s: speedups(hf[s], row["ort"][s]) for s in STATS}
        if base and row is not base:
            row["selection_share"] = {s: {"by_difference": 1 - base["ort"][s]["vision_s"] / row["ort"][s]["vision_s"],
                                          **({"direct": selection[row["budget"]][s] / row["ort"][s]["vision_s"]}
                                             if row["budget"] in selection else {})} for s in STATS}


def table(rows: list[dict], hf: dict | None, stat: str) -> str:
    head = (f"{'configuration':<22}{'TTFT ms':>9}{'tok/s':>8}{'vision ms':>11}{'prefill ms':>12}"
            f"{'TTFT x unpr':>13}{'tok/s x unpr':>14}{'TTFT x HF':>11}{'tok/s x HF':>12}")
    lines = [head, "-" * len(head)]
    for row in rows:
        o, u, h = row["ort"][stat], row.get("vs_unpruned", {}).get(stat, NAN), row.get("vs_hf_eager", {}).get(stat, NAN)
        lines.append(f"{'ORT ' + row['label']:<22}{o['ttft_s'] * 1e3:>9.0f}{o['decode_tok_s']:>8.2f}{o['vision_s'] * 1e3:>11.0f}"
                     f"{o['prefill_s'] * 1e3:>12.0f}{u['ttft']:>13.2f}{u['decode_tok_s']:>14.2f}{h['ttft']:>11.2f}{h['decode_tok_s']:>12.2f}")
    if hf:
        base = unpruned_row(rows)
        u = speedups(base["ort"][stat], hf[stat]) if base else NAN
        lines.append(f"{'HF eager (all N)':<22}{hf[stat]['ttft_s'] * 1e3:>9.0f}{hf[stat]['decode_tok_s']:>8.2f}{'-':>11}{'-':>12}"
                     f"{u['ttft']:>13.2f}{u['decode_tok_s']:>14.2f}{1:>11.2f}{1:>12.2f}")
    return "\n".join(lines)


def headlines(rows: list[dict], hf: dict | None, selection: dict, probes: dict, selection_skipped: str | None = None) -> list[str]:
    first, base = rows[0], unpruned_row(rows)

    def both(get, fmt="{:.2f}x") -> str:
        return ", ".join(f"{fmt.format(get(s))} ({s})" for s in STATS)

    out = []
    if base:
        out.append(f"TTFT ratio {first['label']} vs unpruned: {both(lambda s: first['vs_unpruned'][s]['ttft'])} faster; "
                   f"decode tok/s {both(lambda s: first['vs_unpruned'][s]['decode_tok_s'])}")
    for row in ((base, first) if base else (first,)) if hf else ():
        out.append(f"ONNX Runtime {row['label']} vs Hugging Face eager: TTFT {both(lambda s: row['vs_hf_eager'][s]['ttft'])} "
                   f"faster; tokens/s {both(lambda s: row['vs_hf_eager'][s]['decode_tok_s'])}")
    if base:
        def share(row: dict) -> str:
            direct = (f"{both(lambda s: row['selection_share'][s]['direct'] * 100, '{:.1f}%')} direct "
                      f"({selection[row['budget']]['median'] * 1e3:.1f} ms median), ") if row["budget"] in selection else ""
            return f"{row['label']}: {direct}{both(lambda s: row['selection_share'][s]['by_difference'] * 100, '{:.0f}%')} by difference"

        out.append("selection share of vision graph: " + "; ".join(share(row) for row in rows if row is not base))
    if selection_skipped:
        out.append(f"selection op alone: not timed: {selection_skipped}")
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


def main(argv=None, defaults: dict | None = None, description: str | None = None) -> int:
    args, started = parse_args(argv, defaults, description), time.perf_counter()
    from prunert.adapters import synthetic_presets

    presets = synthetic_presets()
    if args.preset not in presets:
        raise SystemExit(f"bench: error: --preset {args.preset!r}: expected one of {sorted(presets)}")
    environment = {"machine": machine(), "versions": versions(), "runtime": args.runtime.record()}  # at the start: the code that exports
    log(f"preset {args.preset} ({presets[args.preset]}): budgets {args.budgets}" + ("" if args.no_unpruned else " + unpruned")
        + f", {args.repeats} rounds, {args.new_tokens} new tokens")
    checkpoint = checkpoint_dir(args.preset)
    log(f"synthetic checkpoint {checkpoint} ({time.perf_counter() - started:.1f} s)")
    facts = None if args.no_unpruned else adapter_facts(args.preset, checkpoint.name, args.work)
    if facts:
        log(f"export adapter: N = {facts['num_visual_tokens']} (the unpruned budget), plain selection op: {facts['plain_selection']}"
            + (" (reused)" if facts["reused"] else f" ({facts['load_s']:.1f} s)"))
    rows = configurations(args.budgets, facts["num_visual_tokens"] if facts else None)
    prepare_artifacts(args, rows, checkpoint.name)
    base = unpruned_row(rows)
    skipped = selection_skip_reason(base, facts)
    hf = measure(args, rows, checkpoint, keep_selection=skipped is None)
    selection = {} if skipped else {row["budget"]: time_selection(row["budget"], base["_tokens"], base["_text"], args.work, args.preset)
                                    for row in rows if row is not base}
    for k, sel in selection.items():
        log(f"selection op alone, K={k}: {sel['median'] * 1e3:.2f} ms median, {sel['best'] * 1e3:.2f} ms best on {sel['shape']}")
    if skipped:
        log(f"selection op alone: not timed: {skipped}")
    for row in rows:
        for key in ("_tokens", "_text", "_ids"):
            row.pop(key, None)
    add_ratios(rows, hf, selection)
    from prunert.manifest import load_manifest

    manifest = load_manifest(Path((base or rows[0])["artifact"]), verify_hashes=False)
    report = {"statement": STATEMENT, "preset": args.preset, "family": manifest.source.family, "architecture": manifest.source.architecture,
              "checkpoint": str(checkpoint), "image": str(IMAGE.relative_to(ROOT)), "prompt": user_prompt(manifest.text),
              "prompt_template": manifest.text.prompt_template, "rounds": args.repeats, "new_tokens": args.new_tokens,
              **environment, "export_adapter": facts, "configurations": rows, "hf_eager": hf,
              "selection_op": {str(k): v for k, v in selection.items()}, "selection_op_skipped": skipped, "definitions": DEFINITIONS}
    write_report(args, report, started)
    return 0


def write_report(args: argparse.Namespace, report: dict, started: float) -> None:
    rows, hf = report["configurations"], report["hf_eager"]
    probes = report["speed_probe"] = probe_summary(rows, hf)
    lines = headlines(rows, hf, {int(k): v for k, v in report["selection_op"].items()}, probes, report.get("selection_op_skipped"))
    checkpoints = {row["checkpoint"] for row in rows} | ({hf["checkpoint"]} if hf else set())
    report["same_checkpoint"] = checkpoints == {Path(report["checkpoint"]).name}
    if not report["same_checkpoint"]:  # the preset changed under us (another process rewrote the cache)
        lines.append("WARNING: configurations come from different checkpoints; re-run to re-export")
    if hf and not hf["prompt_matches_ort"]:
        lines.append("WARNING: Hugging Face's prompt ids differ from prunert's (image tokens collapsed): the rows answer different prompts")
    for stat, title in (("median", f"median of {args.repeats} rounds"), ("best", f"best of {args.repeats} rounds (fastest run)")):
        print(f"\n{title}\n{table(rows, hf, stat)}")
    print("\n" + "\n".join(lines) + f"\nnote: {STATEMENT}")
    report.update(headlines=lines, peak_rss_mb_bench_process=peak_rss_mb(), total_wall_s=time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {args.out} (total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
