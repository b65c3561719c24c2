"""Side by side: prunert's decoder vs ONNX Runtime GenAI on the same synthetic decoder weights (issue 12, section 6).

ORT-genai's model is built by its own model builder from the Llama part of the LLaVA checkpoint (bench/peers_genai.py);
prunert's is the artifact exported from that checkpoint, run through the runtime as `prunert run` runs it (make_runner's
decoder graph for the onnxruntime backend at the precision, its DecoderSession, the one decode loop decode_steps).
Both run at the same --threads and spinning setting, greedy, on the same random prompt ids of each context. Interleaved
rounds (A B, then B A, ...; each round opens both peers afresh in its order) time a prefill of C tokens and then N
decode steps, per precision and context; a bandwidth
probe gives the floor (bandwidth / bytes read per step) and a fixed matmul between rounds shows the machine's noise.
Weights are synthetic (seeded random): speed only.

    python bench/bench_peers.py --threads 2                                   # llava-1.5-shaped, fp32 + int4, C = 104, 616, 1500
    python bench/bench_peers.py --preset llava-tiny --contexts 8,16 --steps 4 --rounds 1 --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_vlm import artifact_matches, export_record, log, machine, peak_rss_mb, speed_probe, versions  # noqa: E402
from peers_floor import bandwidth_probe, bytes_per_step  # noqa: E402
import peers_ops  # noqa: E402
from peers_genai import GenaiPeer, Int4Settings, build_genai, extract_llama, genai_version, settings_key  # noqa: E402
from prunert.runtime.huge_pages import thp_mode  # noqa: E402

PEERS = ("prunert", "ort-genai")
STATEMENT = "weights are synthetic (seeded random): only speed is measured, not accuracy"
BUDGET = 64  # the artifact's K: the decoder does not depend on it (the prompt here is text ids, no image)
EXPORT_SOURCES = ("prunert/export", "prunert/adapters", "prunert/calibration")  # a cached artifact is re-made when these change


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-shaped", help="synthetic LLaVA preset (default: %(default)s)")
    p.add_argument("--artifact", type=Path, help="an exported prunert artifact of the preset to use (default: export into --work); "
                   "int4 adds its variant with `prunert quantize` when it has none")
    p.add_argument("--precisions", default="fp32,int4", help="comma-separated, of fp32 and int4 (default: %(default)s)")
    p.add_argument("--contexts", default="104,616,1500", help="prefill lengths C (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed after each prefill (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds; even balances the order (default: %(default)s)")
    p.add_argument("--threads", type=int, required=True, help="intra-op threads of both peers' sessions (e.g. 2)")
    p.add_argument("--spin", action="store_true", help="let both peers' ONNX Runtime threads spin (default: off, as prunert's)")
    p.add_argument("--block-steps", type=int, default=4,
                   help="decoder calls per block: the two peers' decodings alternate block by block (default: 4; 0: one block each)")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="prunert's sessions without transparent huge pages (its `--no-huge-pages`; default: on, as prunert's)")
    p.add_argument("--op-profile", action="store_true",
                   help="also profile both peers per op type at the first and last context (bench/peers_ops.py)")
    p.add_argument("--block-size", type=int, default=Int4Settings.block_size, help="int4 block size (default: %(default)s)")
    p.add_argument("--probe-gib", type=float, default=1.0, help="array size of the bandwidth probe, GiB (default: %(default)s)")
    p.add_argument("--prepare-only", action="store_true", help="export / quantize / build what the run needs, then stop")
    p.add_argument("--work", type=Path, default=ROOT / "bench/results/peers", help="artifacts and builds (cached)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/bench_peers.json", help="JSON report")
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    args.contexts = sorted({int(x) for x in args.contexts.split(",") if x.strip()})
    if not args.precisions or set(args.precisions) - {"fp32", "int4"}:
        p.error(f"--precisions {args.precisions}: expected fp32 and/or int4")
    if not args.contexts or args.contexts[0] < 1 or args.steps < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--contexts, --steps, --rounds and --threads must be >= 1")
    return args


# ---- 1. the two models ------------------------------------------------------------------------
def git(*a: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False)


def export_unchanged(commit: str | None) -> bool:
    """Nothing under EXPORT_SOURCES changed (committed, modified or new) since `commit`."""
    return bool(commit) and git("diff", "--quiet", commit, "--", *EXPORT_SOURCES).returncode == 0 and not git(
        "status", "--porcelain", "--", *EXPORT_SOURCES).stdout.strip()


def prunert_artifact(args: argparse.Namespace, checkpoint: Path, max_sequence: int) -> tuple[Path, dict]:
    """The artifact to time: --artifact, or one exported into --work (reused while it matches the checkpoint, holds
    max_sequence positions and the export code is unchanged)."""
    from prunert.config import ExportConfig
    from prunert.manifest import load_manifest

    if args.artifact:
        have = load_manifest(args.artifact, verify_hashes=False).text.max_sequence
        if have < max_sequence:
            raise SystemExit(f"bench: error: --artifact {args.artifact}: max_sequence {have}, the run needs {max_sequence} "
                             "(largest context + steps + 1)")
        return args.artifact, {"given": True}
    directory = args.work / f"{args.preset}-k{BUDGET}-seq{max_sequence}"
    record = export_record(directory)
    if artifact_matches(directory, args.preset, BUDGET, "resprune", checkpoint.name) and export_unchanged(
            json.loads(record.read_text()).get("git_commit")):
        log(f"prunert: reusing {directory}")
        return directory, {**json.loads(record.read_text()), "reused": True}
    prompt_tokens = ExportConfig().max_prompt_tokens
    new_tokens = max_sequence - (prompt_tokens - 1 + BUDGET)  # ExportConfig.max_sequence
    command = [sys.executable, "-m", "prunert", "export", "--model", f"synthetic:{args.preset}", "--budget", str(BUDGET),
               "--max-prompt-tokens", str(prompt_tokens), "--max-new-tokens", str(max(new_tokens, 1)),
               "--out", str(directory), "--overwrite"]
    log(f"prunert: exporting {directory}")
    clean = not git("status", "--porcelain", "--", *EXPORT_SOURCES).stdout.strip()  # a dirty tree's export is never reused
    start, done = time.perf_counter(), subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bench: error: prunert export failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    facts = {"checkpoint": checkpoint.name, "git_commit": git("rev-parse", "HEAD").stdout.strip() if clean else None, "command": command[2:],
             "export_s": time.perf_counter() - start}
    record.write_text(json.dumps(facts) + "\n")
    return directory, {**facts, "reused": False}


def int4_variant(artifact: Path, block_size: int) -> tuple[str | None, dict]:
    """(why prunert's int4 cannot run, or None; its variant's settings). Makes the variant with
    `prunert quantize A --weights int4` when this prunert has the precision and the artifact lacks it."""
    from prunert.config import PRECISIONS
    from prunert.manifest import load_manifest

    if "int4" not in PRECISIONS:
        return "not available: this prunert has no int4 precision (`prunert quantize --weights int4`)", {}
    if "int4" not in load_manifest(artifact, verify_hashes=False).variants:
        command = [sys.executable, "-m", "prunert", "quantize", str(artifact), "--weights", "int4", "--block-size", str(block_size)]
        log(f"prunert: {' '.join(command[2:])}")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            return f"not available: {' '.join(command[2:])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", {}
    variant = load_manifest(artifact, verify_hashes=False).variants["int4"]
    return None, {"tool": variant.tool, **variant.settings}


def int4_settings(prunert_settings: dict, block_size: int) -> Int4Settings:
    """ORT-genai's int4 settings: those prunert's int4 variant records (block_size, accuracy_level, lm_head "int4" |
    "fp32"; prunert's int4 is always symmetric), else the defaults with --block-size."""
    defaults = Int4Settings(block_size=block_size)
    return Int4Settings(block_size=int(prunert_settings.get("block_size", defaults.block_size)),
                        symmetric=defaults.symmetric,
                        accuracy_level=int(prunert_settings.get("accuracy_level", defaults.accuracy_level)),
                        quantize_lm_head=prunert_settings.get("lm_head", "int4") == "int4")


class PrunertPeer:
    """prunert's decoder as `prunert run` runs it: the decoder graph VLMPipeline picks for the onnxruntime backend at
    this precision (decoder_graph), its runner's decoder_session, decode_steps with greedy choice over the artifact's
    embedding table."""

    def __init__(self, artifact: Path, precision: str, runtime):
        from prunert.config import GraphPrecisions
        from prunert.runtime import Artifact
        from prunert.runtime.decode import table_embedder
        from prunert.runtime.pipeline import decoder_graph, make_runner

        self.artifact, precisions = Artifact(artifact, verify_hashes=False), GraphPrecisions.parse(precision)
        graph = decoder_graph(self.artifact, "onnxruntime", precisions)
        self.runner = make_runner(self.artifact, graph, "onnxruntime", precisions, runtime)
        self.session = self.runner.decoder_session(self.artifact.manifest.decoder.num_layers)
        spec = self.runner.spec
        self.embeds_dtype, self.mask_dtype = (np.dtype(spec.input(n).dtype) for n in ("inputs_embeds", "attention_mask"))
        self.embed = table_embedder(self.artifact.embeddings, self.embeds_dtype)  # ids [B] -> [B, 1, D]
        self.capacity = self.artifact.manifest.text.max_sequence  # decode_steps' cap (advance takes fewer)
        self.state = None

    def graph(self) -> dict:
        import onnx

        spec = self.runner.spec
        nodes = len(onnx.load(str(self.artifact.path(spec.file)), load_external_data=False).graph.node)
        options = self.runner.session.get_session_options()
        return {"file": spec.file, "nodes": nodes, "kv_cache": spec.kv_cache, "session": type(self.session).__name__,
                "intra_op_num_threads": options.intra_op_num_threads,
                "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning"),
                "huge_page_bytes": self.runner.huge_page_bytes, "thp": thp_mode()}

    def prefill(self, ids: np.ndarray) -> float:
        from prunert.runtime.host import SpliceLayout

        start = time.perf_counter()
        embeds = np.asarray(self.artifact.embeddings[ids], self.embeds_dtype)[None]  # [1, L, D]
        mask = np.ones((1, len(ids)), self.mask_dtype)  # [1, L]
        positions = self.artifact.host.position_ids(mask, SpliceLayout(np.asarray(ids, np.int64)[None]))  # [1, L]
        self.session.reset(1)
        logits = self.session.run(embeds, mask, positions)  # [1, L, V]
        seconds = time.perf_counter() - start
        self.state = (logits[:, -1], mask, self.artifact.host.next_position_ids(positions, mask))
        return seconds

    def begin(self) -> None:
        """Decoding from the prefill's state through decode_steps, advanced by advance(): its first step chooses from
        the prefill's logits, each later one runs the decoder on the previous token."""
        from prunert.runtime.decode import decode_steps, greedy

        logits, mask, positions = self.state
        self.steps = decode_steps(self.session, logits, mask, positions, self.embed, greedy, self.capacity)

    def advance(self, calls: int) -> tuple[float, list[int]]:
        """The next `calls` steps of begin()'s decoding -> seconds, their tokens."""
        tokens, start = [], time.perf_counter()
        for _ in range(calls):
            tokens.append(int(next(self.steps).tokens[0]))
        return time.perf_counter() - start, tokens

    def decode(self, steps: int) -> tuple[float, list[int]]:
        """`steps` decoder calls after the prefill (steps + 1 steps: step 0 chooses from the prefill's logits)."""
        self.begin()
        return self.advance(steps + 1)


