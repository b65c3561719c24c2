"""The artifact contract: `manifest.json` in an artifact directory.

Everything the runtime knows about an artifact comes from here. Parsing is strict: unknown keys,
missing keys, a newer schema version or a file whose sha256 differs are ArtifactErrors.
Standard library only (the runtime and the edge path import this).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Union

from prunert.config import EXPORT_DTYPES, READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from prunert.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
MAX_JSON_DEPTH = 64  # real manifests nest about 10 deep
KV_SHARED_BUFFER = "shared-buffer"  # GraphSpec.kv_cache: past and present are one buffer, written in place
KV_CACHE_LAYOUTS = (None, KV_SHARED_BUFFER)  # None: present = past + the step's rows, a new tensor each step
Dim = Union[int, str]  # a static size, or a symbolic dim name such as "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


@dataclass(frozen=True)
class GraphSpec:
    file: str  # .onnx file name inside the artifact directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None  # weights file beside the .onnx, if any
    # (min, opt, max) of symbolic dims the adapter bounds (Qwen2.5-VL vision: "patches", "merged"); TensorRT
    # profiles use them and runners check inputs against them. Written only when non-empty.
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # How a decoder graph's past/present relate: None (written only when set) = present is past + this step's rows,
    # a new tensor each step; "shared-buffer" = past and present are one preallocated buffer the graph writes in place.
    kv_cache: str | None = None

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)


@dataclass(frozen=True)
class SourceSpec:
    model: str  # "synthetic:<preset>" or the local directory it was exported from
    family: str  # adapter name, e.g. "llava"
    architecture: str  # Hugging Face class name
    synthetic: bool  # seeded random weights: can show plumbing and parity, never task accuracy
    revision: str  # fingerprint of the checkpoint's config and weights (prunert.adapters.checkpoint_revision)
    # What commands say about the model (a trained demonstration preset); last and optional: older manifests load "".
    note: str = ""
    # The dtype of the top-level graphs' weights (`export --dtype`, EXPORT_DTYPES); graph I/O is float32 at every
    # dtype and the selection op fp32. Optional: manifests written before it load as "fp32", which they are.
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise ArtifactError(f"{MANIFEST_NAME}: 'source.dtype' is {json.dumps(self.dtype)}, expected one of {list(EXPORT_DTYPES)}")


@dataclass(frozen=True)
class BudgetSpec:
    budget: int  # K kept visual tokens per image
    method: str
    params: dict[str, Any]
    num_visual_tokens: int  # N before pruning


@dataclass(frozen=True)
class TextSpec:
    embeddings: str  # .npy file: the LLM's input-embedding table [vocab, hidden]
    tokenizer: str  # tokenizer.json (the `tokenizers` library)
    image_token: str  # the token the runtime replaces by the K visual tokens (Qwen2.5-VL: "<|image_pad|>")
    image_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    prompt_template: str  # contains "{prompt}"; the user's prompt must contain `placeholder` once
    max_prompt_tokens: int  # text tokens of one prompt, the placeholder counted once
    max_sequence: int  # prompt (with K visual tokens) + generated tokens
    max_text_tokens: int  # content-word rows the selection graph accepts
    max_batch: int  # largest batch the graphs declare (engine profiles are built up to it)
    # What a user's prompt carries once, around image_token (Qwen2.5-VL: "<|vision_start|><|image_pad|><|vision_end|>").
    # Last and optional: manifests written before it load with "" (read `placeholder`, never this field directly).
    image_placeholder: str = ""
    # The source checkpoint's own chat template, a Jinja file of the artifact ("chat_template.jinja"), hashed in `files`
    # like every file. Optional: "" (manifests written before it, or a checkpoint without one) = the family's default.
    chat_template: str = ""

    @property
    def placeholder(self) -> str:
        """The image placeholder a prompt must contain once: image_placeholder, else (older manifests) image_token."""
        return self.image_placeholder or self.image_token


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class VariantSpec:
    """The artifact's graphs at one lower precision (fp16/bf16: cast weights + fp32 islands; int8/fp8: Q/DQ).

    graphs names every graph; one the variant leaves in fp32 points at the top-level fp32 file.
    """

    precision: str
    graphs: dict[str, GraphSpec]
    tool: str  # what wrote it, with its version: "prunert.export.precision", "onnxruntime.quantization 1.31.1", ...
    settings: dict[str, Any]  # islands / quantized op types / calibration set summary: enough to redo it


@dataclass(frozen=True)
class EngineSpec:
    """One TensorRT engine built from one graph of the artifact on one GPU (engines are not portable)."""

    graph: str  # "vision" / "decoder"
    precision: str
    file: str  # "engines/<graph>-<precision>-<key>.plan"
    cache_key: str  # sha256 of onnx + profiles + builder settings + TensorRT version + compute capability
    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100), ...
    device_name: str
    profiles: tuple[dict[str, Any], ...]  # {"name": ..., "shapes": {input: [min, opt, max]}}
    builder: dict[str, Any]  # EngineBuildConfig fields and anything else that went into the key
    build_seconds: float


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    prunert_version: str
    versions: dict[str, str]  # torch, transformers, onnx, onnxscript, ... at export time
    opset: int
    source: SourceSpec
    budget: BudgetSpec
    graphs: dict[str, GraphSpec]  # "vision", "decoder"
    text: TextSpec
    decoder: DecoderSpec
    image_preprocessor: str  # preprocessor_config.json (Hugging Face format)
    family_config: dict[str, Any] = field(default_factory=dict)  # adapter-owned, opaque to generic code
    variants: dict[str, VariantSpec] = field(default_factory=dict)  # precision -> graphs (schema 3)
    engines: tuple[EngineSpec, ...] = ()  # TensorRT engines built into this artifact (schema 3)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of every other file

    def graph_spec(self, graph: str, precision: str = "fp32") -> GraphSpec:
        """The graph to run at a precision; an ArtifactError names the command that makes a missing variant."""
        if graph not in self.graphs:
            raise ArtifactError(f"{MANIFEST_NAME}: no graph {graph!r}; the artifact has {sorted(self.graphs)}")
        if precision == "fp32":
            return self.graphs[graph]
        if precision not in self.variants:
            make = {"int8": "prunert calibrate ARTIFACT --images DIR --precision", "fp8": "prunert calibrate ARTIFACT --images DIR --precision",
                    "int4": "prunert quantize ARTIFACT --weights"}.get(precision, "prunert convert ARTIFACT --precision")
            raise ArtifactError(
                f"{MANIFEST_NAME}: no {precision} graphs (the artifact has {['fp32', *sorted(self.variants)]}); "
                f"make them with `{make} {precision}`"
            )
        if graph not in self.variants[precision].graphs:
            raise ArtifactError(f"{MANIFEST_NAME}: the {precision} variant has no graph {graph!r} (it has {sorted(self.variants[precision].graphs)})")
        return self.variants[precision].graphs[graph]

    def has_graph(self, graph: str, precision: str = "fp32") -> bool:
        """Whether graph_spec(graph, precision) exists: a variant lists only the graphs it made or points at fp32."""
        if precision == "fp32" or precision not in self.variants:
            return graph in self.graphs
        return graph in self.variants[precision].graphs

    def to_json(self) -> str:
        return json.dumps(_drop_empty_dim_ranges(asdict(self)), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise ArtifactError(f"{MANIFEST_NAME}: expected a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{MANIFEST_NAME}: 'schema_version' missing or not an integer")
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                f"{MANIFEST_NAME}: schema_version {version} is newer than this prunert supports "
                f"({SCHEMA_VERSION}); upgrade prunert or re-export"
            )
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ArtifactError(
                f"{MANIFEST_NAME}: schema_version {version} is older than this prunert reads ({list(READABLE_SCHEMA_VERSIONS)}); re-export the artifact"
            )
        if version < SCHEMA_VERSION:  # older readable schema: the fields it lacks keep their defaults
            unknown = sorted(set(data) & {"variants", "engines"})
            if unknown:
                raise ArtifactError(f"{MANIFEST_NAME}: schema_version {version} has no {unknown}")
            data = {**data, "schema_version": SCHEMA_VERSION}
        return _build(cls, data, "manifest")


def _drop_empty_dim_ranges(data: Any) -> Any:
    """An empty GraphSpec.dim_ranges and an unset kv_cache are left out of the JSON (manifests without them are unchanged)."""
    if isinstance(data, dict):
        return {k: _drop_empty_dim_ranges(v) for k, v in data.items() if not (k == "dim_ranges" and v == {}) and not (k == "kv_cache" and v is None)}
    if isinstance(data, list):
        return [_drop_empty_dim_ranges(v) for v in data]
    return data


def _build(cls: type, data: Any, where: str) -> Any:
    """Strictly build a dataclass tree from JSON: unknown or missing keys raise ArtifactError."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{MANIFEST_NAME}: '{where}' must be an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ArtifactError(f"{MANIFEST_NAME}: unknown key(s) {unknown} in '{where}'; expected only {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise ArtifactError(f"{MANIFEST_NAME}: missing key '{name}' in '{where}'")
        kwargs[name] = _convert(f.type, data[name], f"{where}.{name}")
    return cls(**kwargs)


_NESTED = {"SourceSpec": SourceSpec, "BudgetSpec": BudgetSpec, "TextSpec": TextSpec, "DecoderSpec": DecoderSpec}


_SCALARS = {"int": (int,), "str": (str,), "bool": (bool,), "float": (int, float)}


def _check_scalar(type_name: str, value: Any, where: str) -> None:
    """Reject JSON values of the wrong type ("48" for an int, a list for a string, ...)."""
    options = [option.strip() for option in type_name.split("|")]
    if value is None and "None" in options:
        return
    allowed = tuple(t for option in options for t in _SCALARS.get(option, ()))
    if not allowed:
        return  # containers are checked where they are built
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        raise ArtifactError(f"{MANIFEST_NAME}: '{where}' is {json.dumps(value)}, expected {type_name}")


def _convert(type_name: Any, value: Any, where: str) -> Any:
    type_name = str(type_name)
    _check_scalar(type_name, value, where)
    if type_name.startswith(("dict", "tuple")) and not isinstance(value, dict if type_name.startswith("dict") else list):
        raise ArtifactError(f"{MANIFEST_NAME}: '{where}' is {json.dumps(value)}, expected {type_name}")
    if type_name in _NESTED:
        return _build(_NESTED[type_name], value, where)
    if type_name == "dict[str, GraphSpec]":
        if not isinstance(value, dict):
            raise ArtifactError(f"{MANIFEST_NAME}: '{where}' must be an object")
        return {key: _graph(spec, f"{where}.{key}") for key, spec in value.items()}
    if type_name == "dict[str, VariantSpec]":
        return {key: _variant(spec, f"{where}.{key}") for key, spec in value.items()}
    if type_name == "tuple[EngineSpec, ...]":
        return tuple(_engine(spec, f"{where}[{i}]") for i, spec in enumerate(value))
    if type_name.startswith("tuple") and isinstance(value, list):
        return tuple(value)
    return value


def _graph(data: Any, where: str) -> GraphSpec:
    graph = _build(GraphSpec, data, where)
    inputs, outputs = (
        tuple(_build(TensorSpec, spec, f"{where}.{kind}") for spec in getattr(graph, kind))
        for kind in ("inputs", "outputs")
    )
    for tensor in (*inputs, *outputs):
        if not all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d) for d in tensor.shape):
            raise ArtifactError(f"{MANIFEST_NAME}: '{where}' tensor {tensor.name!r} has shape {json.dumps(list(tensor.shape))}, "
                                f"expected sizes >= 0 or symbolic dim names")
    ranges = {}
    for dim, triple in graph.dim_ranges.items():
        ok = isinstance(triple, list) and len(triple) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in triple)
        if not ok or not 0 <= triple[0] <= triple[1] <= triple[2]:
            raise ArtifactError(f"{MANIFEST_NAME}: '{where}.dim_ranges.{dim}' is {json.dumps(triple)}, expected [min, opt, max] ints, min <= opt <= max")
        ranges[dim] = tuple(triple)
    if graph.kv_cache not in KV_CACHE_LAYOUTS:
        raise ArtifactError(f"{MANIFEST_NAME}: '{where}.kv_cache' is {json.dumps(graph.kv_cache)}, expected one of {list(KV_CACHE_LAYOUTS)}")
    return GraphSpec(file=graph.file, inputs=inputs, outputs=outputs, external_data=graph.external_data, dim_ranges=ranges,
                     kv_cache=graph.kv_cache)


