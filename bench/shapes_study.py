"""Accuracy of every selection method, ResPrune's alpha and every precision on `synthetic:llava-shapes`.

    python bench/shapes_study.py [--out build/shapes-study] [--count 1000] [--budgets 8,16,32,64]

One `prunert sweep` (prunert.evaluation.sweep.run_sweep) over the seven methods at every K plus ResPrune at
alpha 0, 0.5, 2, 4 (alpha 1 is the default `resprune` line), on a held-out shapes set (seed 0). Then the unpruned
and ResPrune K=64 artifacts get fp16 / bf16 graphs (`prunert convert`) and int8 / fp8 Q/DQ graphs (`prunert
calibrate` on 32 training-distribution scenes, seed 99) and each precision is evaluated on the same set (ONNX
Runtime, CPU; bf16 graphs, which the CPU provider cannot run, are recorded with the error). Writes bench/results/shapes_study.json and the README's figures in docs/images/; prints the tables.
The model is a demonstration trained on generated shapes, not a general VLM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prunert.config import BudgetConfig, ResPruneConfig, RuntimeConfig  # noqa: E402
from prunert.errors import PrunertError  # noqa: E402
from prunert.evaluation import EvalConfig, evaluate_artifact, load_records  # noqa: E402
from prunert.evaluation.plots import plot_accuracy_vs_k, plot_accuracy_vs_ttft  # noqa: E402
from prunert.evaluation.sweep import SweepPoint, grid, run_sweep, sweep_table  # noqa: E402
from prunert.shapes.dataset import write_eval_set  # noqa: E402

MODEL = "synthetic:llava-shapes"
METHODS = ("resprune", "uniform", "random", "cls_attention", "visionzip", "divprune", "cdpruner")
ALPHAS = (0.0, 0.5, 2.0, 4.0)  # beside the default 1.0
PRECISIONS = ("fp16", "bf16", "int8", "fp8")
CALIBRATION_SEED, CALIBRATION_COUNT = 99, 32


def alpha_points(budgets: list[int]) -> list[SweepPoint]:
    return [SweepPoint(BudgetConfig(budget=k, method="resprune", params=ResPruneConfig(alpha=a)), tag=f"alpha{a:g}",
                       series=f"resprune alpha={a:g}") for a in ALPHAS for k in budgets]


def calibration_inputs(out: Path) -> tuple[Path, Path]:
    """(images dir, prompts file) of 32 scenes with one question each, a seed apart from the eval set."""
    questions = write_eval_set(out / "calibration", CALIBRATION_COUNT, CALIBRATION_SEED, overwrite=True)
    prompts = out / "calibration-prompts.txt"
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    prompts.write_text("".join(f"<image> {row['question']}\n" for row in rows))
    return questions.parent / "images", prompts


def precision_rows(artifacts: list[Path], records, cfg: EvalConfig, out: Path) -> list[dict]:
    images, prompts = calibration_inputs(out)
    rows = []
    for artifact in artifacts:
        for precision in PRECISIONS:
            command = (["convert", str(artifact), "--precision", precision] if precision in ("fp16", "bf16") else
                       ["calibrate", str(artifact), "--precision", precision, "--images", str(images), "--prompts", str(prompts)])
            done = subprocess.run([sys.executable, "-m", "prunert", *command], capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"artifact": artifact.name, "precision": precision, "error": done.stderr.strip().splitlines()[-1:]})
                print(f"{artifact.name} {precision}: {rows[-1]['error']}", file=sys.stderr)
                continue
            try:
                result = evaluate_artifact(artifact, records, EvalConfig(batch=cfg.batch, runtime=cfg.runtime, precision=precision))
            except PrunertError as exc:  # bf16 graphs are for TensorRT: ONNX Runtime's CPU provider lacks bf16 kernels
                rows.append({"artifact": artifact.name, "precision": precision, "error": str(exc)})
                print(f"{artifact.name} {precision}: {exc}", file=sys.stderr)
                continue
            rows.append({"artifact": artifact.name, "precision": precision, "accuracy": result.accuracy,
                         "ci95": list(result.ci95), "by_category": result.by_category, "ttft_s": result.ttft_s})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "shapes-study")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--budgets", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-precisions", action="store_true", help="skip the precision rows")
    args = parser.parse_args()
    budgets = [int(k) for k in args.budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_eval_set(args.out / "eval", args.count, 0, overwrite=True)
    records = load_records(data)
    cfg = EvalConfig(batch=8, runtime=RuntimeConfig(threads=args.threads))
    results = run_sweep(MODEL, grid(METHODS, budgets) + alpha_points(budgets), records, args.out / "sweep", cfg)
    base, rest = results[0], results[1:]
    methods = [r for r in rest if not r.point.tag]
    alphas = sorted((r for r in rest if r.point.budget.method == "resprune"), key=lambda r: r.point.budget.params.alpha)
    images = ROOT / "docs" / "images"
    plot_accuracy_vs_k([base] + methods, images / "shapes-accuracy-vs-k.png",
                       f"synthetic:llava-shapes, {len(records)} held-out questions, ORT fp32")
    plot_accuracy_vs_k([base] + [_as_alpha_series(r) for r in alphas], images / "shapes-alpha.png",
                       "ResPrune's alpha (relevance weight r^alpha)")
    plot_accuracy_vs_ttft([base] + methods, images / "shapes-accuracy-vs-ttft.png")
    print(sweep_table([base] + methods))
    print()
    print(sweep_table([base] + [_as_alpha_series(r) for r in alphas]))
    payload = {"model": MODEL, "questions": len(records), "points": [r.to_json() for r in results]}
    if not args.no_precisions:
        artifacts = [Path(base.result.artifact)] + [Path(r.result.artifact) for r in methods
                                                    if r.point.budget.method == "resprune" and r.point.budget.budget == max(budgets)]
        payload["precisions"] = precision_rows(artifacts, records, cfg, args.out)
        for row in payload["precisions"]:
            print(f"{row['artifact']:>16} {row['precision']:>5} " + (f"{row['accuracy']:.1%}" if "accuracy" in row else str(row["error"])))
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "shapes_study.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _as_alpha_series(result):
    """The default `resprune` line relabelled as alpha=1 for the ablation figure."""
    from dataclasses import replace

    if result.point.tag:
        return result
    return replace(result, point=replace(result.point, series="resprune alpha=1 (default)"))


if __name__ == "__main__":
    raise SystemExit(main())
