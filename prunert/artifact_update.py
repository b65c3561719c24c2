"""Adding files to an existing artifact (precision variants, quantized graphs, TensorRT engines)
without ever leaving it half-written.

New files are written under `ARTIFACT/.staging/<name>-<random>/`, then the folder is renamed to
`ARTIFACT/<name>-<random>/` and the manifest is replaced atomically (temp file + os.replace) with one
that lists them and their sha256. Until that replace the old manifest stands and names only old files;
an interrupted update leaves at most an unlisted folder, which the next update or `prunert inspect`
ignores. Folders a committed update drops are deleted after the manifest no longer names them.
Each staging folder is a `prunert.artifact_publish.Staging` root (owner pid and start time beside the
payload): the next update removes the ones whose owner is gone, `prunert inspect` reports the rest.
A commit holds the artifact's lock (`.NAME.lock` beside it, where the parent is writable), so two
concurrent updates both land and an `export --overwrite` swap never runs under one.

Standard library only: `prunert build` runs on the target, where torch is absent.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from prunert.artifact_publish import STAGING_DIR, Staging, clean_stale, rename_noreplace, target_lock, write_atomically
from prunert.errors import ArtifactError
from prunert.manifest import MANIFEST_NAME, Manifest, check_contained, load_manifest, sha256_file


class ArtifactUpdate:
    """with ArtifactUpdate(artifact, "fp16") as update:
           write files under update.staging; name them in the manifest as update.file("vision.onnx")
           update.commit(lambda manifest: replace(manifest, variants=...), drop=[old folder])
    Leaving the block without commit (an exception, Ctrl-C) removes the staged files."""

    def __init__(self, directory: Path | str, name: str):
        self.directory = Path(directory)
        load_manifest(self.directory, verify_hashes=False)  # a clear error before anything is written
        clean_stale(self.directory)  # staging folders of updates that were killed
        (self.directory / STAGING_DIR).mkdir(exist_ok=True)
        self._root = Staging.create(self.directory / STAGING_DIR, f"{name}-")  # its payload/ becomes ARTIFACT/<folder>
        self.folder = self._root.root.name
        self.staging = self._root.payload
        self.committed: Manifest | None = None

    def file(self, name: str) -> str:
        """The manifest's name for a file staged at self.staging / name."""
        return f"{self.folder}/{name}"

    def commit(self, update: Callable[[Manifest], Manifest], drop: Iterable[str] = ()) -> Manifest:
        """Install the staged folder and the manifest update(old) lists; drop whole folders the old one listed."""
        with target_lock(self.directory, optional=True):  # where the parent is read-only, unlocked
            new = self._install(update, drop)
        self.abort()  # the emptied staging root
        self.committed = new
        return new

    def _install(self, update: Callable[[Manifest], Manifest], drop: Iterable[str]) -> Manifest:
        old = load_manifest(self.directory, verify_hashes=False)
        new = update(old)
        drop = [folder.rstrip("/") for folder in drop if folder]
        final = self.directory / self.folder
        rename_noreplace(self.staging, final)
        try:
            files = {name: digest for name, digest in old.files.items() if not any(name.startswith(d + "/") for d in drop)}
            for path in sorted(final.rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(self.directory))] = sha256_file(path)
            new = replace(new, files=files)
            check_contained(self.directory, new)  # every file the new manifest names is inside and hashed
            write_manifest(self.directory, new)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        for folder in drop:
            if (self.directory / folder).resolve().parent == self.directory.resolve():
                shutil.rmtree(self.directory / folder, ignore_errors=True)
        return new

    def abort(self) -> None:
        self._root.remove()
        _remove_if_empty(self.directory / STAGING_DIR)

    def __enter__(self) -> "ArtifactUpdate":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:
            self.abort()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Replace ARTIFACT/manifest.json atomically, with the umask's file mode (as every other file)."""
    write_atomically(Path(directory) / MANIFEST_NAME, manifest.to_json())


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
