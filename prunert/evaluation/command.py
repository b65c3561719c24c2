"""`prunert eval ARTIFACT [ARTIFACT...] --data questions.jsonl ...`: the subcommand's flags and its run.

Everything cheap is checked before the first artifact runs: flags, every record (data.load_records), every
artifact's manifest, the --out path, and with --reference hf that the artifacts come from one checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from prunert.config import GRAPH_NAMES, GraphPrecisions
from prunert.errors import ConfigError
from prunert.evaluation.data import check_limit, load_records
from prunert.evaluation.report import OUT_KEYS, ArtifactResult, category_table, results_table, write_results
from prunert.evaluation.runner import EvalConfig, evaluate_artifact

OUT_FILE = ("--out", OUT_KEYS, "a `prunert eval` results file")  # what --out may replace (artifact_publish.replace_file)
REFERENCES = ("hf",)


def add_eval_parser(sub: Any, add_backend_flags: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    defaults = EvalConfig()
    p = sub.add_parser("eval", help="accuracy of artifacts on a JSONL question set (exact match, 95%% Wilson interval; no torch needed)")
    p.add_argument("artifact", type=Path, nargs="+", help="artifact directories; one table row each, in this order")
    p.add_argument("--data", type=Path, required=True,
                   help='JSONL, one record a line: {"image": path (relative to the file, or absolute), "question": ..., "answer": ...}; '
                   'optional "answers": [...] (any counts) and "category" (per-category breakdown); "images": [path, ...] in place '
                   'of "image" for a question about several images (LLaVA-NeXT, Qwen2.5-VL: one prompt holds them all)')
    p.add_argument("--limit", type=int, help="evaluate only the first N records (default: all)")
    p.add_argument("--batch", type=int, default=defaults.batch,
                   help="records per generate call (default %(default)s); silently capped at each artifact's max_batch")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="greedy tokens per answer (default %(default)s; capped by the artifact's max_sequence)")
    add_backend_flags(p)  # --backend, --precision (per graph), --threads, --spin
    p.add_argument("--out", type=Path, help="write every prediction and the summary as JSON here (default: not written)")
    p.add_argument("--reference", choices=REFERENCES,
                   help="hf: also run the PyTorch checkpoint the artifacts were exported from (needs prunert[export]; default: not run)")
    p.add_argument("--model", help="--reference hf: the checkpoint, if it moved since export (default: the manifest's source)")
    return p


def run_eval(args: argparse.Namespace, source_note: Callable[[Any], str | None]) -> int:
    """The command; source_note(manifest.source) is the line `prunert run` prints about the model (None: nothing)."""
    from prunert.artifact_publish import refuse_unless_replaceable_file, replace_file
    from prunert.cli import runtime_config

    cfg = EvalConfig(batch=args.batch, backend=args.backend, precision=args.precision, runtime=runtime_config(args),
                     max_new_tokens=args.max_new_tokens)
    check_limit(args.limit)
    if args.model is not None and args.reference is None:
        raise ConfigError("--model: applies to --reference hf only (the checkpoint it runs)")
    if args.out is not None:
        if not Path(args.out).parent.is_dir():
            raise ConfigError(f"--out '{args.out}': its directory does not exist; expected a file path in an existing directory")
        refuse_unless_replaceable_file(args.out, *OUT_FILE)  # before the long run
    records = load_records(args.data, args.limit)
    manifests = [opened_manifest(Path(a), cfg.precision) for a in args.artifact]
    model = reference_model(args, manifests) if args.reference else None
    notes = [reference_note(model, manifests[0])] if model is not None else []  # resolves the checkpoint: a bad one fails now
    if model is not None:
        from prunert.evaluation.reference import check_reference_available

        check_reference_available()
    reference = None
    if model is not None:  # first: a checkpoint or processor that does not load fails before the artifacts' long run
        from prunert.evaluation.reference import evaluate_reference

        reference = evaluate_reference(model, records, cfg, manifests[0].budget.num_visual_tokens, manifests[0].source)
    results = [evaluate_artifact(a, records, cfg) for a in args.artifact]
    print(results_table(results, reference))
    breakdown = category_table(results, reference)
    if breakdown:
        print("\naccuracy by category")
        print(breakdown)
    if reference is not None:
        print(agreement_line(results, reference))
    for note in dict.fromkeys(notes + [source_note(m.source) for m in manifests]):
        if note:
            print(note)
    if args.out is not None:
        replace_file(args.out, lambda temp: write_results(temp, results, reference), *OUT_FILE)
        print(f"results: {args.out}")
    return 0


def opened_manifest(artifact: Path, precision: GraphPrecisions):
    """The artifact's manifest, checked before any artifact runs (hashes are verified when it runs): a bad
    artifact, or one without a graph at its role's precision, fails now, in one line naming it."""
    from prunert.errors import ArtifactError
    from prunert.manifest import load_manifest

    manifest = load_manifest(artifact, verify_hashes=False)
    try:
        for role in GRAPH_NAMES:  # each role's standard graph: every variant has it (the fused decoder is used where it also exists)
            manifest.graph_spec(role, precision.of(role))
    except ArtifactError as exc:
        raise ArtifactError(f"artifact '{artifact}': {exc}") from None
    return manifest


def reference_model(args: argparse.Namespace, manifests: list) -> str:
    """The one checkpoint --reference hf runs: --model, else the artifacts' common manifest source.model."""
    sources = list(dict.fromkeys((m.source.model, m.source.revision) for m in manifests))
    if len(sources) > 1:
        listed = ", ".join(f"{model} (revision {revision})" for model, revision in sources)
        raise ConfigError(f"--reference hf: the artifacts come from {len(sources)} checkpoints ({listed}); expected one, "
                          "run `prunert eval` once per checkpoint")
    counts = {m.budget.num_visual_tokens for m in manifests}
    if len(counts) > 1:
        raise ConfigError(f"--reference hf: the artifacts' models give {sorted(counts)} visual tokens per image; expected one model")
    return args.model or sources[0][0]


def reference_note(model: str, manifest) -> str | None:
    """Resolve the reference checkpoint now (a bad --model fails before any artifact runs); a note when its weights
    are not the ones the artifacts were exported from (revision differs: prunert.adapters.checkpoint_revision)."""
    from prunert.adapters import resolve_source

    revision = resolve_source(model).revision
    if revision == manifest.source.revision:
        return None
    return (f"note: the reference checkpoint {model} (revision {revision}) is not the one the artifacts were exported from "
            f"(revision {manifest.source.revision}): predictions need not agree")


def agreement_line(results: list[ArtifactResult], reference: ArtifactResult) -> str:
    """How many records each artifact answers exactly as the reference does (identical text, before normalisation)."""
    parts = []
    for number, result in enumerate(results, start=1):
        same = sum(a.prediction == b.prediction for a, b in zip(result.predictions, reference.predictions))
        parts.append(f"#{number} {same}/{len(reference.predictions)}")
    return "predictions identical to the reference: " + ", ".join(parts)