# ---- 2. interleaved rounds --------------------------------------------------------------------
def prompt_ids(context: int, vocab: int, special: set[int]) -> np.ndarray:
    """Seeded random ids [C] of one context, the same for both peers, no special ids."""
    low = max(special) + 1 if special else 0
    return np.random.default_rng(context).integers(low, vocab, context)


def time_one(peer, ids: np.ndarray, steps: int) -> dict:
    prefill_s = peer.prefill(ids)
    decode_s, tokens = peer.decode(steps)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tok_s": steps / decode_s, "tokens": tokens}


def blocks(steps: int, block: int) -> list[int]:
    """The decoder calls of each block of one peer's decoding, steps + 1 in all: step 0 (it chooses from the prefill's
    logits) rides in the first block, then `block` each, the last what is left. block 0 (or >= steps): one block."""
    calls = steps + 1
    if block <= 0 or block >= steps:
        return [calls]
    out, left = [block + 1], steps - block
    while left > 0:
        out.append(min(block, left))
        left -= out[-1]
    return out


def time_pair(peers: dict, ids: np.ndarray, steps: int, block: int) -> dict[str, dict]:
    """Both peers at one context: each prefills (in the round's order), then their decodings alternate block by block
    (`block` decoder calls each, the first of each pair alternating), so the two are timed within a block's time of
    each other and a burst of load on this shared machine falls on both. -> peer -> its run (decode_s: its blocks'
    sum)."""
    runs = {name: {"prefill_s": peer.prefill(ids), "decode_s": 0.0, "tokens": [], "blocks_s": []} for name, peer in peers.items()}
    for peer in peers.values():
        peer.begin()
    names = list(peers)
    for index, calls in enumerate(blocks(steps, block)):
        for name in names if index % 2 == 0 else names[::-1]:
            seconds, tokens = peers[name].advance(calls)
            run = runs[name]
            run["decode_s"] += seconds
            run["tokens"] += tokens
            run["blocks_s"].append(seconds)
    for run in runs.values():
        run["decode_tok_s"] = steps / run["decode_s"]
    return runs


