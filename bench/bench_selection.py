"""Selection at large N: the exported ResPrune / CDPruner op, in its Gram form and its rows form, against a plain
NumPy float32 greedy of the same definition (O(K N d)); ONNX Runtime CPU at an explicit thread count.

  Gram form  the N x N Gram (CDPruner: kernel) matrix once, O(N^2 d), one row of it per step (every export before
             the rows form; config.GRAM_MAX_N keeps it at small N);
  rows form  each step computes the picked token's row from the features, X x_j: O(N d) per step, O(K N d) in all.

Each method and N is exported twice (gram_max_n = N: Gram; 0: rows; batch 1, static N, one content-word text of M
rows) and timed in interleaved rounds with the NumPy greedy: every round runs a noise probe (bench_vlm.speed_probe)
then every (N, method, runner) once, in an order that rotates per round. Reported: median and best over rounds, the
ratio op / NumPy (> 1: the op is slower), the crossover sweep (the smallest N at which the rows form is the faster,
which sets config.GRAM_MAX_N), and whether all three keep the same set. JSON to --out, markdown table on stdout.

    python bench/bench_selection.py                                          # N = 576,2304,2880,4096; K=64, d=4096, 1 thread
    python bench/bench_selection.py --n 256,576 --sweep 128,256 --d 512 --rounds 2 --out /tmp/selection.json  # smoke
"""

from __future__ import annotations

import argparse
import os
import sys


def _threads(argv: list[str]) -> str:
    """--threads before numpy loads: its BLAS reads the thread count once, at import."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


if __name__ == "__main__":  # run as a script (imported, e.g. by its test, it leaves the environment alone)
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = _threads(sys.argv[1:])

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_vlm import log, machine, speed_probe, versions  # noqa: E402

from prunert.config import GRAM_MAX_N, CDPrunerConfig, ResPruneConfig  # noqa: E402
from prunert.pruning_ops.reference import TIE_RTOL  # noqa: E402

CONFIGS = {"resprune": ResPruneConfig(), "cdpruner": CDPrunerConfig()}  # the defaults an export gets
RUNNERS = ("numpy", "gram", "rows")
TEXT_ROWS = 16  # content words of the prompt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="576,2304,2880,4096", help="N of the table (default: %(default)s)")
    p.add_argument("--sweep", default="128,256,384,576,768,1024,1536", help="extra N of the crossover sweep (default: %(default)s)")
    p.add_argument("--k", type=int, default=64, help="budget K (default: %(default)s)")
    p.add_argument("--d", type=int, default=4096, help="token width d (default: %(default)s)")
    p.add_argument("--methods", default="resprune,cdpruner", help="methods with both forms (default: %(default)s)")
    p.add_argument("--share-n", default="324,576,1280,4096",
                   help="Qwen2.5-VL merged tokens N = P / 4 (P = 1296, 2304, 5120, 16384 patches) timed at --share-d (default: %(default)s)")
    p.add_argument("--share-d", type=int, default=896, help="the width of synthetic:qwen2.5-vl-shaped's selection (default: %(default)s)")
    p.add_argument("--vision-results", type=Path, default=ROOT / "bench/results/qwen_vision.json",
                   help="bench_qwen_vision.py's report: vision-graph ms per P, for the share (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads and NumPy's BLAS threads (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/selection.json", help="JSON report (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/prunert-bench-selection"), help="exported graphs (default: %(default)s)")
    args = p.parse_args(argv)
    args.n, args.sweep = [int(v) for v in args.n.split(",")], [int(v) for v in args.sweep.split(",") if v]
    args.share_n = [int(v) for v in args.share_n.split(",") if v]
    args.methods = args.methods.split(",")
    if any(n < args.k for n in args.n + args.sweep + args.share_n) or args.threads < 1 or args.rounds < 1:
        raise SystemExit("bench_selection: error: expected every N >= K, --threads >= 1, --rounds >= 1")
    return args


# ---- the NumPy greedy: O(K N d), float32, the ops' definition (reference.greedy_order's rules) ------------------
def _relevance(x: np.ndarray, text: np.ndarray, epsilon: float) -> np.ndarray:
    """r in [epsilon, 1]: max cosine to the content words, min-max normalised (affine epsilon floor)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    r = (unit @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T).max(axis=1)
    return (epsilon + (1 - epsilon) * (r - r.min()) / (r.max() - r.min())).astype(np.float32)


