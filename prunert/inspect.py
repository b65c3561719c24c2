"""A manifest as a readable table (standard library only); `image_tokens`: what one image costs in visual tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from prunert.artifact_publish import Leftover
from prunert.manifest import Manifest

if TYPE_CHECKING:
    from prunert.runtime.artifact import Artifact


@dataclass(frozen=True)
class ImageTokens:
    """`prunert inspect A --image x.jpg`: the visual tokens one image gives an artifact, before and after pruning."""

    image: str
    width: int
    height: int
    visual_tokens: int  # N: the image's own (Qwen2.5-VL: its resized grid; LLaVA-NeXT: its valid tile tokens)
    kept: int  # spliced into the prompt: min(K, N) (the unpruned baseline: N)
    budget: int  # K of the manifest
    method: str

    def line(self) -> str:
        return (f"{self.image} ({self.width} x {self.height}): {self.visual_tokens} visual tokens before pruning, "
                f"{self.kept} after ({self.method}, K={self.budget})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_tokens(artifact: Artifact, images: Sequence[str | Path]) -> list[ImageTokens]:
    """Each image through the artifact's own preprocessing (its host adapter, the artifact's preprocessor_config.json):
    N from the host's visual_token_counts, kept = min(K, N) (a masked slot kept beyond an image's N is left out of the
    splice), or N for the unpruned baseline (--method none). No graph runs."""
    from prunert import pruning_ops
    from prunert.runtime.image import load_image

    manifest, host = artifact.manifest, artifact.host
    budget, keeps_all = manifest.budget.budget, pruning_ops.method_spec(manifest.budget.method).keeps_all
    rows = []
    for path in images:
        picture = load_image(path)
        count = int(host.visual_token_counts(host.vision_inputs([picture], artifact.preprocessor_config), 1)[0])
        rows.append(ImageTokens(str(path), picture.width, picture.height, count, count if keeps_all else min(budget, count), budget,
                                manifest.budget.method))
    return rows


def precision_table(m: Manifest) -> list[str]:
    """Per graph, the file it runs at each precision the artifact has (`--precision vision=P,decoder=P` picks one per
    role): "= fp32" where the variant keeps the top-level fp32 file, "-" where the variant has no such graph."""
    graphs = list(dict.fromkeys([*m.graphs, *(g for v in m.variants.values() for g in v.graphs)]))
    precisions = ["fp32", *sorted(m.variants)]

    def cell(graph: str, precision: str) -> str:
        if precision == "fp32":
            return m.graphs[graph].file if graph in m.graphs else "-"
        spec = m.variants[precision].graphs.get(graph)
        if spec is None:
            return "-"
        return "= fp32" if graph in m.graphs and spec.file == m.graphs[graph].file else spec.file

    rows = [("graph", *precisions)] + [(graph, *(cell(graph, p) for p in precisions)) for graph in graphs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return ["precision per graph ('= fp32': the variant runs the fp32 file; --precision vision=P,decoder=P picks one per role)"] + table


def manifest_table(m: Manifest, leftovers: Sequence[Leftover] = ()) -> str:
    """The manifest as a table; `leftovers` (artifact_publish.leftovers) as a last section when there are any."""
    lines = [
        f"artifact schema {m.schema_version}, prunert {m.prunert_version}, opset {m.opset}",
        f"source        {m.source.model} ({m.source.architecture}, family {m.source.family})"
        + ("  [SYNTHETIC: seeded random weights]" if m.source.synthetic else "")
        + (f"  [{m.source.note}]" if m.source.note else ""),
        f"budget        K={m.budget.budget} of N={m.budget.num_visual_tokens} visual tokens, method {m.budget.method} "
        + " ".join(f"{k}={v}" for k, v in sorted(m.budget.params.items())),
        f"decoder       {m.decoder.num_layers} layers, hidden {m.decoder.hidden_size}, kv heads {m.decoder.num_kv_heads} x {m.decoder.head_dim}, vocab {m.decoder.vocab_size}",
        f"text          template {m.text.prompt_template!r}, prompt placeholder {m.text.placeholder!r}, image token {m.text.image_token!r}={m.text.image_token_id}, "
        f"max prompt {m.text.max_prompt_tokens}, max sequence {m.text.max_sequence}, max batch {m.text.max_batch}",
        "versions      " + ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())),
        "",
    ]
    rows = [("graph", "io", "name", "dtype", "shape")]
    for graph_name, graph in m.graphs.items():
        for kind, tensors in (("in", graph.inputs), ("out", graph.outputs)):
            for t in tensors:
                rows.append((f"{graph_name} ({graph.file})", kind, t.name, t.dtype, t.describe()))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", "precisions    fp32 (exported)"]
    for precision, variant in sorted(m.variants.items()):
        files = ", ".join(f"{graph}={spec.file}" for graph, spec in sorted(variant.graphs.items()))
        lines.append(f"              {precision} by {variant.tool}: {files}")
    lines += ["", *precision_table(m)]
    if m.engines:
        lines += ["", "TensorRT engines (not portable: each runs only on its TensorRT version and GPU)"]
        for e in m.engines:
            lines.append(f"  {e.graph:<8} {e.precision:<5} TensorRT {e.tensorrt_version}, sm {e.compute_capability} ({e.device_name}), "
                         f"{len(e.profiles)} profile(s), built in {e.build_seconds:.0f} s: {e.file}")
    lines += ["", "files"] + [f"  {name:<28} sha256 {digest[:16]}..." for name, digest in sorted(m.files.items())]
    if leftovers:
        lines += ["", "leftovers (not part of the artifact)"] + [f"  {leftover.line()}" for leftover in leftovers]
    return "\n".join(lines)
