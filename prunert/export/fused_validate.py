"""Validation of the fused decoder graph after export: the graph, driven by the runtime's own shared-buffer
session, against the torch decoder module on a left-padded batch of two, prefill then decode steps.

A fully padded query row has no defined output (every key it may see is padding), so logits are compared on
the rows' real positions only; the KV buffers are checked through the logits of the steps that read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunert.errors import ExportError
from prunert.manifest import GraphSpec

PREFILL_MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)  # [2, 5]: row 0 left-padded by 2
DECODE_STEPS = 2


@dataclass(frozen=True)
class FusedReference:
    """The torch decoder's logits on the validation steps, kept so the graph is checked after the torch weights are
    freed (prunert.export.pipeline.release_weights). steps: (embeds [B, S, D], mask [B, T], positions, logits [B, S, V])."""

    steps: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]


def validate_fused_decoder(module: torch.nn.Module, path: Path, spec: GraphSpec, dims: dict[str, int],
                           position_leading: tuple[int, ...]) -> float:
    """module: the torch decoder (graphs.DecoderGraph or the adapter's); returns the largest logits difference.
    An ExportError names the step and the difference above the export dtype's bar. Both halves at once (the module stays alive)."""
    return check_fused_decoder(fused_reference(module, dims, position_leading), path, spec, dims)


def fused_reference(module: torch.nn.Module, dims: dict[str, int], position_leading: tuple[int, ...]) -> FusedReference:
    """The torch half: prefill then DECODE_STEPS steps of `module` on a left-padded batch of two."""
    mask = PREFILL_MASK
    batch = mask.shape[0]
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)  # [B, L]
    positions = np.stack([positions * (i + 1) for i in range(position_leading[0])]) if position_leading else positions
    past = tuple(torch.zeros(batch, dims["num_kv_heads"], 0, dims["head_dim"]) for _ in range(2 * dims["num_layers"]))
    generator = torch.Generator().manual_seed(3)
    steps = []
    for step in range(1 + DECODE_STEPS):
        if step:
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            positions = positions[..., -1:] + 1
        new = PREFILL_MASK.shape[1] if step == 0 else 1
        embeds = torch.randn(batch, new, dims["hidden_size"], generator=generator)  # [B, S, D]
        with torch.no_grad():
            expected, *past = module(embeds, torch.from_numpy(mask), torch.from_numpy(positions), tuple(past))
        steps.append((embeds.numpy(), mask, np.ascontiguousarray(positions), expected.numpy()))
    return FusedReference(tuple(steps))


def check_fused_decoder(reference: FusedReference, path: Path, spec: GraphSpec, dims: dict[str, int], dtype: str = "fp32") -> float:
    """The ONNX Runtime half: the graph, driven by the runtime's shared-buffer session, on the reference's steps.
    dtype: the export dtype of the torch reference (fp16: judged by cosine, prunert.export.validate.EXPORT_TOLERANCES)."""
    from prunert import metrics
    from prunert.export.validate import EXPORT_TOLERANCES, ort_session
    from prunert.runtime.runner import OnnxRuntimeRunner

    lean = ort_session(path)  # the graph's weights held once, as for the other graphs' checks
    session = OnnxRuntimeRunner(path, spec, session=lean).decoder_session(dims["num_layers"])
    session.reset(PREFILL_MASK.shape[0])
    worst = 0.0
    for step, (embeds, mask, positions, expected) in enumerate(reference.steps):
        got = session.run(embeds, mask, positions)  # [B, S, V]
        real = mask[:, -embeds.shape[1]:].astype(bool)  # [B, S]
        diff = float(np.abs(got - expected)[real].max())
        where = "prefill" if step == 0 else f"decode step {step}"
        bar = EXPORT_TOLERANCES[dtype]
        if bar.max_abs is not None and not diff <= bar.max_abs:
            raise ExportError(f"{path.name}: logits of {where} differ from torch by {diff:.3g} (max {bar.max_abs})")
        cosine = metrics.cosine(expected[real], got[real])
        if bar.min_cosine is not None and not cosine >= bar.min_cosine:
            raise ExportError(f"{path.name}: logits of {where} have cosine {cosine:.6f} to torch at {dtype} (min {bar.min_cosine})")
        worst = max(worst, diff)
    return worst