def _variant(data: Any, where: str) -> VariantSpec:
    variant = _build(VariantSpec, data, where)
    if not isinstance(variant.settings, dict):
        raise ArtifactError(f"{MANIFEST_NAME}: '{where}.settings' must be an object")
    return variant


def _engine(data: Any, where: str) -> EngineSpec:
    engine = _build(EngineSpec, data, where)
    if not all(isinstance(p, dict) for p in engine.profiles) or not isinstance(engine.builder, dict):
        raise ArtifactError(f"{MANIFEST_NAME}: '{where}': profiles must be objects and builder an object")
    return engine


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every file in the directory (recursively) except the manifest itself."""
    return {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def load_manifest(directory: Path, verify_hashes: bool = True) -> Manifest:
    """Read and check an artifact directory's manifest: every path it names inside the directory and listed in
    `files`, every listed file present; verify_hashes: and its sha256 as listed (False skips only the hashing)."""
    directory = Path(directory)
    from prunert.artifact_publish import recover_swap  # here, not at the top: artifact_publish reads manifests
    recover_swap(directory)  # an interrupted `export --overwrite` swap is undone first, with a note (one lstat if none)
    if not directory.is_dir():
        raise ArtifactError(f"artifact '{directory}': not a directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"artifact '{directory}': no {MANIFEST_NAME} (not a prunert artifact, or an interrupted export)")
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise ArtifactError(f"artifact '{directory}': {MANIFEST_NAME} is nested too deeply (expected at most {MAX_JSON_DEPTH} levels)") from None
    except (UnicodeDecodeError, ValueError, OSError) as exc:  # ValueError: JSONDecodeError, an int of over 4300 digits
        raise ArtifactError(f"artifact '{directory}': {MANIFEST_NAME} is not valid JSON ({exc})") from None
    try:
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ArtifactError(f"{MANIFEST_NAME} is nested too deeply (expected at most {MAX_JSON_DEPTH} levels)")
        manifest = Manifest.from_dict(data)
        check_contained(directory, manifest)
    except ArtifactError as exc:  # name the artifact directory, as every other artifact error does
        raise ArtifactError(f"artifact '{directory}': {exc}") from None
    verify_files(directory, manifest, hashes=verify_hashes)
    return manifest


def json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(value, (dict, list)):
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def referenced_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(manifest key, file name) of every file the manifest points the runtime and the tools at."""
    refs = [("text.tokenizer", manifest.text.tokenizer), ("text.embeddings", manifest.text.embeddings),
            ("image_preprocessor", manifest.image_preprocessor)]
    refs += [("text.chat_template", manifest.text.chat_template)] if manifest.text.chat_template else []
    graphs = [(f"graphs.{name}", spec) for name, spec in manifest.graphs.items()]
    graphs += [(f"variants.{p}.graphs.{name}", spec) for p, variant in manifest.variants.items() for name, spec in variant.graphs.items()]
    for where, spec in graphs:
        refs.append((f"{where}.file", spec.file))
        if spec.external_data is not None:
            refs.append((f"{where}.external_data", spec.external_data))
    return refs + [(f"engines[{i}].file", engine.file) for i, engine in enumerate(manifest.engines)]


