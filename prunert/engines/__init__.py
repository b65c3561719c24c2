"""TensorRT engines built on the target from an artifact's ONNX graphs (`prunert build`).

Runs where only numpy, tensorrt and cuda-python exist (a Jetson with JetPack): never imports torch or
transformers; tensorrt and cuda-python are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from prunert.errors import BackendUnavailableError

TENSORRT_HINT = (
    "package tensorrt is not installed: it comes with JetPack on Jetson; on x86 install the tensorrt wheel "
    "from NVIDIA's index (pip install tensorrt does not work without access to pypi.nvidia.com) or use the "
    "NGC TensorRT container"
)


def import_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailableError naming the package and how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(f"backend 'tensorrt': {TENSORRT_HINT}") from None
    return tensorrt


_LOGGERS: dict[int, tuple[Any, Any]] = {}  # id(tensorrt module) -> (module, logger)


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process, shared by every builder and runtime (TensorRT keeps a single global
    logger: a second, different one only draws a warning and may not receive the messages). It keeps the
    latest error messages (`errors_since(count)`) for exception texts and drops everything below ERROR."""
    module, logger = _LOGGERS.get(id(trt), (None, None))
    if module is not trt:

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []  # the latest 100
                self.count = 0  # errors ever logged

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors = [*self.errors[-99:], str(msg)]
                    self.count += 1

            def errors_since(self, mark: int) -> list[str]:
                new = self.count - mark
                return self.errors[-new:] if new > 0 else []

        logger = Logger()
        _LOGGERS[id(trt)] = (trt, logger)
    return logger


def __getattr__(name: str) -> Any:  # build_engines without importing the builder eagerly
    if name == "build_engines":
        from prunert.engines.builder import build_engines

        return build_engines
    raise AttributeError(f"module 'prunert.engines' has no attribute {name!r}")


__all__ = ["TENSORRT_HINT", "build_engines", "import_tensorrt", "trt_logger"]
