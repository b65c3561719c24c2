"""Safe writes (prunert.artifact_publish): --overwrite replaces only an artifact, two publishers to one new path
cannot both win, a kill inside the --overwrite swap is recovered by the next command, stale staging folders are
cleaned and reported, and artifact folders get the umask's mode."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from prunert import artifact_publish as publish_mod, cli
from prunert.artifact_publish import OLD, PARTIAL, Owner, Staging, clean_stale, leftovers, publish, rename_noreplace
from prunert.config import BudgetConfig
from prunert.errors import ArtifactError
from prunert.export import pipeline as export_pipeline
from prunert.manifest import MANIFEST_NAME, load_manifest

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
TINY = "synthetic:llava-tiny"


def _snapshot(root: Path) -> dict:
    """Every path under root (root included): symlink target, or file bytes and mode, or dir mode."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
        key = str(path.relative_to(root.parent))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_file():
            out[key] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        else:
            out[key] = ("dir", stat.S_IMODE(path.stat().st_mode))
    return out


def _stage(target: Path, artifact: Path, who: str) -> Staging:
    """A staged copy of `artifact` beside `target`, as export leaves it before publishing; who.txt tells copies apart."""
    staging = Staging.create(target.parent, f".{target.name}.{PARTIAL}-")
    shutil.copytree(artifact, staging.payload, dirs_exist_ok=True)
    (staging.payload / "who.txt").write_text(who)
    return staging


def _beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _fake_write_artifact(monkeypatch, artifact: Path, before=lambda: None) -> None:
    """export_artifact's build step replaced by a copy of `artifact` (the real export is tested elsewhere)."""

    def write(staging, source, adapter, budget, cfg, log):
        before()
        shutil.copytree(artifact, staging, dirs_exist_ok=True)
        return load_manifest(staging, verify_hashes=False)

    monkeypatch.setattr(export_pipeline, "_write_artifact", write)


# ---------------------------------------------------------------------------------------- --overwrite


def _not_an_artifact(kind: str, tmp_path: Path, artifact: Path) -> Path:
    out = tmp_path / "out"
    if kind == "user-dir":
        (out / "sub").mkdir(parents=True)
        (out / "thesis.tex").write_text("years of work")
        (out / "sub" / "data.bin").write_bytes(b"\0\1\2")
    elif kind == "empty-dir":
        out.mkdir()
    elif kind == "file":
        out.write_text("a regular file")
    elif kind == "symlink-to-artifact":
        shutil.copytree(artifact, tmp_path / "real")
        out.symlink_to(tmp_path / "real", target_is_directory=True)
    elif kind == "dangling-symlink":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "bad-manifest":
        shutil.copytree(artifact, out)
        (out / MANIFEST_NAME).write_text('{"schema_version": 3, "files": {}}')
    return out


@pytest.mark.parametrize("kind", ["user-dir", "empty-dir", "file", "symlink-to-artifact", "dangling-symlink", "bad-manifest"])
def test_overwrite_refuses_what_is_not_an_artifact(capsys, error_line, tmp_path: Path, tiny_artifact: Path, kind: str) -> None:
    out = _not_an_artifact(kind, tmp_path, tiny_artifact)
    before = _snapshot(tmp_path)
    code = cli.main(["export", "--model", TINY, "--budget", "8", "--out", str(out), "--overwrite"])
    assert code == 2
    error_line(capsys.readouterr().err, f"'{out}'", "not a prunert artifact", "nothing was changed")
    assert _snapshot(tmp_path) == before  # byte-identical, and nothing staged beside it


def test_publish_refuses_a_non_artifact_that_appeared_while_exporting(tmp_path: Path, tiny_artifact: Path) -> None:
    target = tmp_path / "out"
    staging = _stage(target, tiny_artifact, "new")
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    before = _snapshot(target)
    with pytest.raises(ArtifactError, match="not a prunert artifact"):
        publish(staging, target, overwrite=True)
    assert _snapshot(target) == before and (staging.payload / "who.txt").read_text() == "new"


def test_overwrite_replaces_an_artifact(tmp_path: Path, tiny_artifact: Path) -> None:
    target = tmp_path / "out"
    for who, overwrite in (("old", False), ("new", True)):
        staging = _stage(target, tiny_artifact, who)
        publish(staging, target, overwrite=overwrite)
        staging.remove()  # what export does after publishing: the emptied root
    assert (target / "who.txt").read_text() == "new" and _beside(target) == []
    load_manifest(target)