def numpy_greedy(x: np.ndarray, text: np.ndarray, k: int, method: str) -> np.ndarray:
    """Kept indices (ascending) of tokens x [N, d] float32: ResPrune (default config: alpha 1, energies |x|^2) or
    CDPruner (kernel r_i r_j cos, gains r^2). Each step one [N, d] x [d] product for the picked row."""
    cfg = CONFIGS[method]
    r = _relevance(x, text, cfg.epsilon)
    if method == "cdpruner":
        feats, scale, weight = x / np.linalg.norm(x, axis=1, keepdims=True), r, None
        energy = r * r
    else:
        feats, scale, weight = x, None, r  # alpha = 1
        energy = (x * x).sum(axis=1)
    floor, coeffs, kept = cfg.tau * energy, np.zeros((k, len(x)), np.float32), np.zeros(len(x), bool)
    for step in range(k):
        effective = np.where(energy < floor, 0.0, energy)
        score = np.where(kept, -np.inf, effective if weight is None else weight * effective)
        j = int(np.argmax(score >= score.max() * (1.0 - TIE_RTOL)))
        kept[j] = True
        if effective[j] <= 0:
            continue
        row = feats @ feats[j]  # [N]  the O(N d) step
        if scale is not None:
            row = scale * row * scale[j]
        column = (row - coeffs[:step].T @ coeffs[:step, j]) / np.sqrt(effective[j])
        coeffs[step] = column
        energy = np.maximum(energy - column * column, 0.0)
    return np.flatnonzero(kept)


