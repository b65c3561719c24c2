"""`synthetic:llava-shapes` as a cached checkpoint: trained on first use (prunert.shapes.train), written by the
same atomic writer as the seeded presets, keyed by a hash of everything the weights depend on."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import prunert
from prunert.shapes import DEMO_NOTE, scenes
from prunert.shapes.model import PRESET, TOKENIZER_REPEATS
from prunert.shapes.pool import COVER_FRACTION
from prunert.shapes.train import TrainConfig

# Bump when the training code changes the weights for an unchanged config: it invalidates caches.
TRAIN_FORMAT_VERSION = 1


def recipe_hash(config: TrainConfig = TrainConfig()) -> str:
    """Short hash of the preset, the training config, the scene contract, the torch and prunert versions."""
    contract = {name: getattr(scenes, name) for name in ("CANVAS", "GRID", "OBJECT_SIZE", "JITTER", "BACKGROUND_RANGE",
                                                          "NOISE_SIGMA", "MIN_OBJECTS", "MAX_OBJECTS", "SHAPES", "COLORS")}
    key = {"preset": asdict(PRESET), "train": asdict(config), "scenes": contract, "cover": COVER_FRACTION,
           "tokenizer_repeats": TOKENIZER_REPEATS, "torch": metadata.version("torch"), "prunert": prunert.__version__,
           "format": TRAIN_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]


def write_checkpoint(preset_name: str, out_dir: Path, *, overwrite: bool = False, config: TrainConfig = TrainConfig(),
                     progress: bool = True) -> Path:
    """Train the model (deterministic; a few minutes on 2 cores, once) and write it as a llava-hf directory."""
    from prunert.adapters.llava.synthetic import save_checkpoint
    from prunert.staged_dir import publish_directory
    from prunert.shapes.train import Trainer

    print(f"prunert: training synthetic:{preset_name} once ({DEMO_NOTE}); it is cached at {out_dir}", file=sys.stderr)
    result = Trainer(config, progress=progress).train()
    print(f"prunert: trained synthetic:{preset_name} in {result.seconds / 60:.1f} min, state dict sha256 "
          f"{result.sha256[:16]}", file=sys.stderr)
    marker = _marker(preset_name, config, result)
    return publish_directory(out_dir, lambda d: save_checkpoint(d, PRESET, result.model, result.tokenizer, marker),
                              overwrite=overwrite)


def _marker(preset_name: str, config: TrainConfig, result: Any) -> dict[str, Any]:
    return {
        "preset": preset_name,
        "seed": config.seed,
        "synthetic": True,
        "trained": True,
        "note": DEMO_NOTE,
        "state_dict_sha256": result.sha256,
        "train_seconds": round(result.seconds, 1),
        "train_config": asdict(config),
        "final_losses": {k: round(v, 4) for k, v in result.losses.items()},
        "torch_version": metadata.version("torch"),
        "prunert_version": prunert.__version__,
        "format_version": TRAIN_FORMAT_VERSION,
    }
