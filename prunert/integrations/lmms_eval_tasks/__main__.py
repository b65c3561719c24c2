"""`python -m prunert.integrations.lmms_eval_tasks --data questions.jsonl --out TASKDIR`: write a local lmms-eval task."""

from __future__ import annotations

import argparse
import sys

from prunert.errors import report_errors
from prunert.integrations.lmms_eval_tasks import DEFAULT_TASK, write_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunert.integrations.lmms_eval_tasks",
                                     description="Write an lmms-eval task (YAML + JSONL) over a prunert eval JSONL.")
    parser.add_argument("--data", required=True, help="JSONL of image/question/answer records (prunert eval's format)")
    parser.add_argument("--out", required=True, help="directory for <task>.yaml and <task>.jsonl (lmms-eval's --include_path)")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK})")
    parser.add_argument("--limit", type=int, help="only the first N records")
    parser.add_argument("--overwrite", action="store_true", help="replace <task>.yaml / <task>.jsonl if they exist")

    def command() -> int:
        args = parser.parse_args(argv)
        path = write_task(args.data, args.out, args.task, args.limit, args.overwrite)
        print(f"wrote {path}\nrun: lmms-eval eval --model prunert --model_args artifact=DIR --tasks {args.task} "
              f"--include_path {path.parent}")
        return 0

    return report_errors(command)


if __name__ == "__main__":
    sys.exit(main())