# ---- the exported op ---------------------------------------------------------------------------------------------
def export_op(method: str, n: int, d: int, k: int, gram_max_n: int, work: Path):
    """The registry op on [1, N, d] (the vision graph's selection), exported as the pipeline exports (dynamo,
    opset 20), in the form gram_max_n gives at this N -> the .onnx path."""
    import torch

    from prunert import pruning_ops
    from prunert.config import BudgetConfig

    budget = BudgetConfig(budget=k, method=method, params=replace(CONFIGS[method], gram_max_n=gram_max_n))

    class SelectOnly(torch.nn.Module):
        def forward(self, tokens, text, text_mask):
            return pruning_ops.select({"tokens": tokens, "text": text, "text_mask": text_mask}, budget)

    path = work / f"{method}-n{n}-d{d}-k{k}-gram{gram_max_n}.onnx"
    args = (torch.randn(1, n, d), torch.randn(1, TEXT_ROWS, d), torch.ones(1, TEXT_ROWS, dtype=torch.int64))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(SelectOnly().eval(), args, str(path), dynamo=True, opset_version=20,
                          input_names=["tokens", "text", "text_mask"], output_names=["visual_tokens", "kept_indices"])
    return path


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning worker eats the next timing
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def inputs(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    """Projector-like tokens (a shared mean direction plus noise: correlated, as real ones are) and content words."""
    rng = np.random.default_rng([seed, n, d])
    x = rng.standard_normal(d) + rng.standard_normal((n, d))
    return {"tokens": x[None].astype(np.float32), "text": rng.standard_normal((1, TEXT_ROWS, d)).astype(np.float32),
            "text_mask": np.ones((1, TEXT_ROWS), np.int64)}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ---- the run -----------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> list[dict]:
    """One cell per (N, method): its inputs, the two sessions, and whether the three runners keep the same set."""
    args.work.mkdir(parents=True, exist_ok=True)
    cells = []
    sizes = [(n, args.d) for n in sorted(set(args.n + args.sweep))] + [(n, args.share_d) for n in args.share_n]
    for n, d in sizes:
        feeds = inputs(n, d, 0)
        for method in args.methods:
            cell = {"n": n, "d": d, "method": method, "feeds": feeds, "times": {r: [] for r in RUNNERS}}
            for runner, gram_max_n in (("gram", n), ("rows", 0)):
                export_s, path = timed(lambda: export_op(method, n, d, args.k, gram_max_n, args.work))
                cell[runner] = session(path, args.threads)
                cell.setdefault("export_s", {})[runner] = export_s
            kept = {"numpy": numpy_greedy(feeds["tokens"][0], feeds["text"][0], args.k, method).tolist()}
            for runner in ("gram", "rows"):
                kept[runner] = cell[runner].run(None, feeds)[1][0].tolist()  # also the warm-up
            cell["same_set"] = kept["numpy"] == kept["gram"] == kept["rows"]
            cell["overlap"] = {r: len(set(kept[r]) & set(kept["numpy"])) / args.k for r in ("gram", "rows")}
            log(f"exported {method} N={n} d={d}: same set {cell['same_set']} (export {cell['export_s']['gram']:.1f} + {cell['export_s']['rows']:.1f} s)")
            cells.append(cell)
    return cells


def run_once(cell: dict, runner: str, k: int) -> float:
    feeds = cell["feeds"]
    if runner == "numpy":
        return timed(lambda: numpy_greedy(feeds["tokens"][0], feeds["text"][0], k, cell["method"]))[0]
    return timed(lambda: cell[runner].run(None, feeds))[0]


def measure(args: argparse.Namespace, cells: list[dict]) -> list[float]:
    probes = []
    for round_ in range(args.rounds):
        probes.append(speed_probe())
        for i, cell in enumerate(cells):
            shift = (round_ + i) % len(RUNNERS)
            for runner in RUNNERS[shift:] + RUNNERS[:shift]:
                cell["times"][runner].append(run_once(cell, runner, args.k))
        log(f"round {round_ + 1}/{args.rounds} (probe {probes[-1]:.1f} ms)")
    probes.append(speed_probe())
    return probes


def summary(cell: dict) -> dict:
    med = {r: statistics.median(t) for r, t in cell["times"].items()}
    return {"n": cell["n"], "d": cell["d"], "method": cell["method"], "same_set": cell["same_set"], "overlap_vs_numpy": cell["overlap"],
            "median_ms": {r: v * 1e3 for r, v in med.items()}, "best_ms": {r: min(t) * 1e3 for r, t in cell["times"].items()},
            "runs_ms": {r: [v * 1e3 for v in t] for r, t in cell["times"].items()}, "export_s": cell["export_s"],
            "ratio_vs_numpy": {r: med[r] / med["numpy"] for r in ("gram", "rows")}, "rows_over_gram": med["rows"] / med["gram"]}


def crossover(rows: list[dict], method: str, d: int) -> dict:
    """The largest N at which the Gram form measured faster and the smallest above it where the rows form did."""
    mine = sorted((r for r in rows if r["method"] == method and r["d"] == d), key=lambda r: r["n"])
    gram_faster = [r["n"] for r in mine if r["rows_over_gram"] >= 1.0]
    rows_faster = [r["n"] for r in mine if r["rows_over_gram"] < 1.0]
    return {"gram_faster_at": gram_faster, "rows_faster_at": rows_faster,
            "largest_gram_faster": max(gram_faster, default=None), "smallest_rows_faster": min(rows_faster, default=None)}


def table(rows: list[dict], ns: list[int], d: int) -> str:
    out = ["| method | N | NumPy greedy ms | Gram op ms | rows op ms | Gram op vs NumPy | rows op vs NumPy | rows / Gram | same set |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["n"] in ns and r["d"] == d), key=lambda r: (r["method"], r["n"])):
        m = r["median_ms"]
        out.append(f"| {r['method']} | {r['n']} | {m['numpy']:.1f} | {m['gram']:.1f} | {m['rows']:.1f} | "
                   f"{r['ratio_vs_numpy']['gram']:.2f}x | {r['ratio_vs_numpy']['rows']:.2f}x | {r['rows_over_gram']:.2f} | {r['same_set']} |")
    return "\n".join(out)


def vision_share(rows: list[dict], args: argparse.Namespace) -> dict:
    """The op's share of one vision-graph call at each Qwen size: op ms / (op ms + the rest of the graph), the
    vision-graph time from bench_qwen_vision.py's report ("results"[P][variant]["median_s"]: variant "new", the
    padded-window graph, and "masked", the [P, P] one) at P = 4 N; {"available": False, "why": ...} without it."""
    if not args.vision_results.is_file():
        return {"available": False, "why": f"no {args.vision_results}"}
    vision = json.loads(args.vision_results.read_text(encoding="utf-8"))
    out = []
    for r in (r for r in rows if r["d"] == args.share_d and r["n"] in args.share_n):
        for graph, cell in vision.get("results", {}).get(str(4 * r["n"]), {}).items():
            if graph != "hf" and "median_s" in cell:
                ms = cell["median_s"] * 1e3
                out.append({"method": r["method"], "n": r["n"], "patches": 4 * r["n"], "vision_graph": graph, "vision_ms": ms,
                            **{f"{form}_share": r["median_ms"][form] / (ms + r["median_ms"][form]) for form in ("gram", "rows")}})
    return {"available": bool(out), "source": args.vision_results.name, "vision_threads": vision.get("threads"), "rows": out,
            **({} if out else {"why": "no vision time at these patch counts"})}


def share_table(share: dict) -> str:
    if not share["available"]:
        return f"\nshare of the vision graph: not available ({share['why']})"
    out = ["", f"share of (vision graph + op); vision graph at {share['vision_threads']} thread(s) ({share['source']}), the op at --threads:",
           "", "| method | N | P | vision graph | vision ms | Gram op share | rows op share |", "|---|---|---|---|---|---|---|"]
    for r in share["rows"]:
        out.append(f"| {r['method']} | {r['n']} | {r['patches']} | {r['vision_graph']} | {r['vision_ms']:.0f} | "
                   f"{r['gram_share'] * 100:.1f}% | {r['rows_share'] * 100:.1f}% |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    started, info = time.perf_counter(), machine()
    log(f"K={args.k}, d={args.d}, {args.threads} thread(s), {args.rounds} rounds, load {os.getloadavg()}")
    cells = prepare(args)
    probes = measure(args, cells)
    rows = [summary(cell) for cell in cells]
    report = {
        "what": "exported selection op (ORT CPU) in its Gram and rows forms vs a NumPy float32 O(K N d) greedy, same definition",
        "k": args.k, "d": args.d, "threads": args.threads, "rounds": args.rounds, "text_rows": TEXT_ROWS,
        "gram_max_n_in_config": GRAM_MAX_N, "table_n": args.n, "sweep_n": args.sweep,
        "rows": rows, "crossover": {m: crossover(rows, m, args.d) for m in args.methods},
        "share_d": args.share_d, "share_n": args.share_n, "vision_share": vision_share(rows, args),
        "probe_ms": {"all": probes, "max_over_min": max(probes) / min(probes)},
        "machine": info, "load_avg_at_end": os.getloadavg(), "versions": versions(), "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nmedian of {args.rounds} interleaved rounds, ORT CPU {args.threads} thread(s), K={args.k}, d={args.d}; "
          f"ratio > 1: slower than the NumPy greedy; probe max/min {report['probe_ms']['max_over_min']:.2f}\n")
    print(table(rows, args.n, args.d))
    print("\ncrossover sweep (rows / Gram; < 1: the rows form is faster):")
    for method in args.methods:
        sweep = sorted((r for r in rows if r["method"] == method and r["d"] == args.d), key=lambda r: r["n"])
        print(f"  {method}: " + ", ".join(f"N={r['n']} {r['rows_over_gram']:.2f}" for r in sweep) + f" -> {report['crossover'][method]}")
    if args.share_n:
        print(f"\nQwen2.5-VL sizes (N = P / 4 merged tokens), d = {args.share_d}:\n")
        print(table(rows, args.share_n, args.share_d))
        print(share_table(report["vision_share"]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
