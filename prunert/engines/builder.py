"""`prunert build`: TensorRT engines for an artifact's graphs, built on the machine that will run them.

For each graph: resolve the graph at the requested precision (fp16/bf16/int8/fp8 graphs are the
artifact's variants: precision comes from the graph's own dtypes and Q/DQ nodes), derive its
optimization profiles, compute the engine cache key; a manifest engine with that key is a cache hit.
Otherwise the ONNX file is parsed by path (so external-data weights resolve) into a STRONGLY TYPED
network (required on TensorRT 10.x for graph-defined precision; always on, and the flag ignored, on
11.x; no FP16/INT8 builder flags anywhere: TensorRT 11 removed them), one optimization profile per
derived profile is added, and the serialized engine is written into the artifact through
ArtifactUpdate (atomic) as `<graph>-<precision>-<key[:12]>.plan`, recorded as an EngineSpec.

Host memory: building needs about 3-4x the model's parameter bytes of host RAM on Jetson (parser copy,
builder copy, serialized plan), on top of the unified memory the GPU uses: close other processes, add
swap, or build the graphs one at a time (`--graphs vision`, then `--graphs decoder`).

Caches on this machine (prunert.engines.cache): the tactic timing cache is loaded before and saved
after each build (later builds are faster); every built engine is also copied to
`$PRUNERT_CACHE/engines/<key>.plan`, so an identical artifact elsewhere on this machine builds free.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from prunert.artifact_update import ArtifactUpdate
from prunert.config import EngineBuildConfig
from prunert.engines import import_tensorrt, trt_logger
from prunert.engines.cache import engine_cache_key, graph_digest, graph_sha256s, machine_engine_path, timing_cache_path
from prunert.engines.profiles import Profile, derive_profiles, resolve_limits
from prunert.errors import ExportError
from prunert.manifest import EngineSpec, Manifest, load_manifest, sha256_file
from prunert.runtime import cuda as cuda_rt

Log = Callable[[str], None]


def builder_settings(manifest: Manifest, config: EngineBuildConfig) -> dict[str, Any]:
    """Everything besides ONNX bytes and profiles that shapes the engine: recorded and hashed."""
    limits = resolve_limits(manifest, config)
    return {
        "precision": config.precision,
        "strongly_typed": True,
        "tf32": False,  # fp32 tensors compute in fp32: TF32 (on by default) would break the fp32 parity bar
        "max_batch": limits.max_batch,
        "opt_batch": limits.opt_batch,
        "max_seq": limits.max_seq,
        "workspace_bytes": config.workspace_bytes,
        "optimization_level": config.optimization_level,
    }


@dataclass
class _Built:
    graph: str
    key: str
    plan: Path  # in the machine cache
    profiles: list[Profile]
    digest: str
    seconds: float


def build_engines(directory: Path | str, config: EngineBuildConfig = EngineBuildConfig(), log: Log = print) -> Manifest:
    """Build (or reuse) one engine per graph in config.graphs; returns the artifact's manifest afterwards.

    Engines this replaces (same graph, precision, device, TensorRT version, other key) leave the manifest,
    and their folders are deleted once no remaining file lives there.
    """
    trt = import_tensorrt()
    trt_version = str(trt.__version__)
    cc, device = cuda_rt.compute_capability(), cuda_rt.device_name()
    directory = Path(directory)
    manifest = load_manifest(directory)  # sha256s verified: the cache key trusts them
    settings = builder_settings(manifest, config)
    built: list[_Built] = []
    try:
        for graph in config.graphs:
            item = _one_graph(trt, directory, manifest, graph, config, settings, trt_version, cc, log)
            if item is not None:
                built.append(item)
        if not built:
            return manifest
        return _install(directory, built, config, settings, trt_version, cc, device)
    finally:
        for item in built:
            if item.plan.parent == directory:  # a temporary plan (no writable machine cache)
                item.plan.unlink(missing_ok=True)


def _one_graph(trt: Any, directory: Path, manifest: Manifest, graph: str, config: EngineBuildConfig,
               settings: dict[str, Any], trt_version: str, cc: str, log: Log) -> _Built | None:
    """The graph's plan in the machine cache (built unless already there), or None on a manifest cache hit."""
    spec = manifest.graph_spec(graph, config.precision)
    profiles = derive_profiles(manifest, graph, config)
    key = engine_cache_key(graph_sha256s(manifest, spec), profiles, settings, trt_version, cc)
    label = f"{graph} ({config.precision}, TensorRT {trt_version}, sm {cc})"
    if any(engine.cache_key == key for engine in manifest.engines):
        log(f"{label}: engine up to date (cache key {key[:12]})")
        return None
    start = time.perf_counter()
    cached = machine_engine_path(key)
    if _cached_plan_ok(cached):
        log(f"{label}: reusing this machine's engine {cached}")
    else:
        log(f"{label}: building from {spec.file} ({len(profiles)} profile(s)); needs ~3-4x the weights' bytes of host RAM")
        plan = _build_plan(trt, directory / spec.file, profiles, config, timing_cache_path(trt_version, cc), log)
        try:
            _write_machine_copy(cached, plan)
        except OSError as exc:  # no writable machine cache: keep the plan beside the artifact until installed
            log(f"could not keep a copy in {cached.parent}: {exc}")
            handle, temp = tempfile.mkstemp(prefix=".engine-", suffix=".plan", dir=directory)
            with os.fdopen(handle, "wb") as out:
                out.write(memoryview(plan))
            cached = Path(temp)
        del plan
    seconds = time.perf_counter() - start
    log(f"{label}: engine ready in {seconds:.1f} s")
    return _Built(graph, key, cached, profiles, graph_digest(manifest, spec), seconds)


