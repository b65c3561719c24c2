"""`prunert plan A --device NAME|GB [--batch B] [--max-seq S] [--precision P] [--json]`: the memory plan
(prunert.runtime.memory_plan) printed as tables and a verdict per path. Reads the manifest and file sizes only."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prunert.errors import ConfigError

ONE_LINE = 100  # characters of a component's `how` shown in the table (--json has it whole)


def add_plan_parser(sub: Any) -> argparse.ArgumentParser:
    from prunert.config import PRECISIONS
    from prunert.runtime.memory_plan import devices

    p = sub.add_parser("plan", help="the memory an artifact needs on a device at batch B and sequence S, and whether it fits "
                       "(reads the manifest and file sizes only)")
    p.add_argument("artifact", type=Path, help="artifact directory")
    p.add_argument("--device", required=True, help=f"{' | '.join(devices())} (prunert/data/devices.json, with sources), "
                   "or a memory size in GiB, e.g. 12.5")
    p.add_argument("--batch", default="1", help="images (prompts) per generate call (default %(default)s)")
    p.add_argument("--max-seq", help="prompt with its visual tokens + generated tokens (default: the artifact's max_sequence)")
    p.add_argument("--precision", default="fp32", help=f"{' | '.join(PRECISIONS)}, or per graph role: vision=fp16,decoder=int4 "
                   "(a variant the artifact lacks is estimated; default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)
    return p


def _count(flag: str, text: str | None) -> int | None:
    """--batch / --max-seq: an integer >= 1 (one error line, not argparse's usage)."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}, expected an integer >= 1") from None
    if value < 1:
        raise ConfigError(f"{flag}: got {value}, expected an integer >= 1")
    return value


def run_plan(args: argparse.Namespace) -> int:
    from prunert.config import GraphPrecisions
    from prunert.manifest import load_manifest
    from prunert.runtime.memory_plan import PlanConfig, plan, resolve_device

    device = resolve_device(args.device)
    config = PlanConfig(batch=_count("--batch", args.batch), max_seq=_count("--max-seq", args.max_seq),
                        precisions=GraphPrecisions.parse(args.precision))
    manifest = load_manifest(args.artifact, verify_hashes=False)
    result = plan(Path(args.artifact), manifest, config, device)
    print(json.dumps(asdict(result), indent=2) if args.json else plan_text(result, args.artifact, manifest))
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def plan_text(result: Any, artifact: Path, manifest: Any) -> str:
    from prunert.config import GRAPH_NAMES, GRAPH_ROLES, PRECISIONS

    d = result.device
    lines = [f"plan: {artifact} ({manifest.source.family}, {manifest.source.model}) on {d.title}: {d.memory_bytes / (1 << 30):g} GiB "
             f"({d.memory}; source: {d.source})",
             f"batch {result.batch}, max sequence {result.max_seq}, prefill up to {result.prefill} tokens; precision {result.precisions.label}",
             "", "weights per graph and precision, MiB (m: measured from the artifact's files; e: estimated from the fp32 "
             "parameter count, fp32 4 B, fp16/bf16 2 B, int8/fp8 1 B + scales, int4 0.5 B + block scales; -: not for this role)",
             f"  {'graph':<14}" + "".join(f"{p:>12}" for p in PRECISIONS)]
    for graph in sorted(manifest.graphs, key=lambda g: (GRAPH_NAMES.index(GRAPH_ROLES[g]), g)):  # vision first
        cells = {c.precision: c for c in result.weights if c.graph == graph}
        row = "".join(f"{_mib(cells[p].bytes) + (' m' if cells[p].measured else ' e'):>12}" if p in cells else f"{'-':>12}" for p in PRECISIONS)
        lines.append(f"  {graph:<14}{row}")
    for estimate, verdict in zip(result.paths, result.verdicts):
        lines += ["", f"{estimate.path}: MiB, how it is counted"]
        lines += [f"  {c.name:<30}{_mib(c.bytes):>10}  {c.how[:ONE_LINE]}" for c in estimate.components]
        lines.append(f"  {'total':<30}{_mib(estimate.total):>10}  of {_mib(verdict.usable)} usable")
        if verdict.fits:
            lines.append(f"  verdict: fits ({estimate.total / verdict.usable:.0%} of the usable memory)")
        else:
            lines.append(f"  verdict: does not fit ({_mib(estimate.total - verdict.usable)} MiB over); any one of: " + "; ".join(verdict.changes))
    lines += ["", *(f"note: {note}" for note in result.notes)]
    return "\n".join(lines)
