"""Engine identity and caches (pure Python, no TensorRT).

An engine is valid only for the exact ONNX bytes, optimization profiles and builder settings it was
built from, on the TensorRT version and GPU compute capability that built it (engines are not
portable across TensorRT versions, GPU architectures or JetPack releases). `engine_cache_key`
hashes all five; any change gives a new key.

Machine-wide caches live under `$PRUNERT_CACHE` (else `~/.cache/prunert`):
    tensorrt/timing-trt<version>-sm<cc>.cache   TensorRT's tactic timing cache, loaded before and
                                               saved after every build on this machine
    engines/<key>.plan (+ .sha256)             a copy of every engine built here, so rebuilding an
                                               identical artifact elsewhere on this machine is free
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from prunert.errors import ArtifactError
from prunert.manifest import MANIFEST_NAME, EngineSpec, GraphSpec, Manifest

CACHE_ENV_VAR = "PRUNERT_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/prunert")
KEY_FORMAT = 1  # bump when what goes into an engine changes without any keyed input changing


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_ROOT).expanduser()


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def timing_cache_path(trt_version: str, compute_capability: str) -> Path:
    """The persistent timing cache for one TensorRT version on one GPU architecture."""
    sm = _safe(compute_capability.replace(".", ""))
    return cache_root() / "tensorrt" / f"timing-trt{_safe(trt_version)}-sm{sm}.cache"


def machine_engine_path(cache_key: str) -> Path:
    """Where this machine keeps its copy of the engine with this cache key."""
    return cache_root() / "engines" / f"{_safe(cache_key)}.plan"


def _canonical(value: Any) -> Any:
    """JSON-ready form: tuples become lists, Profile objects their dicts (dict order never matters)."""
    if hasattr(value, "to_dict"):
        return _canonical(value.to_dict())
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def engine_cache_key(
    onnx_sha256s: Sequence[str],
    profiles: Iterable[Any],
    builder_settings: Mapping[str, Any],
    tensorrt_version: str,
    compute_capability: str,
) -> str:
    """sha256 of a canonical JSON of everything that determines an engine.

    onnx_sha256s: the graph file's sha256, then its external-data file's if any (order matters).
    profiles:     Profile objects or their dicts, in profile-index order (order matters: the runtime
                  selects profiles by index). Mapping key order never matters.
    """
    payload = {
        "format": KEY_FORMAT,
        "onnx": [str(s) for s in onnx_sha256s],
        "profiles": _canonical(list(profiles)),
        "builder": _canonical(dict(builder_settings)),
        "tensorrt": str(tensorrt_version),
        "compute_capability": str(compute_capability),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def graph_sha256s(manifest: Manifest, spec: GraphSpec) -> list[str]:
    """sha256 of the graph file and of its external data (from the manifest's verified file list)."""
    names = [spec.file] + ([spec.external_data] if spec.external_data else [])
    missing = [name for name in names if name not in manifest.files]
    if missing:
        raise ArtifactError(f"{MANIFEST_NAME}: files {missing} are not listed with a sha256; re-export the artifact")
    return [manifest.files[name] for name in names]


def graph_digest(manifest: Manifest, spec: GraphSpec) -> str:
    """EngineSpec.onnx_sha256: the graph file's sha256, or with external data the sha256 of both digests."""
    digests = graph_sha256s(manifest, spec)
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def find_engine(manifest: Manifest, graph: str, precision: str, trt_version: str, cc: str) -> EngineSpec | None:
    """The newest engine of `graph` at `precision` built for this TensorRT version and compute capability
    from the graph the manifest lists now (an engine of a since-replaced graph does not count)."""
    try:
        digest = graph_digest(manifest, manifest.graph_spec(graph, precision))
    except ArtifactError:
        return None
    matches = [
        engine
        for engine in manifest.engines
        if engine.graph == graph
        and engine.precision == precision
        and engine.tensorrt_version == trt_version
        and engine.compute_capability == cc
        and engine.onnx_sha256 == digest
    ]
    return matches[-1] if matches else None


def rebuild_command(precision: str) -> str:
    return f"prunert build ARTIFACT --precision {precision}"


def check_engine_compatible(engine_spec: EngineSpec, trt_version: str, cc: str) -> None:
    """ArtifactError unless the engine was built with this TensorRT version for this compute capability."""
    if engine_spec.tensorrt_version == trt_version and engine_spec.compute_capability == cc:
        return
    raise ArtifactError(
        f"{engine_spec.graph} engine '{engine_spec.file}' built with TensorRT {engine_spec.tensorrt_version} for "
        f"compute capability {engine_spec.compute_capability} (device {engine_spec.device_name}); this machine has "
        f"TensorRT {trt_version}, compute capability {cc}: rebuild with `{rebuild_command(engine_spec.precision)}`"
    )


def select_engine(manifest: Manifest, graph: str, precision: str, trt_version: str, cc: str) -> EngineSpec:
    """find_engine, or an ArtifactError that says why there is none and which command makes one."""
    engine = find_engine(manifest, graph, precision, trt_version, cc)
    if engine is not None:
        return engine
    manifest.graph_spec(graph, precision)  # a missing variant names the command that makes it
    candidates = [e for e in manifest.engines if e.graph == graph and e.precision == precision]
    compatible = [e for e in candidates if e.tensorrt_version == trt_version and e.compute_capability == cc]
    if candidates and not compatible:
        check_engine_compatible(candidates[-1], trt_version, cc)
    if compatible:
        raise ArtifactError(
            f"{graph} engine '{compatible[-1].file}' was built from an older {precision} {graph} graph; "
            f"rebuild with `{rebuild_command(precision)}`"
        )
    raise ArtifactError(
        f"{MANIFEST_NAME}: no {precision} TensorRT engine for graph {graph!r} "
        f"(TensorRT {trt_version}, compute capability {cc}); build one on this machine with `{rebuild_command(precision)}`"
    )