def measure(base: dict, keys: list[tuple[str, str]], prompts: dict, args: argparse.Namespace) -> tuple[list[dict], list[float], dict]:
    """`rounds` rounds; each round times every (precision, context) on both peers together (time_pair: decodings
    interleaved in blocks of --block-steps), prunert first in even rounds and ORT-genai first in odd ones. Each round
    of a precision runs in a fresh process (one_round) that opens both peers in that round's order: in one process a
    session opened later measured 3-6% faster per decode step than one opened earlier on the same graph (four
    sessions of the int4 decoder, 2 threads, three runs), and memory one peer freed (huge pages included,
    prunert.runtime.huge_pages) would be the next one's. -> runs, noise probes, and what each peer runs (graph())."""
    graphs: dict = {}
    runs, probes = [], [speed_probe()]
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as work:
        for round_ in range(args.rounds):
            order = PEERS if round_ % 2 == 0 else PEERS[::-1]
            for precision in args.precisions:
                names = [n for n in order if (n, precision) in keys]
                spec = {**base, "round": round_, "precision": precision, "order": names, "graphs": not graphs.keys() >= {f"{n} {precision}" for n in names},
                        "prompts": {str(c): ids.tolist() for c, ids in prompts.items()}, "steps": args.steps, "block_steps": args.block_steps}
                path = Path(work) / "round.json"
                path.write_text(json.dumps(spec))
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-round", str(path)], check=True)
                out = json.loads(path.read_text())
                graphs = {**out["graphs"], **graphs}
                for run in out["runs"]:
                    runs.append(run)
                    log(f"round {round_ + 1}/{args.rounds} {run['peer']:9} {precision} C={run['context']}: prefill {run['prefill_s']:.3f} s, "
                        f"decode {run['decode_tok_s']:.2f} tok/s")
            probes.append(speed_probe())
            log(f"round {round_ + 1}: noise probe {probes[-1]:.1f} ms")
    return runs, probes, graphs


