"""A local lmms-eval task over a prunert eval JSONL (no lmms-eval needed to write it, no download to run it).

    python -m prunert.integrations.lmms_eval_tasks --data questions.jsonl --out TASKDIR [--task prunert_shapes]
    lmms-eval eval --model prunert --model_args artifact=DIR --tasks prunert_shapes --include_path TASKDIR

`write_task` checks every record as `prunert eval` does (prunert.evaluation.load_records: a bad line is one error
naming it) and writes TASKDIR/<task>.jsonl (image paths made absolute, `answers` always a list, so lmms-eval's
`dataset_path: json` loader reads it from anywhere) and TASKDIR/<task>.yaml, which includes the shipped settings
(shapes/_default_template_yaml: greedy, 8 new tokens, exact match after VQA-style normalisation).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from prunert.errors import ConfigError
from prunert.evaluation.data import EvalRecord, load_records

TEMPLATE = Path(__file__).resolve().parent / "shapes" / "_default_template_yaml"
DEFAULT_TASK = "prunert_shapes"
METRIC = "exact_match"  # the template's one metric
_TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def write_task(data: str | os.PathLike[str], out_dir: str | os.PathLike[str], task: str = DEFAULT_TASK,
               limit: int | None = None, overwrite: bool = False) -> Path:
    """TASKDIR/<task>.yaml and TASKDIR/<task>.jsonl for the records of `data` (the first `limit`); returns the
    YAML's path. Existing files of those names are refused unless `overwrite`."""
    if not _TASK_NAME.fullmatch(task):
        raise ConfigError(f"--task {task!r}: expected a name of letters, digits and underscores, starting with a letter")
    records = load_records(data, limit)
    several = next((record for record in records if record.more_images), None)
    if several is not None:  # the shipped task's doc_to_visual reads one "image"
        raise ConfigError(f"{several.where}: 'images' holds {len(several.images)} images; the lmms-eval task takes one image per "
                          "record (use `prunert eval` for records of several images)")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is not a directory")
    yaml_path, jsonl_path = out / f"{task}.yaml", out / f"{task}.jsonl"
    for path in (yaml_path, jsonl_path):
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ConfigError(f"--out {out}: {path.name} already exists (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    _write(jsonl_path, "".join(json.dumps(_row(record)) + "\n" for record in records))
    _write(yaml_path, task_yaml(task, jsonl_path))
    return yaml_path


def task_yaml(task: str, jsonl: Path) -> str:
    """The task's YAML: the shipped settings, this task's name and its records (strings JSON-quoted, valid YAML)."""
    return "\n".join([
        f"task: {json.dumps(task)}",
        f"include: {json.dumps(str(TEMPLATE))}",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(jsonl))}",
        "",
    ])


def _row(record: EvalRecord) -> dict[str, object]:
    return {"image": str(record.image.absolute()), "question": record.question, "answer": record.answers[0],
            "answers": list(record.answers), "category": record.category or "", "line": record.line}


def _write(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a failed write leaves no half file."""
    handle, stage = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(stage, path)
    except BaseException:
        Path(stage).unlink(missing_ok=True)
        raise