def test_overwrite_replaces_an_artifact_given_by_a_relative_path(tmp_path: Path, tiny_artifact: Path, monkeypatch) -> None:
    """`export --out build/x --overwrite` (examples/quickstart.sh): the swap journal names the staging folder
    relative to the target's folder although both paths came relative to the cwd (a ValueError before)."""
    monkeypatch.chdir(tmp_path)
    target = Path("build") / "out"
    Path("build").mkdir()
    for who, overwrite in (("old", False), ("new", True)):
        staging = _stage(target, tiny_artifact, who)
        publish(staging, target, overwrite=overwrite)
        staging.remove()
    assert (target / "who.txt").read_text() == "new" and _beside(tmp_path / target) == []


# ---------------------------------------------------------------------------------------- exclusive publish


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_rename_never_replaces_an_empty_directory(tmp_path: Path, monkeypatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr(publish_mod, "_renameat2", lambda source, target: None)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    (tmp_path / "dst").mkdir()  # os.rename would silently replace it
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert list((tmp_path / "dst").iterdir()) == [] and (tmp_path / "src" / "f").is_file()
    rename_noreplace(tmp_path / "src", tmp_path / "new")
    assert (tmp_path / "new" / "f").read_text() == "x"


def test_publish_to_a_path_that_became_an_empty_directory_fails(tmp_path: Path, tiny_artifact: Path) -> None:
    target = tmp_path / "out"
    staging = _stage(target, tiny_artifact, "mine")
    target.mkdir()
    with pytest.raises(ArtifactError, match="created by another process"):
        publish(staging, target, overwrite=False)
    assert list(target.iterdir()) == []


def test_concurrent_publishes_to_one_new_path_have_one_winner(tmp_path: Path, tiny_artifact: Path) -> None:
    target = tmp_path / "out"
    stagings = [_stage(target, tiny_artifact, f"writer {i}") for i in range(4)]
    start = threading.Barrier(len(stagings))
    results: dict[int, object] = {}

    def writer(i: int) -> None:
        start.wait()
        try:
            publish(stagings[i], target, overwrite=False)
            results[i] = "published"
        except ArtifactError as exc:
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(stagings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, result in results.items() if result == "published"]
    assert len(winners) == 1, results
    assert all("created by another process" in str(results[i]) for i in results if i not in winners)
    assert (target / "who.txt").read_text() == f"writer {winners[0]}"
    load_manifest(target)


def test_export_racing_another_export_fails_instead_of_replacing_it(tmp_path: Path, tiny_artifact: Path, monkeypatch) -> None:
    """The second export finishes while the first is still writing: the first must fail, not replace it."""
    out = tmp_path / "out"
    nested = []

    def other_export_finishes_first() -> None:
        if not nested:
            nested.append(1)
            export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), log=lambda m: None)
            (out / "who.txt").write_text("the other export")

    _fake_write_artifact(monkeypatch, tiny_artifact, other_export_finishes_first)
    with pytest.raises(ArtifactError, match="created by another process"):
        export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), log=lambda m: None)
    assert (out / "who.txt").read_text() == "the other export"
    assert _beside(out) == []


# ---------------------------------------------------------------------------------------- killed swap

KILLED_SWAP = """
import os, shutil, signal, sys
from pathlib import Path
from prunert import artifact_publish as ap
source, target, when = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
staging = ap.Staging.create(target.parent, f".{target.name}.partial-")
shutil.copytree(source, staging.payload, dirs_exist_ok=True)
(staging.payload / "who.txt").write_text("new")
kill = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if when == "before":  # journal written, first rename not done
    os.rename = kill
elif when == "between":  # the old artifact moved away, the new one not yet in place
    ap.rename_noreplace = kill
else:  # both renames done, the journal not yet removed
    unlink = Path.unlink
    Path.unlink = lambda self, *a, **k: kill() if self.name.endswith(".swap") else unlink(self, *a, **k)
assert_no_heavy_modules()
ap.publish(staging, target, overwrite=True)
"""