def one_round(path: Path) -> int:
    """A child process of measure(): one round of one precision, as the file at `path` says; its runs (and, asked,
    each peer's graph()) written back to it."""
    spec = json.loads(path.read_text())
    open_peer, prompts = round_inputs(spec)
    peers, graphs, runs = {}, {}, []
    for name in spec["order"]:
        peers[name] = open_peer(name, spec["precision"])
        if spec["graphs"]:
            graphs[f"{name} {spec['precision']}"] = peers[name].graph()
        time_one(peers[name], prompts[max(prompts)], 2)  # warm-up at the largest context
    for context, ids in prompts.items():
        for name, run in time_pair(peers, ids, spec["steps"], spec["block_steps"]).items():
            runs.append({"round": spec["round"], "peer": name, "precision": spec["precision"], "context": context, **run})
    path.write_text(json.dumps({"runs": runs, "graphs": graphs}, default=float))
    return 0


def round_inputs(spec: dict) -> tuple:
    """A child's spec (measure, op_profile) -> its peer opener and prompts (context -> ids)."""
    from prunert.config import RuntimeConfig

    open_peer = peer_opener(spec["threads"], Path(spec["artifact"]), spec["builds"], RuntimeConfig(**spec["runtime"]))
    return open_peer, {int(c): np.asarray(ids, np.int64) for c, ids in spec["prompts"].items()}


