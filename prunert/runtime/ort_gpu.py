"""ONNX Runtime on the GPU: the CUDA execution provider (`--backend ort-cuda`) and the TensorRT
execution provider (`--backend ort-trt`), as alternatives to prunert's own TensorRT engines.

Both need the `onnxruntime-gpu` package *instead of* `onnxruntime` (they share the module name and
must never be installed together). The decoder's KV cache stays on the GPU between steps through
IOBinding (runner.OrtBoundKVSession with device "cuda").

The TensorRT EP builds its own engines from the graph at the chosen precision (the fp16 / Q/DQ
variant files, so no precision flags are needed) with one optimization profile covering every shape
the manifest allows, and caches them under $PRUNERT_CACHE/ort-trt/<onnx sha256>/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prunert.errors import BackendUnavailableError
from prunert.manifest import GraphSpec
from prunert.runtime.runner import OnnxRuntimeRunner

ORT_GPU_HINT = (
    "needs onnxruntime-gpu instead of onnxruntime (same module name, never both): "
    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
)


def ort_gpu_runner(artifact: Any, graph: str, backend: str, precision: str, spec: GraphSpec, runtime: Any = None) -> OnnxRuntimeRunner:
    """runtime: prunert.config.RuntimeConfig of the session (threads and spinning of its CPU side); None: the defaults."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError(f"backend {backend!r}: onnxruntime is not installed; {ORT_GPU_HINT}") from None
    wanted = "CUDAExecutionProvider" if backend == "ort-cuda" else "TensorrtExecutionProvider"
    if wanted not in ort.get_available_providers():
        raise BackendUnavailableError(
            f"backend {backend!r}: this onnxruntime ({ort.__version__}) has no {wanted} "
            f"(it has {ort.get_available_providers()}); {ORT_GPU_HINT}"
        )
    path = artifact.path(spec.file)
    if backend == "ort-cuda":
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    else:
        options = trt_provider_options(artifact.manifest, graph, precision, artifact.manifest.files[spec.file])
        providers = [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return OnnxRuntimeRunner(path, spec, providers=providers, runtime=runtime)


def trt_provider_options(manifest: Any, graph: str, precision: str, onnx_sha256: str) -> dict[str, Any]:
    """TensorRT EP options: engine and timing caches, and explicit profile shapes from the manifest."""
    from prunert.config import EngineBuildConfig
    from prunert.engines.profiles import derive_profiles

    cache = _cache_root() / "ort-trt" / onnx_sha256[:16]
    cache.mkdir(parents=True, exist_ok=True)
    profiles = derive_profiles(manifest, graph, EngineBuildConfig(precision=precision))
    merged = _merge(profiles)  # the EP builds one engine per session: one profile spanning all derived ones
    return {
        "device_id": 0,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_int8_enable": precision == "int8",  # explicit Q/DQ graphs: scales come from the graph, no calibration table
        "trt_profile_min_shapes": _shapes(merged, 0),
        "trt_profile_opt_shapes": _shapes(merged, 1),
        "trt_profile_max_shapes": _shapes(merged, 2),
    }


def _merge(profiles: list[Any]) -> dict[str, list[tuple[int, ...]]]:
    """Per input: [min, opt, max] shapes spanning all profiles (elementwise min of mins, max of maxes)."""
    merged: dict[str, list[tuple[int, ...]]] = {}
    for profile in profiles:
        for name, (low, opt, high) in profile.shapes.items():
            if name not in merged:
                merged[name] = [tuple(low), tuple(opt), tuple(high)]
                continue
            old_low, old_opt, old_high = merged[name]
            merged[name] = [tuple(map(min, old_low, low)), old_opt, tuple(map(max, old_high, high))]
    return merged


def _shapes(merged: dict[str, list[tuple[int, ...]]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in merged.items())


def _cache_root() -> Path:
    return Path(os.environ.get("PRUNERT_CACHE") or Path.home() / ".cache" / "prunert")