def _killed_swap(python_without, tmp_path: Path, artifact: Path, when: str) -> Path:
    target = tmp_path / "out"
    shutil.copytree(artifact, target)
    (target / "who.txt").write_text("old")
    result = python_without(KILLED_SWAP, artifact, target, when)
    assert result.returncode == -9, result.stderr  # SIGKILL: no rollback ran
    assert (tmp_path / ".out.swap").is_file()
    return target


@pytest.mark.parametrize("when, who, note", [("before", "old", "had not started"), ("between", "old", "undone"),
                                              ("after", "new", "had finished")])
def test_killed_swap_is_recovered_by_loading(capsys, python_without, tmp_path: Path, tiny_artifact: Path,
                                             when: str, who: str, note: str) -> None:
    target = _killed_swap(python_without, tmp_path, tiny_artifact, when)
    assert target.exists() == (when != "between")
    load_manifest(target)  # verifies every hash of the recovered artifact
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"prunert: note: '{target}'") and note in notes[0]
    assert (target / "who.txt").read_text() == who
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # journal, lock and both folders gone
    load_manifest(target)
    assert capsys.readouterr().err == ""  # said once


def test_killed_swap_is_recovered_by_the_next_export(capsys, python_without, tmp_path: Path, tiny_artifact: Path, monkeypatch) -> None:
    target = _killed_swap(python_without, tmp_path, tiny_artifact, "between")
    _fake_write_artifact(monkeypatch, tiny_artifact)
    export_pipeline.export_artifact(TINY, target, BudgetConfig(budget=8), overwrite=True, log=lambda m: None)
    assert "the previous artifact is back" in capsys.readouterr().err
    assert not (target / "who.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_swap_rolls_back_in_process(tmp_path: Path, tiny_artifact: Path, monkeypatch) -> None:
    """Ctrl-C between the renames (no kill): the old artifact is put back at once, no journal left."""
    target = tmp_path / "out"
    shutil.copytree(tiny_artifact, target)
    (target / "who.txt").write_text("old")
    staging = _stage(target, tiny_artifact, "new")

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish_mod, "rename_noreplace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish(staging, target, overwrite=True)
    staging.remove()
    assert (target / "who.txt").read_text() == "old" and _beside(target) == []


# ---------------------------------------------------------------------------------------- leftovers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _root(parent: Path, prefix: str, owner: Owner | None) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    root = Staging.create(parent, prefix).root
    if owner is None:
        (root / "owner.json").unlink()  # as prunert before owner records left them
    else:
        (root / "owner.json").write_text(json.dumps(asdict(owner)))
    return root


def _owners() -> dict[str, Owner]:
    host = socket.gethostname()
    return {"dead": Owner(_dead_pid(), "", host), "reused": Owner(os.getpid(), "1", host), "live": Owner.current(),
            "other-host": Owner(_dead_pid(), "", "another-machine")}


def test_owner_gone_only_when_provable() -> None:
    owners = _owners()
    assert owners["dead"].gone() and not owners["live"].gone() and not owners["other-host"].gone()
    assert owners["reused"].gone() == bool(owners["live"].start)  # pid reused by a younger process, where /proc tells


def test_stale_roots_are_cleaned_on_the_next_export_and_live_ones_kept(tmp_path: Path, tiny_artifact: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    owners = _owners()
    roots = {kind: _root(tmp_path, f".out.{PARTIAL if i % 2 else OLD}-", owner) for i, (kind, owner) in enumerate(owners.items())}
    roots["legacy"] = _root(tmp_path, f".out.{PARTIAL}-", None)
    _fake_write_artifact(monkeypatch, tiny_artifact)
    logged: list[str] = []
    export_pipeline.export_artifact(TINY, out, BudgetConfig(budget=8), log=logged.append)
    removed = {kind for kind, root in roots.items() if not root.exists()}
    assert removed == ({"dead", "reused"} if owners["live"].start else {"dead"})
    assert all(any(str(roots[kind]) in line for line in logged) for kind in removed)
    assert load_manifest(out) and not (out / ".staging").exists()


def test_artifact_update_cleans_stale_staging_folders(artifact_copy: Path) -> None:
    from prunert.artifact_update import ArtifactUpdate

    owners = _owners()
    dead, live = (_root(artifact_copy / ".staging", "fp16-", owners[kind]) for kind in ("dead", "live"))
    legacy = _root(artifact_copy / ".staging", "int8-", None)
    with ArtifactUpdate(artifact_copy, "engines") as update:
        assert not dead.exists() and live.is_dir() and legacy.is_dir()
        update.commit(lambda m: m)
    assert live.is_dir() and legacy.is_dir() and load_manifest(artifact_copy)


def test_inspect_reports_leftovers_and_keeps_json_the_manifest(capsys, artifact_copy: Path) -> None:
    beside = _root(artifact_copy.parent, f".{artifact_copy.name}.{PARTIAL}-", _owners()["dead"])
    inside = _root(artifact_copy / ".staging", "fp16-", None)
    assert cli.main(["inspect", str(artifact_copy)]) == 0
    table = capsys.readouterr().out
    assert "leftovers" in table and f"{beside} (stale" in table and f"{inside} (unknown owner" in table
    assert cli.main(["inspect", str(artifact_copy), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads((artifact_copy / MANIFEST_NAME).read_text())
    assert str(beside) in captured.err and str(inside) in captured.err and "leftover" not in captured.out
    assert beside.exists() and inside.exists()  # inspect reads, never cleans
    assert {leftover.path for leftover in leftovers(artifact_copy)} == {beside, inside}
    clean_stale(artifact_copy)
    assert not beside.exists() and inside.exists()


# ---------------------------------------------------------------------------------------- modes


def test_exported_artifact_has_the_umask_mode(tiny_artifact: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(tiny_artifact.stat().st_mode) == 0o777 & ~umask  # mkdtemp made it 0700


def test_published_folders_and_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        target = tmp_path / "out"
        staging = Staging.create(tmp_path, f".out.{PARTIAL}-")
        assert stat.S_IMODE(staging.root.stat().st_mode) == stat.S_IMODE(staging.payload.stat().st_mode) == 0o750
        (staging.payload / "who.txt").write_text("new")
        publish(staging, target, overwrite=False)
        staging.remove()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "who.txt").stat().st_mode) == 0o640


# ---------------------------------------------------------------------------------------- parity --out


class _Report:
    """What _parity uses of a ParityReport (the parity run itself is tested in tests/parity)."""

    synthetic, note, verdict, passed = False, "", "PASS", True

    def table(self) -> str:
        return "stage table"

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps({"artifact": "a", "checks": [], "verdict": "PASS"}) + "\n")


@pytest.fixture
def fake_parity(monkeypatch):
    from prunert.parity import reference

    runs = []
    monkeypatch.setattr(reference, "run_parity", lambda *args, **kwargs: runs.append(args) or _Report())
    return runs


def _parity(artifact: Path, *out: str) -> list[str]:
    return ["parity", str(artifact), "--image", str(PHOTO), "--prompt", "<image> what is it?", *out]


@pytest.mark.parametrize("kind", ["dir", "user-file", "symlink", "default-symlink"])
def test_parity_out_never_replaces_what_is_not_a_report(capsys, error_line, fake_parity, tmp_path: Path, artifact_copy: Path, kind: str) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("not a report")
    out = {"dir": tmp_path / "reports", "user-file": precious, "symlink": tmp_path / "link.json",
           "default-symlink": artifact_copy / "parity.json"}[kind]
    if kind == "dir":
        out.mkdir()
    elif kind.endswith("symlink"):
        out.symlink_to(precious)
    before = _snapshot(tmp_path)
    code = cli.main(_parity(artifact_copy) + ([] if kind == "default-symlink" else ["--out", str(out)]))
    assert code == 2
    error_line(capsys.readouterr().err, f"'{out}'", "nothing was changed")
    assert _snapshot(tmp_path) == before and fake_parity == []  # refused before the parity run


def test_parity_out_replaces_an_earlier_report(capsys, fake_parity, tmp_path: Path, artifact_copy: Path) -> None:
    out = tmp_path / "parity.json"
    for _ in range(2):
        assert cli.main(_parity(artifact_copy, "--out", str(out))) == 0
    assert json.loads(out.read_text())["verdict"] == "PASS" and len(fake_parity) == 2
    assert cli.main(_parity(artifact_copy)) == 0  # the default, ARTIFACT/parity.json
    assert json.loads((artifact_copy / "parity.json").read_text())["verdict"] == "PASS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "parity.json"]