def op_profile(base: dict, keys: list[tuple[str, str]], prompts: dict, args: argparse.Namespace) -> dict:
    """--op-profile: per precision, a child process profiles both peers at the first and last context (bench/peers_ops.py)
    -> precision -> peer -> context -> step_ms and ops_ms."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-ops-") as work:
        for precision in args.precisions:
            path = Path(work) / "ops.json"
            ends = {str(c): prompts[c].tolist() for c in (args.contexts[0], args.contexts[-1])}
            path.write_text(json.dumps({**base, "precision": precision, "order": [n for n in PEERS if (n, precision) in keys],
                                        "prompts": ends, "steps": args.steps}))
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--op-profile-round", str(path)], check=True)
            out[precision] = json.loads(path.read_text())
            log(f"op profile {precision}: done")
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """peer -> precision -> context -> decode tok/s and prefill s (median, min, max over rounds), the tokens of round 1."""
    out: dict = {}
    for run in runs:
        cell = out.setdefault(run["peer"], {}).setdefault(run["precision"], {}).setdefault(str(run["context"]), {"runs": []})
        cell["runs"].append(run)
    for precisions in out.values():
        for contexts in precisions.values():
            for context, cell in contexts.items():
                rs = cell.pop("runs")
                contexts[context] = {"decode_tok_s": spread([r["decode_tok_s"] for r in rs]),
                                     "prefill_s": spread([r["prefill_s"] for r in rs]), "tokens": rs[0]["tokens"]}
    return out


# ---- 3. report --------------------------------------------------------------------------------
def paired_ratios(runs: list[dict], precision: str, context: int) -> list[float]:
    """prunert / ORT-genai decode tok/s of each round at one cell (the two were timed together, time_pair)."""
    cell = {(r["round"], r["peer"]): r["decode_tok_s"] for r in runs if (r["precision"], r["context"]) == (precision, context)}
    return [cell[(n, "prunert")] / cell[(n, "ort-genai")] for n, peer in sorted(cell) if peer == "prunert" and (n, "ort-genai") in cell]


def verdict(results: dict, runs: list[dict], precisions: list[str], contexts: list[int]) -> dict:
    """The issue's 'Decode' line on medians: prunert >= ORT-genai at every context, and its slowdown from the smallest
    to the largest context no worse. A precision prunert cannot run is reported, not judged. Not judged:
    paired_median_ratio, the median of each round's own ratio; added_ms_per_step, what the longer context adds to each
    peer's median step (ms): the cost of reading the KV cache, apart from the fixed cost of the weights."""
    out = {}
    for precision in precisions:
        if precision not in results.get("prunert", {}) or precision not in results.get("ort-genai", {}):
            out[precision] = {"judged": False}
            continue
        med = {peer: {c: results[peer][precision][str(c)]["decode_tok_s"]["median"] for c in contexts} for peer in PEERS}
        ratio = {str(c): med["prunert"][c] / med["ort-genai"][c] for c in contexts}
        slow = {peer: med[peer][contexts[0]] / med[peer][contexts[-1]] for peer in PEERS}
        added = {peer: 1000 / med[peer][contexts[-1]] - 1000 / med[peer][contexts[0]] for peer in PEERS}
        paired = {str(c): statistics.median(paired_ratios(runs, precision, c)) for c in contexts}
        out[precision] = {"judged": True, "prunert_over_genai": ratio, "paired_median_ratio": paired, "slowdown_first_to_last": slow,
                          "added_ms_per_step": added,
                          "decode_at_least_genai": all(r >= 1 for r in ratio.values()), "slowdown_no_worse": slow["prunert"] <= slow["ort-genai"]}
    return out


def agreement(results: dict, precisions: list[str], contexts: list[int]) -> dict:
    """How many greedy tokens the two peers share before their first difference (same weights: a sanity check)."""
    out = {}
    for precision in precisions:
        if all(precision in results.get(peer, {}) for peer in PEERS):
            out[precision] = {}
            for c in contexts:
                a, b = (results[peer][precision][str(c)]["tokens"] for peer in PEERS)
                out[precision][str(c)] = {"same_prefix": next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)), "of": len(a)}
    return out