def _install(directory: Path, built: list[_Built], config: EngineBuildConfig, settings: dict[str, Any],
             trt_version: str, cc: str, device: str) -> Manifest:
    with ArtifactUpdate(directory, "engines") as update:
        new = []
        for item in built:
            name = f"{item.graph}-{config.precision}-{item.key[:12]}.plan"
            _copy(item.plan, update.staging / name)
            new.append(
                EngineSpec(
                    graph=item.graph, precision=config.precision, file=update.file(name), cache_key=item.key,
                    onnx_sha256=item.digest, tensorrt_version=trt_version, compute_capability=cc, device_name=device,
                    profiles=tuple(p.to_dict() for p in item.profiles), builder=dict(settings),
                    build_seconds=round(item.seconds, 3),
                )
            )

        def replaced(engine: EngineSpec) -> bool:
            return any(
                engine.graph == n.graph and engine.precision == n.precision and engine.tensorrt_version == n.tensorrt_version
                and engine.compute_capability == n.compute_capability and engine.device_name == n.device_name
                for n in new
            )

        current = load_manifest(directory, verify_hashes=False)
        old = [engine for engine in current.engines if replaced(engine)]
        return update.commit(
            lambda m: replace(m, engines=tuple(e for e in m.engines if not replaced(e)) + tuple(new)),
            drop=_droppable_folders(current, old),
        )


def _droppable_folders(manifest: Manifest, removed: list[EngineSpec]) -> list[str]:
    """Folders of removed engines in which no other listed file remains."""
    gone = {engine.file for engine in removed}
    folders = {engine.file.split("/", 1)[0] for engine in removed if "/" in engine.file}
    return sorted(
        folder for folder in folders
        if not any(name.startswith(folder + "/") and name not in gone for name in manifest.files)
    )


def _build_plan(trt: Any, onnx_path: Path, profiles: list[Profile], config: EngineBuildConfig,
                timing_path: Path, log: Log) -> Any:
    logger = trt_logger(trt)
    mark = logger.count

    def errors() -> list[str]:
        return logger.errors_since(mark)

    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # ignored (always on) in 11.x
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        found = [str(parser.get_error(i)) for i in range(parser.num_errors)] + errors()
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(found or ["no error reported"]))
    names = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if names != sorted(profiles[0].shapes):
        raise ExportError(f"{onnx_path.name}: TensorRT sees inputs {names}, the manifest lists {sorted(profiles[0].shapes)}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_bytes))
    tf32 = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if tf32 is not None:  # not a precision flag: it lets fp32 matmuls round inputs to 10-bit mantissas
        builder_config.clear_flag(tf32)
    if hasattr(builder_config, "builder_optimization_level"):
        builder_config.builder_optimization_level = int(config.optimization_level)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization.set_shape(name, low, opt, high)
        if builder_config.add_optimization_profile(optimization) < 0:
            raise ExportError(f"{onnx_path.name}: TensorRT rejected optimization profile '{profile.name}': " + "; ".join(errors()))
    timing = _load_timing_cache(builder_config, timing_path, log)
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path.name}: " + "; ".join(errors() or ["no error reported"])
        )
    _save_timing_cache(timing, timing_path, log)
    return plan


def _load_timing_cache(builder_config: Any, path: Path, log: Log) -> Any:
    data = b""
    if path.is_file():
        data = path.read_bytes()
    try:
        cache = builder_config.create_timing_cache(data)
    except Exception:  # a corrupt or foreign cache file: start afresh rather than fail the build
        log(f"ignoring unreadable timing cache {path}")
        cache = builder_config.create_timing_cache(b"")
    builder_config.set_timing_cache(cache, False)  # ignore_mismatch=False: the file is per version and GPU
    return builder_config.get_timing_cache() if hasattr(builder_config, "get_timing_cache") else cache


def _save_timing_cache(cache: Any, path: Path, log: Log) -> None:
    try:
        _atomic_write(path, memoryview(cache.serialize()))
    except OSError as exc:  # the cache only saves time: never fail a finished build over it
        log(f"could not save the timing cache {path}: {exc}")


def _atomic_write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_machine_copy(path: Path, plan: Any) -> None:
    view = memoryview(plan)
    _atomic_write(path, view)
    _atomic_write(path.with_suffix(".sha256"), _sha256(view).encode())


def _cached_plan_ok(path: Path) -> bool:
    """A machine-cache plan counts only if its recorded sha256 matches (a torn or edited copy is rebuilt)."""
    digest = path.with_suffix(".sha256")
    if not (path.is_file() and digest.is_file()):
        return False
    return sha256_file(path) == digest.read_text().strip()


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
