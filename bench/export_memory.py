"""Peak RSS of `prunert export` against the checkpoint's own bytes, before and after issue 12's memory work.

Each point exports one synthetic LLaVA checkpoint in a fresh subprocess and reads the child's VmHWM (peak resident
set) from /proc/self/status at exit. Checkpoints: synthetic:llava-tiny, synthetic:llava-1.5-shaped (CLIP ViT-L/14-336
+ a 0.47B Llama) and a CLIP-L + 1.26B Llama point (TinyLlama-shaped decoder, 22 layers; built here from a config,
not a public preset), each written at fp32 and at fp16 (the fp16 copy has config.json torch_dtype float16, as llava-hf
checkpoints do).

  before: the code before the change (`--before-src`, a `git archive` of that commit): the torch model is always fp32
          and ONNX Runtime validates each graph while the torch model is resident.
  after:  this checkout (or `--after-src`): the checkpoint's dtype (fp16 stays fp16), torch weights freed before validation.

    python bench/export_memory.py --before-src /tmp/before [--points tiny,shaped,1b] [--max-gb 18]

Writes bench/results/export_memory.json with every point and a least-squares fit peak = a * checkpoint bytes + b per
(code, dtype). A point whose predicted peak (the issue's fit for `before`) exceeds --max-gb is skipped and recorded.
Big points wait until the 1-minute load average is below --max-load (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "export_memory.json"
GB = 1e9

CHILD = r"""
import json, sys, time
from pathlib import Path
from prunert.config import BudgetConfig, ExportConfig
from prunert.export.pipeline import export_artifact
model, out, dtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
settings = dict(max_prompt_tokens=16, max_new_tokens=4)
if dtype != "-":
    settings["dtype"] = dtype
