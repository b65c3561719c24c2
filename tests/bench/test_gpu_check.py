"""bench/gpu_check.py end to end on the CPU stand-in for tensorrt + cuda-python (tests/engines/
test_engine_fake_backend.py: device memory is bounds-checked host memory, the "engine" runs ONNX
Runtime behind TensorRT's API). Proves the orchestration: export both artifacts, convert / calibrate,
build, parity through `--backend trt`, timings, ratios, JSON report. It cannot prove TensorRT itself:
that is what the script is for, on a GPU."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "engines" / "test_engine_fake_backend.py"


def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.slow
def test_gpu_check_runs_the_whole_path_on_the_fake_gpu(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("PRUNERT_CACHE", str(tmp_path / "cache"))
    _load("prunert_tests_fake_trt_backend", FAKE).install(monkeypatch, version="10.3.0", cc=(8, 7))
    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime"):  # torch._dynamo find_spec()s tensorrt
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    gpu_check = _load("prunert_bench_gpu_check", REPO / "bench" / "gpu_check.py")
    out = tmp_path / "report.json"
    code = gpu_check.main(["--preset", "llava-tiny", "--budget", "16", "--precisions", "fp32,fp16,int8,fp8",
                           "--repeats", "1", "--new-tokens", "4", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert report["skipped"] == ["fp8: compute capability 8.7 < 8.9"]  # Orin has no FP8
    for label in ("pruned", "unpruned"):
        rows = report["artifacts"][label]["precisions"]
        assert sorted(rows) == ["fp16", "fp32", "int8"]
        for precision, row in rows.items():
            assert "error" not in row, (label, precision, row.get("error"))
            assert set(row["engines"]) == {"vision", "decoder"}
            assert row["parity"]["tolerances"]["kept_min_overlap"] == (1.0 if precision == "fp32" else 0.98 if precision == "fp16" else 0.9)
            assert row["timings"]["decode_tok_per_s"]["best"] > 0
    assert report["artifacts"]["pruned"]["precisions"]["fp32"]["parity"]["verdict"] == "PASS"
    assert set(report["ratios"]) == {"fp32", "fp16", "int8"}
    assert "ttft_fp32_over_this" in report["ratios"]["fp16"]
    verdicts = [row["parity"]["verdict"] for rows in report["artifacts"].values() for row in rows["precisions"].values()]
    assert code == (0 if all(v == "PASS" for v in verdicts) else 1)
    assert "report:" in printed and "Fake Orin" in printed
