"""Putting a finished artifact in place, and only ever replacing an artifact (standard library only).

Every folder prunert builds beside or inside an artifact is a `Staging` root: `owner.json` (pid, process
start time, host) and the payload folder the files go to. Exports stage in `.NAME.partial-*`, the
`--overwrite` swap parks the old artifact in `.NAME.old-*`, ArtifactUpdate stages in `ARTIFACT/.staging/*`.
A root whose owner is provably gone (its pid is dead, or now names a younger process) is stale: the next
write removes it and `prunert inspect` reports every leftover.

Publishing holds `.NAME.lock` beside the target (fcntl.flock) and renames without replacing (renameat2
RENAME_NOREPLACE where the kernel has it): of two exports to one new path the second fails, never silently
replaces the first. `--overwrite` replaces only a prunert artifact, through a journaled swap: `.NAME.swap`
names the old and new folders before the two renames, so a kill between them is undone by the next command
that touches the path (`recover_swap`, called by export and by `load_manifest`), with a note on stderr.
Folders are made with the umask's normal mode (not mkdtemp's 0700): a service user can read the artifact.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import secrets
import shutil
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from prunert.errors import ArtifactError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the no-replace rename still guards a new target
    fcntl = None

OWNER_FILE = "owner.json"
PAYLOAD_DIR = "payload"
STAGING_DIR = ".staging"  # ARTIFACT/.staging/: ArtifactUpdate's roots
PARTIAL, OLD = "partial", "old"  # .NAME.partial-*: an export being built; .NAME.old-*: a replaced artifact
_RENAME_NOREPLACE = 1


@dataclass(frozen=True)
class Owner:
    """The process that made a staging root. `start` is the kernel's start time of that pid ("" where the
    platform does not say), which tells a live owner from a younger process that reused its pid."""

    pid: int
    start: str
    host: str

    @classmethod
    def current(cls) -> "Owner":
        return cls(pid=os.getpid(), start=_process_start(os.getpid()), host=socket.gethostname())

    def gone(self) -> bool:
        """Provably not running: same host, and the pid is dead or belongs to another (younger) process."""
        if self.host != socket.gethostname():
            return False  # a shared filesystem: another machine's process cannot be checked from here
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        now = _process_start(self.pid)
        return bool(self.start and now and now != self.start)


@dataclass(frozen=True)
class Staging:
    """A root folder `root/` holding `owner.json` and the `payload/` folder that is renamed into place."""

    root: Path

    @property
    def payload(self) -> Path:
        return self.root / PAYLOAD_DIR

    @classmethod
    def create(cls, parent: Path, prefix: str, payload: bool = True) -> "Staging":
        """A new root `parent/prefix<random>` (mode 0777 & ~umask, unlike mkdtemp's 0700) with its owner record."""
        root = Path(parent) / f"{prefix}{secrets.token_hex(8)}"
        root.mkdir()  # 64 random bits: a clash is an error, never a shared folder
        staging = cls(root)
        try:
            write_atomically(root / OWNER_FILE, json.dumps(asdict(Owner.current())) + "\n")
            if payload:
                staging.payload.mkdir()
        except BaseException:
            staging.remove()
            raise
        return staging

    def owner(self) -> Owner | None:
        """The owner record; None when it is missing or unreadable (then nothing about the root is provable)."""
        try:
            data = json.loads((self.root / OWNER_FILE).read_text())
            return Owner(pid=int(data["pid"]), start=str(data["start"]), host=str(data["host"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def state(self) -> str:
        """"stale" (owner gone), "in use" (owner running) or "unknown owner" (no owner record)."""
        owner = self.owner()
        return "unknown owner" if owner is None else "stale" if owner.gone() else "in use"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class Leftover:
    path: Path
    state: str  # Staging.state(), or "swap journal"

    def line(self) -> str:
        hint = {"stale": "removed by the next write", "in use": "a running prunert owns it",
                "unknown owner": "no owner record: remove it by hand if no prunert is running",
                "swap journal": "an --overwrite swap running, or cut short: the next command with write access finishes it"}[self.state]
        return f"leftover {self.path} ({self.state}: {hint})"


# ------------------------------------------------------------------------------------ what may be replaced


def refuse_unless_artifact(path: Path, label: str) -> None:
    """--overwrite replaces only a prunert artifact: a real directory (no symlink) whose manifest.json parses."""
    from prunert.manifest import MANIFEST_NAME, load_manifest

    path = Path(path)
    why = None
    if path.is_symlink():
        why = "a symbolic link"
    elif not path.is_dir():
        why = "a file, not a directory"
    elif (path / MANIFEST_NAME).is_symlink() or not (path / MANIFEST_NAME).is_file():
        why = f"no {MANIFEST_NAME} file"
    else:
        try:
            load_manifest(path, verify_hashes=False)
        except ArtifactError as exc:
            why = str(exc).removeprefix(f"artifact '{path}': ")
    if why is not None:
        raise ArtifactError(f"{label} '{path}': is not a prunert artifact ({why}); --overwrite replaces only an "
                            "artifact directory, nothing was changed: remove it yourself or choose another path")


def refuse_unless_replaceable_file(path: Path, label: str, keys: frozenset[str], what: str) -> None:
    """An existing `path` may be replaced only if it is a regular file holding a JSON object with `keys` (`what`)."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        why = "a symbolic link" if path.is_symlink() else "a directory"
    elif not path.exists():
        return
    else:
        data = None
        with contextlib.suppress(OSError, ValueError, RecursionError):
            data = json.loads(path.read_text())
        why = None if isinstance(data, dict) and keys <= set(data) else f"a file that is not {what}"
    if why is not None:
        raise ArtifactError(f"{label} '{path}': exists and is {why}; only {what} is replaced there, "
                            "nothing was changed: choose another path")


def replace_file(path: Path, write: Callable[[Path], None], label: str, keys: frozenset[str], what: str) -> None:
    """write(temp) beside `path`, then rename it over `path` atomically (existing: only `what`, see above)."""
    path = Path(path)
    refuse_unless_replaceable_file(path, label, keys, what)
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        write(temp)
        refuse_unless_replaceable_file(path, label, keys, what)  # a directory or link may have appeared meanwhile
        os.replace(temp, path)
    except OSError as exc:
        raise ArtifactError(f"{label} '{path}': cannot write it ({exc.strerror or exc})") from None
    finally:
        temp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ publishing


def publish(staging: Staging, target: Path, overwrite: bool, label: str = "--out") -> None:
    """Move staging.payload to `target`: exclusively when `target` is new, by a journaled swap when it is an
    artifact and `overwrite`. The old artifact is removed after the lock is released."""
    target = _absolute(target)
    raced = ArtifactError(f"{label} '{target}': created by another process while this one ran; "
                          "nothing was replaced: choose another path or pass --overwrite")
    with target_lock(target):
        recover_swap(target, locked=True)
        old = None
        if not os.path.lexists(target):
            try:
                rename_noreplace(staging.payload, target)
            except FileExistsError:
                raise raced from None
        elif not overwrite:
            raise raced
        else:
            refuse_unless_artifact(target, label)
            old = _swap(staging, target)
    if old is not None:
        old.remove()


def _swap(staging: Staging, target: Path) -> Staging:
    """target -> .NAME.old-*/payload, staging.payload -> target, with `.NAME.swap` naming both meanwhile."""
    old = Staging.create(target.parent, f".{target.name}.{OLD}-", payload=False)
    journal = _journal_path(target)
    try:
        write_atomically(journal, json.dumps({"old": _relative(old.payload, target), "new": _relative(staging.payload, target)}) + "\n")
        os.rename(target, old.payload)
        try:
            rename_noreplace(staging.payload, target)
        except BaseException:
            os.rename(old.payload, target)  # put the old artifact back before anything else
            raise
        journal.unlink()
    except BaseException:
        if os.path.lexists(target) and not old.payload.exists():
            journal.unlink(missing_ok=True)
            old.remove()
        raise
    return old


def recover_swap(target: Path, locked: bool = False) -> str | None:
    """Finish the `--overwrite` swap `.NAME.swap` records, if any: a swap that completed keeps the new artifact,
    one cut short puts the old artifact back. Says what it did on stderr and returns it; None: nothing to do.
    Cheap when there is no journal (one lstat); a directory it may not write is left as it is, with a note."""
    target = _absolute(target)
    journal = _journal_path(target)
    if not os.path.lexists(journal):
        return None
    try:
        with contextlib.nullcontext() if locked else target_lock(target):
            if not os.path.lexists(journal):
                return None  # another process recovered it while this one waited
            done = _recover(target, journal)
            clean_stale(target)
    except OSError as exc:
        done = f"could not recover an interrupted --overwrite swap ({exc.strerror or exc}); run prunert again with write access"
    print(f"prunert: note: '{target}': {done}", file=sys.stderr)
    return done


def _recover(target: Path, journal: Path) -> str:
    try:
        record = json.loads(journal.read_text())
        old, new = target.parent / record["old"], target.parent / record["new"]
    except (ValueError, TypeError, KeyError):
        return f"unreadable swap journal {journal.name} left as it is; remove it by hand"
    if os.path.lexists(target):
        done = ("an interrupted --overwrite swap had not started: kept the artifact there" if os.path.lexists(new)
                else "an interrupted --overwrite swap had finished: removed the replaced artifact")
    elif os.path.lexists(old):
        os.rename(old, target)
        done = "an interrupted --overwrite swap was undone: the previous artifact is back"
    elif os.path.lexists(new):
        os.rename(new, target)
        done = "an interrupted --overwrite swap was completed: the new artifact is in place"
    else:
        done = "an interrupted --overwrite swap left neither artifact; nothing to restore"
    journal.unlink()
    return done


# ------------------------------------------------------------------------------------ leftovers


def leftovers(target: Path) -> list[Leftover]:
    """Staging roots beside `target` (.NAME.partial-*, .NAME.old-*) and inside it (.staging/*), and a swap journal."""
    target = _absolute(target)
    found = [Leftover(root, Staging(root).state()) for root in _roots(target)]
    journal = _journal_path(target)
    if os.path.lexists(journal):
        found.append(Leftover(journal, "swap journal"))
    return found


def clean_stale(target: Path) -> list[Path]:
    """Remove the staging roots of `target` whose owner is provably gone; a root an unfinished swap journal
    names is kept (recover_swap needs it). Returns what was removed."""
    target = _absolute(target)
    keep: set[Path] = set()
    journal = _journal_path(target)
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        record = json.loads(journal.read_text())
        keep = {(target.parent / record[key]).parent for key in ("old", "new")}
    removed = []
    for root in _roots(target):
        if root not in keep and Staging(root).state() == "stale":
            Staging(root).remove()
            removed.append(root)
    with contextlib.suppress(OSError):
        (target / STAGING_DIR).rmdir()  # only when empty
    return removed


def _roots(target: Path) -> list[Path]:
    beside = []
    with contextlib.suppress(OSError):
        beside = [p for p in target.parent.iterdir() if p.name.startswith((f".{target.name}.{PARTIAL}-", f".{target.name}.{OLD}-"))]
    inside = []
    with contextlib.suppress(OSError):
        if not target.is_symlink():
            inside = list((target / STAGING_DIR).iterdir())
    return sorted(p for p in beside + inside if p.is_dir() and not p.is_symlink())


# ------------------------------------------------------------------------------------ primitives


@contextlib.contextmanager
def target_lock(target: Path, optional: bool = False) -> Iterator[None]:
    """Hold `.NAME.lock` beside `target` (blocking): one publisher, swap, recovery or update per path at a time.
    The lock file is removed on release; a waiter that then holds a removed file's lock tries again.
    optional: where the lock file cannot be made (a read-only parent), run without it."""
    path = _lock_path(_absolute(target))
    held = _HELD.__dict__.setdefault("paths", set())
    if fcntl is None or path in held:  # no flock here, or this thread holds it already (publish -> load_manifest)
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            if not optional:
                raise
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            now = os.stat(path)
            if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass  # removed by the holder we waited for
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    held.add(path)
    try:
        yield
    finally:
        held.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


_HELD = threading.local()  # the lock paths this thread holds: target_lock is re-entrant within a thread


def rename_noreplace(source: Path, target: Path) -> None:
    """os.rename that fails with FileExistsError when `target` exists (os.rename onto an empty directory
    silently replaces it). Atomic via renameat2 on Linux; elsewhere a check, exclusive under target_lock."""
    result = _renameat2(source, target)
    if result == 0:
        return
    if result == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    if result not in (errno.ENOSYS, errno.EINVAL, None):
        raise OSError(result, os.strerror(result), str(source))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _renameat2(source: Path, target: Path) -> int | None:
    """0, an errno, or None where libc has no renameat2."""
    function = _libc_renameat2()
    if function is None:
        return None
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return 0
    return ctypes.get_errno()


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    function = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
            function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
            function.restype = ctypes.c_int
    return function


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` (temp file, fsync, rename): readers see the old file or the new one."""
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temp, "x") as out:  # created with 0666 & ~umask
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _process_start(pid: int) -> str:
    """The start time of `pid` in clock ticks after boot (/proc/PID/stat field 22); "" where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))  # not resolve(): a symlink at `path` stays a symlink


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _journal_path(target: Path) -> Path:
    return target.parent / f".{target.name}.swap"


def _relative(path: Path, target: Path) -> str:
    """`path` as the journal names it: relative to target's folder (either may be given relative to the cwd)."""
    return str(_absolute(path).relative_to(_absolute(target).parent))
