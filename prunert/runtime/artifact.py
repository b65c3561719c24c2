"""An artifact directory opened for running: manifest (hashes verified), tokenizer, embedding table,
preprocessor config and the family's host adapter. Reads nothing but what the manifest lists."""

from __future__ import annotations

import importlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from prunert.errors import ArtifactError
from prunert.manifest import Manifest, load_manifest


class Artifact:
    def __init__(self, directory: Path | str, verify_hashes: bool = True):
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory, verify_hashes=verify_hashes)

    def path(self, name: str) -> Path:
        return self.directory / name

    @cached_property
    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.path(self.manifest.text.tokenizer)))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ArtifactError(f"artifact '{self.directory}': cannot read {self.manifest.text.tokenizer}: {exc}") from None

    @cached_property
    def embeddings(self) -> np.ndarray:
        """The LLM's input-embedding table [V, D], memory-mapped."""
        table = np.load(self.path(self.manifest.text.embeddings), mmap_mode="r", allow_pickle=False)
        expected = (self.manifest.decoder.vocab_size, self.manifest.decoder.hidden_size)
        if table.shape != expected:
            raise ArtifactError(f"artifact '{self.directory}': embeddings shape {table.shape}, expected {expected}")
        return table

    @cached_property
    def preprocessor_config(self) -> dict[str, Any]:
        return json.loads(self.path(self.manifest.image_preprocessor).read_text())

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
    def host(self) -> Any:
        from prunert.adapters import family_module

        module = importlib.import_module(family_module(self.manifest.source.family).__name__ + ".host")
        factory = getattr(module, "host_adapter", None)  # a host bound to the manifest's family_config
        return module.HOST_ADAPTER if factory is None else factory(self.manifest.family_config)
