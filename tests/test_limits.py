"""TensorRT's TopK limit is one constant (prunert.config.TRT_MAX_TOPK), importable without torch, that every
check uses; the documentary data file agrees with it."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from prunert.config import TRT_MAX_TOPK, BudgetConfig, CDPrunerConfig, VisionZipConfig
from prunert.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "prunert"


def test_the_data_file_records_the_constant() -> None:
    table = json.loads(resources.files("prunert.data").joinpath("trt_supported_ops.json").read_text())
    assert table["ops"]["TopK"]["max_k"] == TRT_MAX_TOPK


def test_no_module_defines_its_own_topk_limit() -> None:
    """An assignment of the number itself (`X = 3840`, `x: int = 3840`) outside prunert/config.py is a second copy."""
    copies = [f"{path.relative_to(PACKAGE)}:{number}" for path in sorted(PACKAGE.rglob("*.py")) if path.name != "config.py"
              for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(rf"(?<![<>!=])=\s*{TRT_MAX_TOPK}\b", line)]
    assert copies == []


def test_every_check_uses_the_constant() -> None:
    from prunert.export.trt_check import TrtCheckConfig
    from prunert.pruning_ops import cdpruner, tiled, visionzip
    from prunert.pruning_ops.common import check_budget

    assert TrtCheckConfig().max_topk == TRT_MAX_TOPK
    with pytest.raises(ValueError, match=f"> {TRT_MAX_TOPK}, TensorRT's TopK limit"):
        check_budget(TRT_MAX_TOPK + 1, TRT_MAX_TOPK + 2, "uniform")
    check_budget(TRT_MAX_TOPK + 1, TRT_MAX_TOPK + 2, "uniform", topk=False)
    n = TRT_MAX_TOPK + 2  # the NumPy definitions refuse K = n - 1 before computing anything
    with pytest.raises(ConfigError, match=f"expected <= {TRT_MAX_TOPK} "):
        visionzip.visionzip(np.ones((n, 2)), np.ones(n), np.ones((n, 2)), n - 1, VisionZipConfig())
    with pytest.raises(ConfigError, match=f"expected <= {TRT_MAX_TOPK} "):
        cdpruner.cdpruner(np.ones((n, 2)), np.ones((1, 2)), np.ones(1), n - 1, CDPrunerConfig())
    with pytest.raises(ConfigError, match=f"at most {TRT_MAX_TOPK} "):
        tiled.check_tiled_budget(BudgetConfig(budget=TRT_MAX_TOPK + 1, method="uniform"), 5, TRT_MAX_TOPK)
