"""bench/gpu_check.py end to end on the CPU stand-in for tensorrt + cuda-python (tests/engines/
test_engine_fake_backend.py: device memory is bounds-checked host memory, the "engine" runs ONNX
Runtime behind TensorRT's API). Proves the orchestration: export both artifacts, convert / calibrate,
build, parity through `--backend trt`, timings, ratios, JSON report. It cannot prove TensorRT itself:
that is what the script is for, on a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_the_whole_path_on_the_fake_gpu(fake_trt, tmp_path: Path, capsys) -> None:
    """fake_trt (conftest): TensorRT 10.3 on a "Fake Orin", compute capability 8.7."""
    spec = importlib.util.spec_from_file_location("prunert_bench_gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--preset", "llava-tiny", "--budget", "16", "--precisions", "fp32,fp16,int8,fp8,int4",
                           "--repeats", "1", "--new-tokens", "4", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert report["skipped"] == ["fp8: compute capability 8.7 < 8.9"]  # Orin has no FP8
    for label in ("pruned", "unpruned"):
        rows = report["artifacts"][label]["precisions"]
        assert sorted(rows) == ["fp16", "fp32", "int4", "int8", "vision=fp16,decoder=int4"]  # the default --mixed
        for precision, row in rows.items():
            assert "error" not in row, (label, precision, row.get("error"))
            assert set(row["engines"]) == {"vision", "decoder"}
            vision = precision.split(",")[0].removeprefix("vision=")
            assert row["parity"]["tolerances"]["kept_min_overlap"] == {"fp32": 1.0, "int4": 1.0, "fp16": 0.98, "int8": 0.9}[vision]
            assert row["timings"]["decode_tok_per_s"]["best"] > 0
        mixed = rows["vision=fp16,decoder=int4"]["engines"]
        assert (mixed["vision"]["precision"], mixed["decoder"]["precision"]) == ("fp16", "int4")
    assert report["artifacts"]["pruned"]["precisions"]["fp32"]["parity"]["verdict"] == "PASS"
    assert set(report["ratios"]) == {"fp32", "fp16", "int8", "int4", "vision=fp16,decoder=int4"}
    assert "ttft_fp32_over_this" in report["ratios"]["fp16"]
    verdicts = [row["parity"]["verdict"] for rows in report["artifacts"].values() for row in rows["precisions"].values()]
    assert code == (0 if all(v == "PASS" for v in verdicts) else 1)
    assert "report:" in printed and "Fake Orin" in printed


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "budget"), [("qwen2.5-vl-tiny", 16)])  # llava-next-tiny 12 passes too (+40 s)
def test_gpu_check_on_the_other_backbones(fake_trt, tmp_path: Path, preset: str, budget: int) -> None:
    """The same path for Qwen2.5-VL (engine profiles over the patch count P, per-image N, M-RoPE decode positions
    [3, 1, 1]), fp32 and fp16: both artifacts build, pass parity through `--backend trt`, decode."""
    spec = importlib.util.spec_from_file_location("prunert_bench_gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--preset", preset, "--budget", str(budget), "--precisions", "fp32,fp16", "--mixed", "vision=fp16,decoder=fp32", "--repeats", "1",
                           "--new-tokens", "4", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    for label in ("pruned", "unpruned"):
        for precision, row in report["artifacts"][label]["precisions"].items():
            assert "error" not in row, (label, precision, row.get("error"))
            assert row["parity"]["verdict"] == "PASS", (label, precision)
            assert row["timings"]["decode_tok_per_s"]["best"] > 0
    assert code == 0
