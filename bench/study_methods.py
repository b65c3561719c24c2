"""Pruning-op library study: what each selection method costs in ONNX Runtime and what it keeps.

For every registered method (except "none") and every K: the op alone and the whole vision graph
(tower + projector + op) exported and timed in ORT, plus geometry metrics of the kept set (reconstruction
error, spatial coverage, text-relevance mass) and the drift of the decoder's next-token distribution, on the
bundled photos with one fixed prompt each; ResPrune's alpha is swept at the smallest K. Weights are
synthetic (seeded random): task accuracy cannot be measured, only geometry and output drift.

    python bench/study_methods.py                                    # llava-1.5-shaped, K = 64,128,192
    python bench/study_methods.py --preset llava-tiny --budgets 8,16 # smoke mode (~1-2 min)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llava import ROOT, log, machine, peak_rss_mb, speed_probe, versions  # noqa: E402

STATEMENT = "synthetic weights cannot measure task accuracy; these metrics describe geometry and output drift only"
PHOTOS = {  # photo -> its fixed prompt (LLaVA-1.5 conversation template added by the tokenizer step)
    "astronaut.jpg": "<image>\nWhat is the astronaut holding?",
    "chelsea.jpg": "<image>\nWhat color is the cat's fur?",
    "coffee.jpg": "<image>\nWhat drink is in the cup on the saucer?",
}
ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)
BLOCK = 4  # coverage blocks: BLOCK x BLOCK patches of the sqrt(N) x sqrt(N) grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-shaped", help="synthetic preset (default: %(default)s)")
    p.add_argument("--budgets", default="64,128,192", help="comma-separated K values (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--op-runs", type=int, default=10, help="timed op-alone runs per round (default: %(default)s)")
    p.add_argument("--vision-runs", type=int, default=2, help="timed vision-graph runs per round (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/study.json")
    p.add_argument("--work", type=Path, default=None, help="where graphs are exported (default: a temporary directory)")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=True, help="copy the plots to docs/images")
    args = p.parse_args(argv)
    args.budgets = sorted({int(k) for k in args.budgets.split(",") if k.strip()})
    return args


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        yield


# ---- inputs: photos, prompts, unpruned features --------------------------------------------------
def load_model(preset: str):
    from tokenizers import Tokenizer

    from prunert.adapters import resolve_source
    from prunert.export.pipeline import load_export_adapter

    source = resolve_source(f"synthetic:{preset}")
    adapter = load_export_adapter(source)
    tokenizer = Tokenizer.from_file(str(source.path / "tokenizer.json"))
    info = adapter.text_info(source.path)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    special |= {info["image_token_id"], info["pad_token_id"], *info["eos_token_ids"]} | ({info["bos_token_id"]} - {None})
    return source, adapter, tokenizer, info, special


def photo_inputs(source, adapter, tokenizer, info, special) -> list[dict]:
    """Per photo: pixel values, unpruned features + extras, content-word embeddings, prompt ids."""
    import torch
    from PIL import Image

    from prunert.config import ExportConfig
    from prunert.runtime.text import content_word_groups, text_relevance_inputs

    table = adapter.embedding_table().detach().float().numpy()
    out = []
    for name, prompt in PHOTOS.items():
        image = Image.open(ROOT / "examples/images" / name).convert("RGB")
        pixels = adapter.hf_vision_inputs([image], source.path)["pixel_values"]
        with torch.no_grad():
            features = adapter.vision_features(pixels, extras=("cls_attention", "patch_keys"))
        groups = [content_word_groups(tokenizer, prompt, special, info["image_placeholder"])]
        text, mask = text_relevance_inputs(groups, table, ExportConfig().max_text_tokens)
        ids = tokenizer.encode(info["prompt_template"].format(prompt=prompt)).ids
        out.append({"photo": name, "prompt": prompt, "pixels": pixels, "features": features,
                    "text": torch.from_numpy(text), "text_mask": torch.from_numpy(mask), "ids": ids})
    return out


def op_inputs(photo: dict, method: str) -> dict:
    from prunert import pruning_ops

    needs = pruning_ops.method_spec(method).needs
    f = photo["features"]
    return {"tokens": f["tokens"], "text": photo["text"], "text_mask": photo["text_mask"], **{k: f[k] for k in needs}}


# ---- what it keeps --------------------------------------------------------------------------------
def reconstruction_error(x: np.ndarray, kept: np.ndarray) -> float:
    """||X - P_S X||_F / ||X||_F, P_S the projection on the span of the kept tokens (rows of `kept`)."""
    u, s, _ = np.linalg.svd(kept.T.astype(np.float64), full_matrices=False)  # [D, r]
    basis = u[:, s > s[0] * 1e-10] if s.size and s[0] > 0 else u[:, :0]
    x = x.astype(np.float64)
    return float(np.linalg.norm(x - (x @ basis) @ basis.T) / np.linalg.norm(x))


def coverage(indices: np.ndarray, n: int) -> tuple[float, float]:
    """(fraction of BLOCK x BLOCK grid blocks holding a kept patch, mean patch-to-nearest-kept distance in patches)."""
    side = math.isqrt(n)
    rows, cols = np.divmod(np.asarray(indices), side)
    blocks = {(r // BLOCK, c // BLOCK) for r, c in zip(rows, cols)}
    all_r, all_c = np.divmod(np.arange(n), side)
    dist = np.hypot(all_r[:, None] - rows[None], all_c[:, None] - cols[None]).min(axis=1)
    return len(blocks) / math.ceil(side / BLOCK) ** 2, float(dist.mean())


def relevance(photo: dict) -> np.ndarray:
    """r as in ResPrune (max cosine to the prompt's content words, min-max normalised to [eps, 1])."""
    from prunert.config import ResPruneConfig
    from prunert.pruning_ops.resprune import text_relevance

    r = text_relevance(photo["features"]["tokens"], photo["text"], photo["text_mask"], ResPruneConfig(alpha=1.0))
    return r[0].numpy().astype(np.float64)


def next_token_logprobs(adapter, ids: list[int], image_token_id: int, visual) -> "np.ndarray":
    """The HF torch language model (no ONNX decoder): log p(next token | prompt with `visual` spliced in)."""
    import torch

    table = adapter.embedding_table()
    at = ids.index(image_token_id)
    with torch.no_grad():
        embeds = torch.cat([table[ids[:at]], visual[0], table[ids[at + 1:]]])[None]  # [1, L, D]
        hidden = adapter.text_backbone()(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
        return torch.log_softmax(adapter.lm_head()(hidden)[0].double(), dim=-1).numpy()


def quality(adapter, photos: list[dict], budget, base_logp: list, image_token_id: int) -> dict:
    """Geometry + drift metrics of one (method, K, params), averaged over the photos."""
    import torch

    from prunert import pruning_ops

    per = []
    for photo, ref in zip(photos, base_logp):
        with torch.no_grad():
            kept, idx = pruning_ops.select(op_inputs(photo, budget.method), budget)
        x, i = photo["features"]["tokens"][0].numpy(), idx[0].numpy()
        r = photo["r"]
        blocks, dist = coverage(i, x.shape[0])
        logp = next_token_logprobs(adapter, photo["ids"], image_token_id, kept)
        per.append({"photo": photo["photo"], "recon_error": reconstruction_error(x, kept[0].numpy()),
                    "block_coverage": blocks, "mean_nn_distance": dist, "relevance_mass": float(r[i].sum() / r.sum()),
                    "kl": float((np.exp(ref) * (ref - logp)).sum()), "top1_agree": float(ref.argmax() == logp.argmax())})
    keys = [k for k in per[0] if k != "photo"]
    log(f"  quality {budget.method} K={budget.budget} {budget.params}: done")
    return {**{k: float(np.mean([p[k] for p in per])) for k in keys}, "per_photo": per}


# ---- what it costs --------------------------------------------------------------------------------
def graph_stats(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def count(graph) -> int:
        return sum(1 + sum(count(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH) for node in graph.node)

    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return {"nodes_top": len(model.graph.node), "nodes_total": count(model.graph), "file_mb": size / 2**20}


def export_op(budget, feeds: dict, path: Path) -> dict:
    """pruning_ops.select alone on [1, N, D] + the extras the method needs, static shapes."""
    import torch

    from prunert import pruning_ops

    class OpOnly(torch.nn.Module):
        def forward(self, *tensors):
            return pruning_ops.select(dict(zip(feeds, tensors)), budget)

    start = time.perf_counter()
    with quiet():
        torch.onnx.export(OpOnly().eval(), tuple(feeds.values()), str(path), dynamo=True, input_names=list(feeds),
                          output_names=["visual_tokens", "kept_indices"], optimize=True, verbose=False)
    return {"export_s": time.perf_counter() - start, **graph_stats(path)}


def export_vision(adapter, budget, path: Path) -> dict:
    """The vision graph alone (tower + projector + op), exported as the artifact's vision.onnx is."""
    from prunert.config import ExportConfig
    from prunert.export.graphs import VisionPruneGraph, vision_export_spec
    from prunert.export.pipeline import _export

    cfg, start = ExportConfig(), time.perf_counter()
    hidden = adapter.embedding_table().shape[1]
    args, dynamic, inputs, outputs = vision_export_spec(adapter, cfg, budget.budget, hidden)
    with quiet():
        _export(VisionPruneGraph(adapter, budget).eval(), args, dynamic, inputs, outputs, path, cfg)
    return {"export_s": time.perf_counter() - start, **graph_stats(path)}


def time_session(path: Path, feeds: dict, runs: int) -> tuple[list[float], float]:
    """Load, warm up, time `runs` calls; -> (seconds per call, session load seconds)."""
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times, load


def interleaved(entries: list[dict], rounds: int, runs: int) -> None:
    """Rounds over every entry (one session in memory at a time): per entry median / best of all runs."""
    for entry in entries:
        entry["times"], entry["probes_ms"] = [], []
    for rnd in range(rounds):
        for entry in entries:
            entry["probes_ms"].append(speed_probe())
            times, _ = time_session(entry["path"], entry["feeds"], runs)
            entry["times"] += times
        log(f"  timing round {rnd + 1}/{rounds} done")
    for entry in entries:
        entry["median_ms"], entry["best_ms"] = statistics.median(entry["times"]) * 1e3, min(entry["times"]) * 1e3


def measure_cost(args, adapter, photo: dict, configs: list, work: Path) -> dict:
    """configs: [(method, K)] -> {(method, K): cost record}; timed on the first photo's inputs."""
    from prunert.config import BudgetConfig

    n = photo["features"]["tokens"].shape[1]
    vision_feeds = {"pixel_values": photo["pixels"].numpy(), "text_embeds": photo["text"].numpy(), "text_mask": photo["text_mask"].numpy()}
    ops, visions = [], []
    for method, k in configs + [("none", n)]:
        budget, tag = BudgetConfig(budget=k, method=method), f"{method}-k{k}"
        if method != "none":
            feeds = {name: v.numpy() for name, v in op_inputs(photo, method).items()}
            path = work / f"op-{tag}.onnx"
            ops.append({"key": (method, k), "path": path, "feeds": feeds, **export_op(budget, op_inputs(photo, method), path)})
        (work / tag).mkdir(exist_ok=True)
        path = work / tag / "vision.onnx"
        visions.append({"key": (method, k), "path": path, "feeds": vision_feeds, **export_vision(adapter, budget, path)})
        log(f"exported {tag}: vision graph {visions[-1]['export_s']:.1f} s" + (f", op {ops[-1]['export_s']:.1f} s" if method != "none" else ""))
    log("timing the ops alone")
    interleaved(ops, args.rounds, args.op_runs)
    log("timing the vision graphs")
    interleaved(visions, args.rounds, args.vision_runs)
    keep = ("median_ms", "best_ms", "nodes_top", "nodes_total", "file_mb", "export_s", "probes_ms")
    return {"op": {e["key"]: {k: e[k] for k in keep} for e in ops}, "vision": {e["key"]: {k: e[k] for k in keep} for e in visions}}


# ---- report -----------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (f"{'method':<14}{'K':>5}{'op ms':>9}{'vis ms':>9}{'share':>7}{'nodes':>7}{'op MB':>7}"
            f"{'recon':>7}{'blocks':>7}{'nn d':>6}{'rel':>6}{'KL':>9}{'top1':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.get("cost") or {}
        cost = (f"{c['op_ms']:>9.2f}{c['vision_ms']:>9.1f}{c['share'] * 100:>6.1f}%{c['op_nodes']:>7d}{c['op_mb']:>7.2f}"
                if c else f"{'-':>9}{'-':>9}{'-':>7}{'-':>7}{'-':>7}")
        lines.append(f"{r['label']:<14}{r['budget']:>5}{cost}{r['recon_error']:>7.3f}{r['block_coverage']:>7.2f}"
                     f"{r['mean_nn_distance']:>6.2f}{r['relevance_mass']:>6.2f}{r['kl']:>9.2e}{r['top1_agree']:>6.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, docs: bool) -> list[str]:
    """Two PNGs beside the JSON (<out stem>-cost.png, -drift.png); --docs copies them as docs/images/study-*.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["alpha"] is None]
    methods = sorted({r["method"] for r in main})
    panels = {"study-cost.png": (("op_ms", "op alone, ORT median (ms)"), ("vision_ms", "vision graph, ORT median (ms)")),
              "study-drift.png": (("kl", "KL(unpruned || pruned), next token"), ("top1_agree", "top-1 agreement"))}
    written = []
    for name, specs in panels.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (key, title) in zip(axes, specs):
            for m in methods:
                pts = sorted((r["budget"], r["cost"][key] if key in r.get("cost", {}) else r[key]) for r in main if r["method"] == m)
                ax.plot(*zip(*pts), marker="o", label=m)
            ax.set(xlabel="K (kept visual tokens)", title=title)
            if key == "kl":
                ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"prunert method study ({rows[0]['preset']}): {STATEMENT}", fontsize=8)
        fig.tight_layout()
        local = out.with_name(f"{out.stem}-{name.split('-', 1)[1]}")
        fig.savefig(local, dpi=110)
        plt.close(fig)
        written.append(str(local))
        if docs:
            (ROOT / "docs/images").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, ROOT / "docs/images" / name)
    return written


def main(argv=None) -> int:
    args, started = parse_args(argv), time.perf_counter()
    from prunert import pruning_ops
    from prunert.config import BudgetConfig, ResPruneConfig

    environment = {"machine": machine(), "versions": versions()}
    log(f"preset {args.preset}: budgets {args.budgets}; {STATEMENT}")
    source, adapter, tokenizer, info, special = load_model(args.preset)
    photos = photo_inputs(source, adapter, tokenizer, info, special)
    n = photos[0]["features"]["tokens"].shape[1]
    if any(not 0 < k < n for k in args.budgets):
        raise SystemExit(f"study: error: --budgets {args.budgets}: expected 1 <= K < {n} for {args.preset}")
    base = []
    for photo in photos:
        photo["r"] = relevance(photo)
        base.append(next_token_logprobs(adapter, photo["ids"], info["image_token_id"], photo["features"]["tokens"]))
    log(f"loaded {source.label}, {len(photos)} photos, N={n} ({time.perf_counter() - started:.0f} s)")

    methods = [m for m in pruning_ops.methods() if m != "none"]
    configs = [(m, k) for m in methods for k in args.budgets]
    rows = []
    for m, k in configs:
        rows.append({"label": m, "method": m, "budget": k, "alpha": None, "preset": args.preset,
                     **quality(adapter, photos, BudgetConfig(budget=k, method=m), base, info["image_token_id"])})
    sweep_k = 64 if 64 in args.budgets else args.budgets[0]
    for a in ALPHAS:
        budget = BudgetConfig(budget=sweep_k, method="resprune", params=ResPruneConfig(alpha=a))
        rows.append({"label": f"resprune a={a:g}", "method": "resprune", "budget": sweep_k, "alpha": a, "preset": args.preset,
                     **quality(adapter, photos, budget, base, info["image_token_id"])})
    log(f"quality metrics done ({time.perf_counter() - started:.0f} s); cost columns follow after the exports\n{table(rows)}")

    work = args.work or Path(tempfile.mkdtemp(prefix="prunert-study-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cost = measure_cost(args, adapter, photos[0], configs, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    tower = cost["vision"][("none", n)]
    for r in rows:
        if r["alpha"] is None:
            op, vis = cost["op"][(r["method"], r["budget"])], cost["vision"][(r["method"], r["budget"])]
            r["cost"] = {"op_ms": op["median_ms"], "op_best_ms": op["best_ms"], "vision_ms": vis["median_ms"],
                         "vision_best_ms": vis["best_ms"], "share": op["median_ms"] / vis["median_ms"],
                         "op_nodes": op["nodes_total"], "op_nodes_top": op["nodes_top"], "op_mb": op["file_mb"],
                         "vision_nodes": vis["nodes_total"], "op_export_s": op["export_s"], "vision_export_s": vis["export_s"],
                         "op_probes_ms": op["probes_ms"], "vision_probes_ms": vis["probes_ms"]}
    report_and_write(args, rows, tower, photos, environment, started)
    return 0


def report_and_write(args, rows, tower, photos, environment, started) -> None:
    text = table(rows)
    print(f"\n{text}\n\nunpruned vision graph (tower + projector, method none): {tower['median_ms']:.1f} ms median, "
          f"{tower['best_ms']:.1f} ms best\nnote: {STATEMENT}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, args.out, args.docs)
    for r in rows:
        r.pop("preset")
    report = {"statement": STATEMENT, "preset": args.preset, "budgets": args.budgets, "alphas": ALPHAS,
              "photos": {p["photo"]: p["prompt"] for p in photos}, "decoder": "Hugging Face torch language model + lm_head (fp32, eager), one forward per prompt",
              "timing": {"rounds": args.rounds, "op_runs_per_round": args.op_runs, "vision_runs_per_round": args.vision_runs,
                         "inputs": f"first photo ({photos[0]['photo']}) and its prompt"},
              "unpruned_vision": tower, "rows": rows, "table": text, "plots": plots, **environment,
              "peak_rss_mb": peak_rss_mb(), "total_wall_s": time.perf_counter() - started, "definitions": "bench/STUDY.md"}
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {args.out} and {len(plots)} plots (total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
