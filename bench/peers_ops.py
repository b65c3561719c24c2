"""Where a decode step's time goes, per op type, on both peers of bench/bench_peers.py (its --op-profile).

Each precision runs in a fresh child process (bench_peers.py --op-profile-round FILE) that opens both peers with ONNX
Runtime's profiler on, prefills each context and decodes --steps steps after it; a step is one decoder `model_run`
event of the profile, and an op's time within it is the sum of its nodes' kernel times. The first two steps after each
prefill are left out (warm-up). The profiler adds a little to every node, alike on both peers: the ratios between
peers and contexts are what this is for, the absolute times are bench_peers' decode table's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import tempfile
from pathlib import Path

WARM_STEPS = 2  # steps after each prefill left out of the averages
SHOWN = ("MatMulNBits", "MatMul", "GroupQueryAttention")  # rows of the table; the rest are summed as "other ops"


@contextlib.contextmanager
def ort_profiling(prefix: str):
    """Every onnxruntime.SessionOptions made inside writes ONNX Runtime's profile under `prefix` (how a prunert runner's
    session is profiled without a profiling setting of its own; this child process only)."""
    import onnxruntime as ort

    plain = ort.SessionOptions

    class Profiled(plain):
        def __init__(self):
            super().__init__()
            self.enable_profiling, self.profile_file_prefix = True, prefix

    ort.SessionOptions = Profiled
    try:
        yield
    finally:
        ort.SessionOptions = plain


def step_ops(events: list[dict], contexts: list[int], steps: int) -> dict:
    """A profile's events -> context -> {"step_ms", "ops_ms": {op type: ms per step}}, over the decode steps of each
    context (its `model_run`s after the prefill's one, warm-up left out)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    if len(runs) != len(contexts) * (steps + 1):
        raise ValueError(f"profile: {len(runs)} model runs, expected {len(contexts)} x (1 prefill + {steps} steps)")
    out = {}
    for index, context in enumerate(contexts):
        chosen = runs[index * (steps + 1) + 1 + WARM_STEPS : (index + 1) * (steps + 1)]
        ops: dict[str, float] = {}
        for run in chosen:
            for node in nodes:
                if run["ts"] <= node["ts"] < run["ts"] + run["dur"]:
                    op = node["args"]["op_name"]
                    ops[op] = ops.get(op, 0.0) + node["dur"] / 1000 / len(chosen)  # us -> ms per step
        out[str(context)] = {"step_ms": statistics.fmean(r["dur"] / 1000 for r in chosen), "ops_ms": ops}
    return out


def profile_peer(open_peer, name: str, precision: str, prompts: dict, steps: int, work: Path) -> dict:
    """One peer opened with the profiler on, each prompt prefilled and `steps` decoder calls run after it -> step_ops."""
    prefix = str(work / f"profile-{name}")
    with ort_profiling(prefix):  # prunert's session; ORT-genai's takes the profiler as a session option
        peer = open_peer(name, precision, {"enable_profiling": prefix})
    for ids in prompts.values():
        peer.prefill(ids)
        peer.decode(steps)  # the prefill's model run, then `steps` decoder calls
    del peer
    gc.collect()  # an ONNX Runtime session writes its profile when it is freed
    (path,) = work.glob(f"profile-{name}*.json")
    return step_ops(json.loads(path.read_text()), [int(c) for c in prompts], steps)


def child(path: Path, spec: dict, open_peer, prompts: dict) -> int:
    """bench_peers' --op-profile-round: both peers of one precision, as `spec` (read from `path`) says, opened by
    `open_peer`; results written back to `path`."""
    with tempfile.TemporaryDirectory(prefix="peers-ops-") as work:
        out = {name: profile_peer(open_peer, name, spec["precision"], prompts, spec["steps"], Path(work)) for name in spec["order"]}
    path.write_text(json.dumps(out))
    return 0


def ops_table(profile: dict, contexts: list[int]) -> str:
    """precision -> peer -> step_ops, as markdown: ms per step of each shown op type and of the rest, per context."""
    columns = [(p, peer, str(c)) for p, peers in profile.items() for peer in peers for c in (contexts[0], contexts[-1])]
    lines = ["| ms per decode step | " + " | ".join(f"{peer} {p} C={c}" for p, peer, c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for op in (*SHOWN, "other ops", "whole step"):
        cells = []
        for p, peer, c in columns:
            cell = profile[p][peer][c]
            value = (cell["step_ms"] if op == "whole step" else
                     sum(v for k, v in cell["ops_ms"].items() if k not in SHOWN) if op == "other ops" else cell["ops_ms"].get(op))
            cells.append("–" if value is None else f"{value:.2f}")
        if any(x != "–" for x in cells):
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