def check_contained(directory: Path, manifest: Manifest) -> None:
    """Every name in `files` resolves inside the directory (no absolute path, no '..', no symlink out), and every
    file the manifest points at is one of them, so it is hashed. ArtifactError names the key and the path."""
    root = directory.resolve()
    for where, name in referenced_files(manifest) + [(f"files[{name!r}]", name) for name in manifest.files]:
        problem = _outside(root, name)
        if problem:
            raise ArtifactError(f"{MANIFEST_NAME} '{where}' is {json.dumps(name)}: {problem}; expected a file inside the artifact directory")
    for where, name in referenced_files(manifest):
        if name not in manifest.files:
            raise ArtifactError(f"{MANIFEST_NAME} '{where}' names {name!r}, which 'files' does not list with a sha256; re-export the artifact")
    for name, digest in manifest.files.items():
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ArtifactError(f"{MANIFEST_NAME} 'files[{name!r}]' is {json.dumps(digest)}, expected a sha256 (64 hex digits)")


def _outside(root: Path, name: str) -> str:
    """Why `name` is not a path inside root ("" when it is)."""
    if not name or "\0" in name:
        return "empty or with a NUL byte"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out with '..'"
    try:
        resolved = (root / name).resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        return "a symbolic link that never resolves (a loop)"
    if resolved == root / MANIFEST_NAME:
        return "the manifest itself"
    if resolved == root or not resolved.is_relative_to(root):
        return f"resolves to '{resolved}' (a symbolic link out of the directory)"
    return ""


def verify_files(directory: Path, manifest: Manifest, hashes: bool = True) -> None:
    """Every listed file is present (always) and, with hashes, has the listed sha256."""
    for name, expected in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact '{directory}': file '{name}' listed in {MANIFEST_NAME} is missing")
        if hashes and (actual := sha256_file(path)) != expected:
            raise ArtifactError(
                f"artifact '{directory}': file '{name}' sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}... (changed after export); re-export the artifact"
            )
