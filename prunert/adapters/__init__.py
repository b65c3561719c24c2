"""Model-family adapters: every model-family quirk lives in one adapter package per family.

Generic code finds an adapter by the checkpoint's `model_type` (export side, torch) or by the
manifest's `family` (runtime side, numpy only) and never branches on a model name. A family package has
`host.HOST_ADAPTER` (a prunert.runtime.host.HostAdapter subclass) and `export.EXPORT_ADAPTER` (a
prunert.export.adapter.ExportAdapter subclass); a fourth family adds one line to FAMILIES and MODEL_TYPES.
This module imports neither torch nor numpy.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunert.errors import ModelSourceError

# family -> module of that family's adapter package
FAMILIES = {"llava": "prunert.adapters.llava", "llava_next": "prunert.adapters.llava_next", "qwen2_5_vl": "prunert.adapters.qwen2_5_vl"}
# Hugging Face config `model_type` -> family
MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next", "qwen2_5_vl": "qwen2_5_vl"}
SYNTHETIC_PREFIX = "synthetic:"
MARKER_FILE = "prunert_synthetic.json"  # written into every checkpoint a synthetic preset builds


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local Hugging Face directory, possibly a synthetic checkpoint."""

    label: str  # what the user typed: "synthetic:llava-tiny" or a directory
    path: Path
    family: str
    synthetic: bool  # seeded random weights (a synthetic preset's marker says so)
    config: dict[str, Any]
    note: str = ""  # what every command says about this model (a trained demonstration preset's marker note)

    @property
    def revision(self) -> str:
        return checkpoint_revision(self.path)


SAMPLES_PER_SHARD = 16  # 64 KiB windows spread over each weights file
SAMPLE_BYTES = 1 << 16


def checkpoint_revision(path: Path) -> str:
    """A cheap fingerprint of a checkpoint directory: config.json, and per *.safetensors file its name,
    size, header and evenly spaced 64 KiB samples of its data (~1 MiB read per file, even for 10 GB
    shards). Different weights of the same shapes (another seed or init scale) give another revision."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        size = shard.stat().st_size
        digest.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as handle:
            for index in range(SAMPLES_PER_SHARD):
                handle.seek(index * max(size - SAMPLE_BYTES, 0) // max(SAMPLES_PER_SHARD - 1, 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def family_module(family: str) -> Any:
    if family not in FAMILIES:
        raise ModelSourceError(f"model family {family!r}: not supported; expected one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def host_adapter_class(family: str) -> type:
    """The family's prunert.runtime.host.HostAdapter subclass (numpy only): `HOST_ADAPTER` of its `host` module.
    The runtime's one way to an adapter package."""
    return importlib.import_module(family_module(family).__name__ + ".host").HOST_ADAPTER


def export_adapter_class(family: str) -> type:
    """The family's prunert.export.adapter.ExportAdapter subclass (torch): `EXPORT_ADAPTER` of its `export` module."""
    return importlib.import_module(family_module(family).__name__ + ".export").EXPORT_ADAPTER


def synthetic_presets() -> dict[str, str]:
    """preset name -> family, over every family that ships synthetic presets."""
    presets = {}
    for family, module_name in FAMILIES.items():
        module = importlib.import_module(module_name + ".synthetic")
        presets.update({name: family for name in module.PRESETS})
    return presets


def resolve_source(spec: str) -> ModelSource:
    """`synthetic:<preset>` (written to a local cache on first use) or a local checkpoint directory."""
    if spec.startswith(SYNTHETIC_PREFIX):
        name = spec[len(SYNTHETIC_PREFIX) :]
        presets = synthetic_presets()
        if name not in presets:
            raise ModelSourceError(f"--model {spec!r}: unknown synthetic preset; expected one of {sorted(presets)}")
        synthetic = importlib.import_module(FAMILIES[presets[name]] + ".synthetic")
        path = Path(synthetic.synthetic_checkpoint(name))
        return _from_directory(spec, path, synthetic=True)
    return _from_directory(spec, Path(spec), synthetic=False)


def _from_directory(label: str, path: Path, synthetic: bool) -> ModelSource:
    if not path.is_dir():
        raise ModelSourceError(f"--model {label!r}: not a directory (expected a Hugging Face checkpoint directory or synthetic:<preset>)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"--model {label!r}: no config.json; expected a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"--model {label!r}: config.json is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelSourceError(
            f"--model {label!r}: model_type {model_type!r} is not supported; expected one of {sorted(MODEL_TYPES)} "
            f"(e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf, Qwen/Qwen2.5-VL-3B-Instruct)"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"--model {label!r}: no *.safetensors weights (prunert never loads pickled .bin weights)")
    synthetic, note = _marker(path, synthetic)
    return ModelSource(label=label, path=path, family=MODEL_TYPES[model_type], synthetic=synthetic, config=config, note=note)



def _marker(path: Path, synthetic: bool) -> tuple[bool, str]:
    """(random weights?, note) from a preset's marker: a trained preset's says `"trained": true` and its note."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return synthetic, ""
    if not isinstance(marker, dict):
        return synthetic, ""
    trained = marker.get("trained") is True
    note = marker.get("note") if trained and isinstance(marker.get("note"), str) else ""
    return not trained, note
