"""`prunert sweep`: export every (method, K) of a model, evaluate each on one question set, write a table and plots.

    DIR/.prunert-sweep          marks DIR as a sweep folder (an existing DIR without it is never written to)
    DIR/artifacts/<name>/       one artifact per point (reused on a rerun when its manifest matches the point)
    DIR/sweep.json              {"model", "data", "points": [{"name", "method", "budget", "params", "artifact",
                                 "accuracy", "ci95", "relative", "by_category", "ttft_s", "decode_tok_s"}]}
    DIR/sweep.md                accuracy per method x K (markdown)
    DIR/accuracy_vs_k.png       one line per method (the unpruned accuracy as a dashed line)
    DIR/accuracy_vs_ttft.png    every point, accuracy against mean TTFT
The unpruned artifact (the registry's keeps_all method) is always evaluated as the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from prunert import pruning_ops
from prunert.adapters import ModelSource, resolve_source
from prunert.artifact_publish import write_atomically
from prunert.config import BudgetConfig, ExportConfig
from prunert.errors import ArtifactError, ConfigError
from prunert.evaluation.data import EvalRecord
from prunert.evaluation.report import ArtifactResult
from prunert.evaluation.runner import EvalConfig, evaluate_artifact

MARKER = ".prunert-sweep"
RESULTS_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepPoint:
    """One artifact of a sweep: a method at a budget with its parameters; `tag` names a parameter variant."""

    budget: BudgetConfig
    tag: str = ""
    series: str = field(default="")  # the line it belongs to in the accuracy-vs-K plot (default: the method)

    @property
    def name(self) -> str:
        return f"{self.budget.method}-k{self.budget.budget}" + (f"-{self.tag}" if self.tag else "")

    @property
    def line(self) -> str:
        return self.series or self.budget.method


@dataclass
class SweepResult:
    point: SweepPoint
    result: ArtifactResult
    relative: float | None

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"name": self.point.name, "series": self.point.line, "method": self.point.budget.method,
                "budget": self.point.budget.budget, "params": pruning_ops.method_params(self.point.budget),
                "artifact": r.artifact, "accuracy": r.accuracy, "ci95": list(r.ci95), "relative": self.relative,
                "by_category": r.by_category, "ttft_s": r.ttft_s, "decode_tok_s": r.decode_tok_s}


def grid(methods: Sequence[str], budgets: Sequence[int]) -> list[SweepPoint]:
    """Every (method, K) with the method's default parameters; the unpruned method appears once, at K = N
    (filled in by run_sweep), whatever the budgets."""
    for method in methods:
        pruning_ops.method_spec(method)  # unknown method -> ConfigError naming the registry's methods
    return [SweepPoint(BudgetConfig(budget=k, method=m)) for m in methods if not pruning_ops.method_spec(m).keeps_all
            for k in budgets]


def prepare_out(out: Path) -> Path:
    """Create DIR (or reuse a sweep folder); anything else at DIR is refused, never written into."""
    out = Path(out).expanduser().absolute()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: is not a directory; expected a new or an earlier sweep folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"--out {out}: exists and is not a prunert sweep folder (no {MARKER}); choose a new directory")
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("prunert sweep folder\n", encoding="utf-8")
    return out


def ensure_artifact(model: str, revision: str, path: Path, budget: BudgetConfig, export_cfg: ExportConfig,
                    log: Callable[[str], None]) -> None:
    """Export `budget` of `model` to `path`, unless `path` already holds that very export (same checkpoint
    revision, method, K and parameters): a rerun of a sweep reuses what it already exported."""
    from prunert.export.pipeline import export_artifact
    from prunert.manifest import load_manifest

    if path.is_dir():
        try:
            manifest = load_manifest(path)
        except (ArtifactError, OSError):
            manifest = None
        if (manifest is not None and manifest.source.revision == revision
                and manifest.budget.method == budget.method and manifest.budget.budget == budget.budget
                and manifest.budget.params == pruning_ops.method_params(budget)):
            log(f"reusing {path}")
            return
    export_artifact(model, path, budget, export_cfg, overwrite=path.exists(), log=log)


def checked_points(source: ModelSource, points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """The unpruned baseline of the checkpoint (the registry's keeps_all method at K = N) then `points`, each
    checked against it (K < N, a [CLS] the method needs) before anything is exported."""
    from prunert.export.pipeline import fit_budget, load_export_adapter

    method = next(m for m in pruning_ops.methods() if pruning_ops.method_spec(m).keeps_all)
    adapter = load_export_adapter(source)
    baseline = SweepPoint(BudgetConfig(budget=adapter.num_visual_tokens, method=method))
    ordered = [baseline] + [p for p in points if p.name != baseline.name]
    names = [p.name for p in ordered]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points: duplicate names {sorted({n for n in names if names.count(n) > 1})}; give variants a tag")
    for point in ordered:
        fit_budget(adapter, point.budget)
    return ordered


def run_sweep(model: str, points: Sequence[SweepPoint], records: Sequence[EvalRecord], out: Path,
              eval_cfg: EvalConfig = EvalConfig(), export_cfg: ExportConfig = ExportConfig(),
              log: Callable[[str], None] = print, progress: bool = True) -> list[SweepResult]:
    """Export and evaluate the unpruned baseline, then every point; results in `points` order (baseline first)."""
    source = resolve_source(model)  # once: its revision tells a reusable artifact (checkpoint_revision reads the weights)
    ordered = checked_points(source, points)
    out = prepare_out(out)
    results: list[SweepResult] = []
    for point in ordered:
        path = out / "artifacts" / point.name
        ensure_artifact(model, source.revision, path, point.budget, export_cfg, log)
        result = evaluate_artifact(path, records, eval_cfg, progress=progress)
        results.append(SweepResult(point, result, result.relative_to(results[0].result) if results else None))
        log(f"{point.name}: accuracy {result.accuracy:.1%}")
    write_outputs(out, model, records, results)
    return results


def write_outputs(out: Path, model: str, records: Sequence[EvalRecord], results: list[SweepResult]) -> None:
    from prunert.evaluation.plots import plot_accuracy_vs_k, plot_accuracy_vs_ttft

    payload = {"model": model, "questions": len(records), "points": [r.to_json() for r in results]}
    write_atomically(out / RESULTS_FILE, json.dumps(payload, indent=2) + "\n")
    write_atomically(out / "sweep.md", sweep_table(results) + "\n")
    plot_accuracy_vs_k(results, out / "accuracy_vs_k.png")
    plot_accuracy_vs_ttft(results, out / "accuracy_vs_ttft.png")


def sweep_table(results: list[SweepResult]) -> str:
    """Markdown: one row per series, one column per K, accuracy in percent (the unpruned row first)."""
    budgets = sorted({r.point.budget.budget for r in results[1:]})
    rows = [f"| method | {' | '.join(f'K={k}' for k in budgets)} |", "|---|" + "---:|" * len(budgets)]
    base = results[0]
    rows.append(f"| {base.point.budget.method} (K={base.point.budget.budget}) | "
                + " | ".join(f"{base.result.accuracy:.1%}" for _ in budgets) + " |")
    series: dict[str, dict[int, float]] = {}
    for r in results[1:]:
        series.setdefault(r.point.line, {})[r.point.budget.budget] = r.result.accuracy
    for line, by_k in series.items():
        rows.append(f"| {line} | " + " | ".join(f"{by_k[k]:.1%}" if k in by_k else "" for k in budgets) + " |")
    return "\n".join(rows)
