"""Typed errors. Every user-facing failure is a PrunertError subclass; the CLI prints its message
and exits non-zero without a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class PrunertError(Exception):
    """Base class for errors caused by bad input, a bad artifact or a failed check."""

    exit_code = 2


class ConfigError(PrunertError):
    """A configuration value (budget, method parameter, CLI flag) is out of range."""


class ModelSourceError(PrunertError):
    """A model directory or preset name cannot be loaded as the expected model family."""


class ImageError(PrunertError):
    """An input image is missing, unreadable, or not what the model expects."""


class PromptError(PrunertError):
    """A prompt is malformed (image placeholder count, length) for the exported artifact."""


class ArtifactError(PrunertError):
    """An artifact directory is incomplete, tampered with, or from an unsupported schema."""


class InputShapeError(PrunertError):
    """A runner input does not match the manifest's name, dtype or shape."""


class BackendUnavailableError(PrunertError):
    """An optional backend package (onnxruntime, tensorrt, cuda-python) is not installed."""


class ExportError(PrunertError):
    """Export or post-export validation failed."""


class ParityError(PrunertError):
    """Parity could not be evaluated (not a parity FAIL, which is a result, not an error)."""


def report_errors(command: Callable[[], int]) -> int:
    """Run a command-line entry point: a PrunertError is one `prunert: error: ...` line on stderr and its exit
    code, Ctrl-C is `prunert: interrupted` and 130 (the `prunert` CLI and every script beside it)."""
    try:
        return command()
    except PrunertError as exc:
        print(f"prunert: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("prunert: interrupted", file=sys.stderr)
        return 130
