"""An artifact directory opened for running: manifest (paths contained, hashes verified), tokenizer, embedding
table, preprocessor config and the family's host adapter. Reads nothing but what the manifest lists in `files`,
and checks at load that the manifest agrees with its graphs, tokenizer and preprocessor config (manifest_checks)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from prunert.errors import ArtifactError
from prunert.manifest import Manifest, load_manifest
from prunert.runtime.host import HostAdapter
from prunert.runtime import manifest_checks


class Artifact:
    def __init__(self, directory: Path | str, verify_hashes: bool = True):
        """verify_hashes=False (`--no-verify`) skips only the sha256s: paths, listing and every check still apply."""
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory, verify_hashes=verify_hashes)
        self._check(manifest_checks.check_manifest, self.manifest)
        self.tokenizer, self.embeddings, self.preprocessor_config  # read now: a bad file fails at load, not mid-run

    def path(self, name: str) -> Path:
        """A file of the artifact; only one the manifest lists (load_manifest checked it is inside the directory)."""
        if name not in self.manifest.files:
            raise ArtifactError(f"artifact '{self.directory}': '{name}' is not listed in the manifest's files; it is not loaded")
        return self.directory / name

    def _check(self, check: Callable[..., None], *args: Any) -> None:
        """Run a manifest_checks check; its ArtifactError names this artifact."""
        try:
            check(*args)
        except ArtifactError as exc:
            raise ArtifactError(f"artifact '{self.directory}': {exc}") from None

    def _cannot_read(self, name: str, exc: BaseException) -> ArtifactError:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return ArtifactError(f"artifact '{self.directory}': cannot read {name}: {reason}")

    @cached_property
    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        name = self.manifest.text.tokenizer
        path = self.path(name)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise self._cannot_read(name, exc) from None
        self._check(manifest_checks.check_tokenizer, self.manifest, tokenizer)
        return tokenizer

    @cached_property
    def embeddings(self) -> np.ndarray:
        """The LLM's input-embedding table [V, D], memory-mapped."""
        name = self.manifest.text.embeddings
        path = self.path(name)
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # not an .npy (ValueError), truncated (EOFError, OSError), pickled objects, ...
            raise self._cannot_read(name, exc) from None
        expected = (self.manifest.decoder.vocab_size, self.manifest.decoder.hidden_size)
        if not isinstance(table, np.ndarray):  # an .npz archive
            raise ArtifactError(f"artifact '{self.directory}': {name}: a {type(table).__name__}, expected one .npy array [V, D]")
        if table.shape != expected or table.dtype.kind != "f":
            raise ArtifactError(f"artifact '{self.directory}': {name}: shape {table.shape} {table.dtype}, expected float {expected}")
        return table

    @cached_property
    def preprocessor_config(self) -> dict[str, Any]:
        name = self.manifest.image_preprocessor
        path = self.path(name)
        try:
            config = json.loads(path.read_text())
        except RecursionError:
            raise ArtifactError(f"artifact '{self.directory}': cannot read {name}: nested too deeply") from None
        except (UnicodeDecodeError, ValueError, OSError) as exc:
            raise self._cannot_read(name, exc) from None
        self._check(manifest_checks.check_preprocessor_config, name, config)
        return config

    @cached_property
    def special_ids(self) -> set[int]:
        added = self.tokenizer.get_added_tokens_decoder()
        ids = {token_id for token_id, token in added.items() if token.special}
        text = self.manifest.text
        ids |= {text.image_token_id, text.pad_token_id, *text.eos_token_ids}
        if text.bos_token_id is not None:
            ids.add(text.bos_token_id)
        return ids

    @cached_property
    def host(self) -> HostAdapter:
        """The family's host adapter, bound to this manifest's family_config and N (the registry's one lookup)."""
        from prunert.adapters import host_adapter_class

        host_class = host_adapter_class(self.manifest.source.family)
        return host_class(self.manifest.family_config, self.manifest.budget.num_visual_tokens)
