"""TensorRT optimization profiles derived from an artifact's manifest (pure Python, no TensorRT).

Every input of a graph gets (min, opt, max) shapes with every dim resolved: static dims come from the
manifest's tensor specs, symbolic dims from the table below.

vision (one profile, "vision"):
    batch     1 .. max_batch, opt = opt_batch (graphs with a batch axis)
    text      1 .. text.max_text_tokens, opt = min(TEXT_OPT, max). The runtime does NOT pad to
              max_text_tokens: `prunert.runtime.text.text_relevance_inputs` pads the batch to its longest
              prompt's content-word count (at least 1, at most max_text_tokens), so typical widths are a
              handful of words; TEXT_OPT = 8 covers the usual VQA question.
decoder (two profiles; the runtime picks the one whose ranges hold the step's shapes):
    "context"     prefill: sequence 1 .. max_seq, past 0 .. 0, total = sequence.
                  opt sequence = K + min(max_prompt_tokens - 1, PROMPT_OPT): one image plus a short prompt.
    "generation"  decode: sequence 1 .. 1, past 1 .. max_seq - 1, total 2 .. max_seq (= past + 1).
                  opt past = halfway between the context opt and max_seq - 1.
    Every (min, opt, max) triple is itself consistent (total = past + sequence), so the builder never
    sees a shape combination the graph cannot run.
any graph: symbolic dims the adapter bounds are recorded with their (min, opt, max) in the manifest's graph
    spec (`dim_ranges`, e.g. Qwen2.5-VL's one-image vision graph: merged tokens N and patches P = 4 N, the
    triples consistent with each other) and used as recorded, in every profile of that graph.

Empty past (past = 0 in the "context" profile): TensorRT supports empty tensors (TensorRT Developer Guide,
"Working with Empty Tensors": a tensor with a zero-length dim is legal, zero lengths follow the rules of
positive ones, and an empty engine binding still needs memory: the runner always binds an allocated
buffer). TensorRT 10's own API-usage error ("bound to nullptr, which is allowed only for an empty input
tensor, ...") confirms empty inputs. Not yet run on a GPU here; if a TensorRT release rejected a
zero-length profile dim, the alternative is a one-slot dummy past (past = 1, its attention_mask 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from prunert.config import EngineBuildConfig, GRAPH_NAMES
from prunert.errors import ArtifactError, ConfigError
from prunert.manifest import GraphSpec, Manifest

Shape = tuple[int, ...]
TEXT_OPT = 8
PROMPT_OPT = 32


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes, in the graph's input order."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        """The manifest / cache-key form: {"name": ..., "shapes": {input: [min, opt, max]}}."""
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        try:
            shapes = {
                str(name): tuple(tuple(int(d) for d in shape) for shape in triple)  # type: ignore[misc]
                for name, triple in dict(data["shapes"]).items()
            }
            if any(len(triple) != 3 for triple in shapes.values()):
                raise ValueError("expected [min, opt, max]")
            return cls(str(data["name"]), shapes)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"engine profile {dict(data)!r}: not a profile ({exc})") from None

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """True if every input shape lies within this profile's [min, max] (same inputs, same ranks)."""
        if set(shapes) != set(self.shapes):
            return False
        for name, shape in shapes.items():
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
        return True

    def max_shape(self, name: str) -> Shape:
        return self.shapes[name][2]


@dataclass(frozen=True)
class Limits:
    """The resolved sizes an engine is built for."""

    max_batch: int
    opt_batch: int
    max_seq: int
    max_text: int


def resolve_limits(manifest: Manifest, config: EngineBuildConfig) -> Limits:
    """--max-batch / --max-seq default to the manifest's maxima and may not exceed them."""
    text = manifest.text
    max_batch = text.max_batch if config.max_batch is None else config.max_batch
    max_seq = text.max_sequence if config.max_seq is None else config.max_seq
    if max_batch > text.max_batch:
        raise ConfigError(f"--max-batch: got {max_batch}, expected at most {text.max_batch} (the artifact's exported maximum batch)")
    if max_seq > text.max_sequence:
        raise ConfigError(
            f"--max-seq: got {max_seq}, expected at most {text.max_sequence} (the artifact's exported maximum sequence)"
        )
    shortest = manifest.budget.budget + 2  # K visual tokens, one text token, one generated token
    if max_seq < shortest:
        raise ConfigError(
            f"--max-seq: got {max_seq}, expected at least {shortest} (K={manifest.budget.budget} visual tokens, "
            f"one text token and one generated token)"
        )
    if not 1 <= config.opt_batch <= max_batch:
        raise ConfigError(f"--opt-batch: got {config.opt_batch}, expected 1 <= opt batch <= {max_batch} (the max batch)")
    return Limits(max_batch=max_batch, opt_batch=config.opt_batch, max_seq=max_seq, max_text=text.max_text_tokens)