def table(report: dict) -> str:
    results, precisions, contexts = report["results"], report["precisions"], report["contexts"]
    columns = [(peer, p) for p in precisions for peer in PEERS]
    bw = report["bandwidth"]["gb_s"]
    head = "| | " + " | ".join(f"{peer} {p}" for peer, p in columns) + f" | bandwidth floor ({bw:.1f} GB/s) |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]

    def cell(peer: str, p: str, c: int, key: str, fmt: str) -> str:
        if p not in results.get(peer, {}):
            return "not available"  # why: report["unavailable"], printed under the table
        s = results[peer][p][str(c)][key]
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"

    for c in contexts:
        floor = " · ".join(f"{p} {report['floor'][p][str(c)]['tok_s']:.1f}" for p in precisions)
        lines.append(f"| decode tok/s, context {c} | " + " | ".join(cell(peer, p, c, "decode_tok_s", "{:.1f}") for peer, p in columns)
                     + f" | {floor} |")
    for c in contexts:
        lines.append(f"| prefill s, {c} tokens | " + " | ".join(cell(peer, p, c, "prefill_s", "{:.3f}") for peer, p in columns) + " | – |")
    return "\n".join(lines)


def genai_builds(args: argparse.Namespace, checkpoint: Path, int4: Int4Settings) -> dict:
    """precision -> ORT-genai's model built from the checkpoint's Llama (cached in --work)."""
    llama = extract_llama(checkpoint, args.work / f"llama-{checkpoint.name}")
    builds = {}
    for precision in args.precisions:
        settings = int4 if precision == "int4" else None
        out = args.work / f"genai-{checkpoint.name}-{precision}-{settings_key(settings)}"
        model_dir, seconds = build_genai(llama, out, precision, int4, log)
        builds[precision] = {"dir": str(model_dir), "build_s": seconds, "int4": asdict(settings) if settings else None}
    return builds


def peer_opener(threads: int, artifact: Path, builds: dict, runtime):
    """(peer, precision) -> a freshly opened peer (PrunertPeer or GenaiPeer; graph() says what it runs)."""
    from prunert.manifest import load_manifest

    capacity = load_manifest(artifact, verify_hashes=False).text.max_sequence  # ORT-genai's KV capacity = prunert's

    def open_peer(name: str, precision: str, genai_options: dict | None = None):
        if name == "ort-genai":  # genai_options: more session options for ORT-genai's session (its profiler, peers_ops)
            return GenaiPeer(Path(builds[precision]["dir"]), threads, {**runtime.session_config(), **(genai_options or {})}, capacity)
        return PrunertPeer(artifact, precision, runtime)

    return open_peer


