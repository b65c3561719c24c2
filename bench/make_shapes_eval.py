"""Write a held-out shapes question set (questions.jsonl + images/) for `prunert eval` and lmms-eval.

A thin wrapper over prunert.shapes.dataset.write_eval_set: `count` questions drawn from the scene distribution
of issue 11 (four templates, evenly), a function of (seed, count), disjoint from the training stream.

    python bench/make_shapes_eval.py --out data/shapes-eval --count 1000 --seed 0
    prunert eval ART --data data/shapes-eval/questions.jsonl

Prints the path of questions.jsonl. Bad input: one line `prunert: error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make_shapes_eval.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to create (questions.jsonl + images/)")
    parser.add_argument("--count", type=int, default=1000, help="questions (and images) to write (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="held-out set seed (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds a shapes set written here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from prunert.config import check_seed
    from prunert.errors import report_errors
    from prunert.shapes.dataset import write_eval_set

    def command() -> int:
        check_seed("--seed", args.seed)
        print(write_eval_set(args.out, args.count, args.seed, overwrite=args.overwrite))
        return 0

    return report_errors(command)


if __name__ == "__main__":
    sys.exit(main())
