"""What a graph returned must be finite: NaN or inf visual tokens are an error, not tokens for the LLM.

A vision tower that overflows (typically an fp16 engine: activations beyond 65504) produces inf, then NaN, in the
visual tokens. The selection op keeps its output contract on such tokens (a non-finite token is a zero token, so it
is kept only as filler: methods.md, ResPrune "Bad numbers"), but whatever reaches the LLM must be finite: the
pipeline checks the vision graph's outputs right after each call. numpy only (no torch).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from prunert.errors import PrunertError


class NonFiniteOutputError(PrunertError):
    """A graph returned NaN or inf values (an overflow at the graph's precision)."""


def _hint(precision: str) -> str:
    if precision in ("fp16", "bf16"):
        return (f"keep the overflowing layers in fp32: prunert convert ARTIFACT --precision {precision} --fp32-layer PATTERN "
                "(repeat; the overflow run without --no-auto-islands finds most), or run --precision fp32")
    if precision == "fp32":
        return "the fp32 graph itself overflows on this input (the checkpoint's weights or the image); fp32 islands cannot help"
    return f"the {precision} graph's quantization overflows: re-run prunert calibrate on representative images, or run a float precision"


def check_finite_outputs(outputs: Mapping[str, np.ndarray], graph: str, file: str, precision: str, backend: str) -> None:
    """NonFiniteOutputError (one line) unless every floating-point output of `graph` is finite.

    outputs {name: array} (e.g. the vision graph's visual_tokens [B, K, D]); file, precision, backend name the
    graph in the message."""
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 is no np.floating subtype
            array = array.astype(np.float32)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            kinds = "/".join(k for k, hit in (("NaN", np.isnan(array).any()), ("inf", np.isinf(array).any())) if hit)
            raise NonFiniteOutputError(
                f"{graph} graph '{file}' ({precision}, backend {backend}): output '{name}' {list(array.shape)} has "
                f"{int(bad.sum())} {kinds} value(s) (first at {list(first)}), expected finite; {_hint(precision)}"
            )