def print_summary(report: dict) -> None:
    print("\n" + report["table_markdown"] + "\n")
    for label, reason in report["unavailable"].items():
        print(f"{label}: {reason}")
    noise = report["noise_probe"]
    print(f"threads {report['threads']}, spinning {'on' if report['spinning'] else 'off'}; cells: median (min–max) of "
          f"{report['rounds']} rounds, {report['steps']} decode steps each; noise probe {noise['min']:.1f}–{noise['max']:.1f} ms "
          f"(max/min {noise['max_over_min']:.2f}); load average at start {report['machine']['load_avg_at_start']}")
    for precision, v in report["done_when_decode"].items():
        if not v["judged"]:
            print(f"{precision}: not judged ({report['unavailable'].get('prunert ' + precision, 'a peer is missing')})")
            continue
        ratios = ", ".join(f"C={c} {r:.2f}x" for c, r in v["prunert_over_genai"].items())
        ratios += " (paired: " + ", ".join(f"{r:.2f}x" for r in v["paired_median_ratio"].values()) + ")"
        slow = v["slowdown_first_to_last"]
        print(f"{precision}: prunert / ORT-genai decode {ratios}; slowdown {report['contexts'][0]}->{report['contexts'][-1]}: "
              f"prunert {slow['prunert']:.2f}x, ORT-genai {slow['ort-genai']:.2f}x (ms added per step: prunert "
              f"{v['added_ms_per_step']['prunert']:.2f}, ORT-genai {v['added_ms_per_step']['ort-genai']:.2f}); decode >= ORT-genai: "
              f"{v['decode_at_least_genai']}, slowdown no worse: {v['slowdown_no_worse']}")
    if "op_profile_markdown" in report:
        print("\n" + report["op_profile_markdown"] + "\n")
    print(f"greedy agreement (tokens before the first difference, of steps + 1): {json.dumps(report['agreement'])}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one-round"]:  # measure()'s child process
        return one_round(Path(argv[1]))
    if argv[:1] == ["--op-profile-round"]:  # op_profile()'s child process
        spec = json.loads(Path(argv[1]).read_text())
        return peers_ops.child(Path(argv[1]), spec, *round_inputs(spec))
    args, started = parse_args(argv), time.perf_counter()
    from prunert.adapters import resolve_source
    from prunert.config import RuntimeConfig
    from prunert.runtime import Artifact

    environment = {"machine": machine(), "versions": {**versions(), "onnxruntime-genai": genai_version()}}
    checkpoint = resolve_source(f"synthetic:{args.preset}").path
    text_config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    artifact, export = prunert_artifact(args, checkpoint, args.contexts[-1] + args.steps + 3)  # + warm-up, decode step 0
    runtime = RuntimeConfig(threads=args.threads, spinning=args.spin, huge_pages=not args.no_huge_pages)
    unavailable, prunert_int4 = {}, {}
    if "int4" in args.precisions:
        reason, prunert_int4 = int4_variant(artifact, args.block_size)
        if reason:
            unavailable["prunert int4"] = reason
    int4 = int4_settings(prunert_int4, args.block_size)
    builds = genai_builds(args, checkpoint, int4)
    if args.prepare_only:
        log(f"prepared: prunert {artifact}, ORT-genai {[b['dir'] for b in builds.values()]}; unavailable: {unavailable or 'none'}")
        return 0
    keys = [(name, p) for p in args.precisions for name in PEERS if f"{name} {p}" not in unavailable]
    special = Artifact(artifact, verify_hashes=False).special_ids
    prompts = {c: prompt_ids(c, text_config["vocab_size"], special) for c in args.contexts}
    bandwidth = bandwidth_probe(args.threads, args.probe_gib)
    base = {"threads": args.threads, "artifact": str(artifact), "builds": builds, "runtime": runtime.record()}
    runs, probes, graphs = measure(base, keys, prompts, args)
    for label, facts in graphs.items():
        log(f"{label}: {facts}")
    bandwidth_after = bandwidth_probe(args.threads, args.probe_gib)
    bw = max(bandwidth["gb_s"], bandwidth_after["gb_s"])
    floor = {p: {str(c): {**(b := bytes_per_step(text_config, p, int4, c)), "tok_s": bw * 1e9 / b["total"]} for c in args.contexts}
             for p in args.precisions}
    results = summarize(runs)
    report = {"statement": STATEMENT, "preset": args.preset, "checkpoint": str(checkpoint), "artifact": str(artifact), "export": export,
              "threads": args.threads, "spinning": args.spin, "runtime": runtime.record(), "precisions": args.precisions,
              "contexts": args.contexts, "steps": args.steps, "block_steps": args.block_steps, "rounds": args.rounds, **environment, "graphs": graphs,
              "genai_builds": builds, "prunert_int4": prunert_int4, "unavailable": unavailable,
              "bandwidth": {"gb_s": bw, "before": bandwidth, "after": bandwidth_after}, "floor": floor,
              "noise_probe": {"ms": probes, **spread(probes), "max_over_min": max(probes) / min(probes)},
              "results": results, "agreement": agreement(results, args.precisions, args.contexts),
              "done_when_decode": verdict(results, runs, args.precisions, args.contexts), "runs": runs}
    report["table_markdown"] = table(report)
    if args.op_profile:
        report["op_profile"] = op_profile(base, keys, prompts, args)
        report["op_profile_markdown"] = peers_ops.ops_table(report["op_profile"], args.contexts)
    print_summary(report)
    report.update(peak_rss_mb=peak_rss_mb(), total_wall_s=time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
