"""First prunert benchmark: LLaVA-1.5-shaped TTFT and decode tokens/s, ONNX Runtime vs Hugging Face eager.

The LLaVA-1.5 entry point of the generic benchmark (bench/bench_vlm.py, every family): same flags, with
this script's defaults (preset llava-1.5-shaped, K = 64,128,192, report bench/results/llava.json).
Exports (or reuses) one artifact per budget K plus the unpruned baseline (method "none"), times each
with the ORT `VLMPipeline`, times Hugging Face eager `generate` on the same synthetic checkpoint, and
times the ResPrune selection op alone; reports ratios measured side by side in this run and a JSON
file of raw numbers. Weights are synthetic (seeded random): speed only, never accuracy.

    python bench/bench_llava.py                                      # llava-1.5-shaped, K = 64,128,192
    python bench/bench_llava.py --preset llava-tiny --budgets 16,32  # smoke mode
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# study_methods.py imports ROOT, log, machine, peak_rss_mb, speed_probe and versions from here
from bench_vlm import ROOT, log, machine, parse_args as vlm_parse_args, peak_rss_mb, speed_probe, versions  # noqa: E402, F401
from bench_vlm import main as vlm_main  # noqa: E402

__all__ = ["ROOT", "DEFAULTS", "log", "machine", "main", "parse_args", "peak_rss_mb", "speed_probe", "versions"]
DEFAULTS = {"preset": "llava-1.5-shaped", "budgets": "64,128,192", "out": ROOT / "bench/results/llava.json"}


def parse_args(argv=None):
    return vlm_parse_args(argv, DEFAULTS, __doc__.splitlines()[0])


def main(argv=None) -> int:
    return vlm_main(argv, DEFAULTS, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
