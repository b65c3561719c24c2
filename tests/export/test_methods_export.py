"""Every selection method inside the real vision graph (tower + projector + op) of llava-tiny:
exports, passes the TensorRT-compatibility check, matches torch (validation) and, row by row, the
method's NumPy reference run on the same tower outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prunert import pruning_ops
from prunert.adapters import resolve_source
from prunert.config import BudgetConfig, ExportConfig
from prunert.export import pipeline as export_pipeline
from prunert.export.graphs import VisionPruneGraph, vision_export_spec
from prunert.export.trt_check import check_trt
from prunert.export.validate import validate_vision
from prunert.manifest import GraphSpec
from prunert.runtime.runner import OnnxRuntimeRunner

BUDGET = 12
N = 100  # llava-tiny's visual tokens


@pytest.fixture(scope="module")
def adapter(prunert_cache: Path):
    return export_pipeline.load_export_adapter(resolve_source("synthetic:llava-tiny"))


@pytest.mark.parametrize("method", pruning_ops.methods())
def test_method_in_vision_graph(adapter, method: str, tmp_path: Path) -> None:
    budget = BudgetConfig(budget=N if method == "none" else BUDGET, method=method)
    cfg = ExportConfig()
    hidden = adapter.embedding_table().shape[1]
    module = VisionPruneGraph(adapter, budget).eval()
    args, dynamic, inputs, outputs = vision_export_spec(adapter, cfg, budget.budget, hidden)
    path = tmp_path / "vision.onnx"
    spec: GraphSpec = export_pipeline._export(module, args, dynamic, inputs, outputs, path, cfg)

    validate_vision(module, args, path, spec)  # torch vs ONNX Runtime on the batch-2 examples
    assert check_trt(path) == [], f"{method}: graph would not parse in TensorRT"

    got = OnnxRuntimeRunner(path, spec).infer({t.name: a.numpy() for t, a in zip(spec.inputs, args)})
    with torch.no_grad():
        features = adapter.vision_features(args[0], extras=pruning_ops.method_spec(method).needs)
    for row in range(args[0].shape[0]):
        sample = {name: value[row].numpy() for name, value in features.items()}
        sample.update(text=args[1][row].numpy(), text_mask=args[2][row].numpy())
        kept, tokens = pruning_ops.select_reference(sample, budget)
        assert set(got["kept_indices"][row].tolist()) == set(kept.tolist())
        assert np.all(np.diff(got["kept_indices"][row]) > 0)
        np.testing.assert_allclose(got["visual_tokens"][row], tokens, rtol=1e-4, atol=1e-4)
