"""The unpruned baseline is a method attribute (MethodSpec.keeps_all), not the name "none": generic code asks the
registry, so another keep-everything method gets the same budget rules and symbolic K dim."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prunert import pruning_ops
from prunert.config import BudgetConfig, NoPruningConfig
from prunert.errors import ConfigError
from prunert.export.graphs import kept_dim
from prunert.pruning_ops import tiled
from prunert.pruning_ops.tiled import check_tiled_budget

OTHER = "keep_every_token"


@pytest.fixture
def other_baseline(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = pruning_ops.MethodSpec(OTHER, NoPruningConfig, "prunert.pruning_ops.none:keep_all_op",
                                  "prunert.pruning_ops.none:keep_all_reference", keeps_all=True)
    monkeypatch.setitem(pruning_ops._REGISTRY, OTHER, spec)
    monkeypatch.setattr(tiled, "TILED_METHODS", (*tiled.TILED_METHODS, OTHER))
    return OTHER


def test_only_the_baseline_keeps_all() -> None:
    assert [m for m in pruning_ops.methods() if pruning_ops.method_spec(m).keeps_all] == ["none"]
    assert BudgetConfig(budget=4, method="none").keeps_all and not BudgetConfig(budget=4).keeps_all


def test_budget_rules_follow_the_attribute(other_baseline: str) -> None:
    BudgetConfig(budget=100, method=other_baseline).validate_against(100)  # K = N is this method's only budget
    with pytest.raises(ConfigError, match=f"budget: got 99 with --method {other_baseline}, expected 100"):
        BudgetConfig(budget=99, method=other_baseline).validate_against(100)
    check_tiled_budget(BudgetConfig(budget=5 * 100, method=other_baseline), 5, 100)
    with pytest.raises(ConfigError, match=f"with --method {other_baseline}, expected 500"):
        check_tiled_budget(BudgetConfig(budget=64, method=other_baseline), 5, 100)


def test_kept_dim_follows_the_attribute(other_baseline: str) -> None:
    adapter = SimpleNamespace(visual_token_dim="merged")  # a family whose N varies per image
    assert kept_dim(adapter, BudgetConfig(budget=256, method=other_baseline)) == "merged"
    assert kept_dim(adapter, BudgetConfig(budget=64, method="uniform")) == 64