start = time.perf_counter()
export_artifact(model, out, BudgetConfig(), ExportConfig(**settings), log=lambda m: None)
wall = time.perf_counter() - start
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({"vm_hwm_bytes": int(status["VmHWM"].split()[0]) * 1024, "wall_s": round(wall, 1)}))
"""


def presets() -> dict:
    from prunert.adapters.llava import synthetic

    shaped = synthetic.PRESETS["llava-1.5-shaped"]
    return {
        "tiny": ("llava-tiny", synthetic.PRESETS["llava-tiny"]),
        "shaped": ("llava-1.5-shaped", shaped),
        # CLIP ViT-L/14-336 + a TinyLlama-shaped 1.26B Llama (hidden 2048, 22 layers, MLP 5632, vocab 32064, untied head)
        "1b": ("llava-clip-l-llama-1.26b", replace(shaped, text_hidden=2048, text_layers=22, text_heads=16, text_kv_heads=16,
                                                   text_head_dim=128, text_intermediate=5632,
                                                   description="CLIP ViT-L/14-336 + a 1.26B Llama (bench/export_memory.py only)")),
    }


def write_checkpoints(name: str, preset, root: Path) -> dict[str, Path]:
    """fp32 and fp16 checkpoint directories of `preset` under root (reused when present)."""
    from prunert.adapters.llava import synthetic

    fp32, fp16 = root / f"{name}-fp32", root / f"{name}-fp16"
    if not (fp32 / "config.json").is_file():
        tokenizer = synthetic.build_tokenizer(preset.vocab_size)
        model = synthetic.build_model(preset, tokenizer)
        synthetic.save_checkpoint(fp32, preset, model, tokenizer, synthetic._marker(name, preset))
        del model
    if not (fp16 / "config.json").is_file():
        _to_fp16(fp32, fp16)
    return {"fp32": fp32, "fp16": fp16}


def _to_fp16(src: Path, dst: Path) -> None:
    """The same checkpoint with fp16 weights and config.json torch_dtype float16 (a llava-hf checkpoint's layout)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                tensors = {key: handle.get_tensor(key).to(torch.float16) for key in handle.keys()}
                metadata = handle.metadata()
            save_file(tensors, str(partial / path.name), metadata=metadata)
            del tensors
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            for key in ("dtype", "torch_dtype"):
                config[key] = "float16"
            (partial / path.name).write_text(json.dumps(config, indent=2))
        elif path.is_file():
            shutil.copyfile(path, partial / path.name)
    partial.rename(dst)


def checkpoint_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def wait_for_quiet(max_load: float, patience_s: float) -> float:
    deadline = time.monotonic() + patience_s
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.monotonic() > deadline:
            return load
        time.sleep(15)


def measure(src: Path, checkpoint: Path, dtype: str, out: Path) -> dict:
    """One export in a fresh interpreter running the code at `src`; its peak RSS and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), str(out), dtype], cwd=src, env=env, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: list[dict]) -> dict | None:
    """Least squares peak = a * checkpoint_bytes + b over the points (a: bytes per checkpoint byte, b in GB)."""
    import numpy as np

    good = [p for p in points if "vm_hwm_bytes" in p]
    if len(good) < 2:
        return None
    x = np.array([p["checkpoint_bytes"] for p in good], float)
    y = np.array([p["vm_hwm_bytes"] for p in good], float)
    a, b = np.polyfit(x, y, 1)
    worst = float(np.abs(a * x + b - y).max())
    return {"a": round(float(a), 3), "b_gb": round(float(b) / GB, 3), "max_residual_gb": round(worst / GB, 3), "points": len(good)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-src", type=Path, help="a copy of the code before the change (git archive <commit>)")
    parser.add_argument("--after-src", type=Path, default=REPO, help="the code after the change (default: this checkout)")
    parser.add_argument("--points", default="tiny,shaped,1b")
    parser.add_argument("--runs", default="before:fp32,after:fp32,after:fp16", help="code:checkpoint-dtype pairs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunert-export-memory"))
    parser.add_argument("--max-gb", type=float, default=18.0, help="skip a point predicted to need more")
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--patience", type=float, default=300, help="seconds to wait for --max-load before a big point")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from prunert.adapters.llava.synthetic import parameter_counts

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {key: p for key, p in ((f"{p['code']}/{p['point']}/{p['dtype']}", p) for p in previous.get("points", []))}
    for point in args.points.split(","):
        name, preset = presets()[point]
        counts = parameter_counts(preset)
        paths = write_checkpoints(name, preset, args.work / "checkpoints")
        for run in args.runs.split(","):
            code, dtype = run.split(":")
            src = args.before_src if code == "before" else args.after_src
            if src is None:
                continue
            size = checkpoint_bytes(paths[dtype])
            row = {"code": code, "point": point, "model": name, "dtype": dtype, "checkpoint_bytes": size,
                   "params_total": counts["total"], "params_decoder": counts["decoder"]}
            issue_fit = (4 * counts["total"] + 4 * counts["decoder"]) + 0.7 * GB  # the issue's fit of `before` (fp32 torch model)
            row["issue_fit_before_bytes"] = int(issue_fit)
            if code == "before" and issue_fit > args.max_gb * GB:
                row["skipped"] = f"predicted {issue_fit / GB:.1f} GB > --max-gb {args.max_gb}"
            else:
                row["load_before"] = round(wait_for_quiet(args.max_load, args.patience) if size > 1 << 28 else os.getloadavg()[0], 2)
                row.update(measure(src, paths[dtype], "-" if code == "before" else dtype, args.work / "artifact"))
            results[f"{code}/{point}/{dtype}"] = row
            print(json.dumps(row), flush=True)
            _write(args.out, results)
    _write(args.out, results)
    return 0


def _write(path: Path, results: dict) -> None:
    points = list(results.values())
    series = sorted({(p["code"], p["dtype"]) for p in points})
    fits = {f"{code}/{dtype}": fit([p for p in points if (p["code"], p["dtype"]) == (code, dtype)]) for code, dtype in series}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}, "points": points, "fits": fits},
                               indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