DimRanges = dict[str, tuple[int, int, int]]


def dim_ranges(manifest: Manifest, graph: str, limits: Limits) -> list[tuple[str, DimRanges]]:
    """(profile name, symbolic dim -> (min, opt, max)) per profile of a graph."""
    batch = (1, limits.opt_batch, limits.max_batch)
    own: DimRanges = dict(manifest.graphs[graph].dim_ranges) if graph in manifest.graphs else {}  # the fp32 spec's
    if graph == "vision":
        return [("vision", {"batch": batch, "text": (1, min(TEXT_OPT, limits.max_text), limits.max_text), **own})]
    if graph == "decoder":
        top = limits.max_seq
        opt_context = max(1, min(top, manifest.budget.budget + min(manifest.text.max_prompt_tokens - 1, PROMPT_OPT)))
        opt_past = max(1, min(top - 1, (opt_context + top - 1) // 2))
        context = {"batch": batch, "sequence": (1, opt_context, top), "past": (0, 0, 0), "total": (1, opt_context, top)}
        generation = {"batch": batch, "sequence": (1, 1, 1), "past": (1, opt_past, top - 1), "total": (2, opt_past + 1, top)}
        return [("context", {**context, **own}), ("generation", {**generation, **own})]
    raise ConfigError(f"graph: got {graph!r}, expected one of {list(GRAPH_NAMES)}")


def derive_profiles(manifest: Manifest, graph: str, config: EngineBuildConfig) -> list[Profile]:
    """The optimization profiles of one graph at config.precision, every dim resolved and checked."""
    limits = resolve_limits(manifest, config)
    spec = manifest.graph_spec(graph, config.precision)
    profiles = []
    for name, ranges in dim_ranges(manifest, graph, limits):
        shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
        for tensor in spec.inputs:
            resolved = []
            for dim in tensor.shape:
                if isinstance(dim, str):
                    if dim not in ranges:
                        raise ArtifactError(
                            f"{spec.file}: input '{tensor.name}' has symbolic dim {dim!r}, for which no "
                            f"{graph} profile range is defined (known: {sorted(ranges)})"
                        )
                    resolved.append(ranges[dim])
                else:
                    resolved.append((dim, dim, dim))
            shapes[tensor.name] = tuple(tuple(r[i] for r in resolved) for i in range(3))  # type: ignore[assignment]
        profiles.append(Profile(name, shapes))
    check_profiles(spec, profiles)
    return profiles


def check_profiles(spec: GraphSpec, profiles: Sequence[Profile]) -> None:
    """Each profile covers exactly the graph's inputs with matching ranks and static dims, min <= opt <= max,
    and every symbolic dim has one range across the inputs that share it."""
    if not profiles:
        raise ArtifactError(f"{spec.file}: no optimization profiles")
    expected = [t.name for t in spec.inputs]
    for profile in profiles:
        where = f"{spec.file}: profile '{profile.name}'"
        if sorted(profile.shapes) != sorted(expected):
            raise ArtifactError(f"{where}: covers inputs {sorted(profile.shapes)}, expected {sorted(expected)}")
        ranges: dict[str, tuple[tuple[int, int, int], str]] = {}
        for tensor in spec.inputs:
            low, opt, high = profile.shapes[tensor.name]
            if not len(low) == len(opt) == len(high) == len(tensor.shape):
                raise ArtifactError(f"{where}: input '{tensor.name}' has rank {len(low)}, expected {len(tensor.shape)} {tensor.describe()}")
            for axis, (dim, lo, op, hi) in enumerate(zip(tensor.shape, low, opt, high)):
                if not 0 <= lo <= op <= hi:
                    raise ArtifactError(f"{where}: input '{tensor.name}' dim {axis}: expected 0 <= min <= opt <= max, got {lo}, {op}, {hi}")
                if isinstance(dim, int):
                    if (lo, op, hi) != (dim, dim, dim):
                        raise ArtifactError(f"{where}: input '{tensor.name}' dim {axis} is static {dim}, got range {lo}..{hi} (opt {op})")
                    continue
                seen = ranges.setdefault(dim, ((lo, op, hi), tensor.name))
                if seen[0] != (lo, op, hi):
                    raise ArtifactError(
                        f"{where}: dim {dim!r} is {lo}..{hi} (opt {op}) in input '{tensor.name}' but "
                        f"{seen[0][0]}..{seen[0][2]} (opt {seen[0][1]}) in input '{seen[1]}'"
                    )


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the first profile whose ranges hold every input shape, or -1."""
    for index, profile in enumerate(profiles):
        if profile.contains(shapes):
            return index
    return -1
