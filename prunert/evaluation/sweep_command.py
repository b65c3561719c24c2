"""`prunert sweep --model M --methods a,b --budgets 8,16 --data FILE --out DIR`: flags and run (evaluation.sweep)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from prunert.errors import ConfigError

DEFAULT_METHODS = "resprune,uniform,random,cls_attention,visionzip,divprune,cdpruner"
DEFAULT_BUDGETS = "8,16,32,64"


def add_sweep_parser(sub: Any) -> argparse.ArgumentParser:
    from prunert.evaluation.runner import EvalConfig

    defaults = EvalConfig()
    p = sub.add_parser("sweep", help="export every (method, K) of a model, evaluate each on a JSONL set, write a table and plots")
    p.add_argument("--model", required=True, help="synthetic:<preset> or a local Hugging Face checkpoint directory")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated selection methods (default %(default)s)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated K values (default %(default)s)")
    p.add_argument("--data", type=Path, required=True, help="JSONL question set (the `prunert eval` format)")
    p.add_argument("--out", type=Path, required=True,
                   help="sweep folder: artifacts/, sweep.json, sweep.md, accuracy_vs_k.png, accuracy_vs_ttft.png "
                   "(a rerun reuses matching artifacts)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records (default: all)")
    p.add_argument("--batch", type=int, default=defaults.batch, help="records per generate call (default %(default)s)")
    p.add_argument("--threads", type=int, default=defaults.runtime.threads, help="ONNX Runtime intra-op threads (default 0: its own choice)")
    p.add_argument("--backend", default="onnxruntime", help="runtime backend for the evaluation (default %(default)s)")
    return p


def parse_list(flag: str, text: str, convert: Callable[[str], Any]) -> list[Any]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"{flag}: got {text!r}, expected a comma-separated list without empty items")
    try:
        values = [convert(item) for item in items]
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}, expected comma-separated integers") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag}: got {text!r}, expected no repeated items")
    return values


def run_sweep_command(args: argparse.Namespace, source_note: Callable[[Any], str | None]) -> int:
    from prunert.evaluation.data import check_limit, load_records
    from prunert.config import RuntimeConfig
    from prunert.evaluation.runner import EvalConfig
    from prunert.evaluation.sweep import RESULTS_FILE, grid, run_sweep, sweep_table

    cfg = EvalConfig(batch=args.batch, backend=args.backend, runtime=RuntimeConfig(threads=args.threads))
    methods = parse_list("--methods", args.methods, str)
    budgets = parse_list("--budgets", args.budgets, int)
    if any(k < 1 for k in budgets):
        raise ConfigError(f"--budgets: got {args.budgets!r}, expected positive integers")
    check_limit(args.limit)
    points = grid(methods, budgets)
    records = load_records(args.data, args.limit)
    results = run_sweep(args.model, points, records, args.out, cfg)
    print(sweep_table(results))
    note = source_note(results[0].result.source)
    if note:
        print(note)
    print(f"results: {Path(args.out) / RESULTS_FILE}")
    return 0
