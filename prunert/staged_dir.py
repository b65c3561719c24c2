"""A directory written beside its target and renamed into place (stdlib only): synthetic checkpoints and
held-out question sets. A crash leaves nothing at the target."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from prunert.errors import ConfigError


def publish_directory(out_dir: Path, write_files: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """write_files(tmp_dir) beside `out_dir`, then rename it into place; an existing non-empty `out_dir` is an
    error unless `overwrite` (the caller decides what may be overwritten), then it is swapped out and removed."""
    out_dir = Path(out_dir).expanduser().absolute()
    if is_non_empty_dir(out_dir) and not overwrite:
        raise ConfigError(f"output directory {out_dir} already exists and is not empty (use overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the published directory is a normal one
        write_files(tmp_dir)
        _rename_into_place(tmp_dir, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _rename_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished `tmp_dir` to `out_dir` (atomic when `out_dir` is absent or empty)."""
    if overwrite and is_non_empty_dir(out_dir):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
