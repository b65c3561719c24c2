"""Static-budget token-selection ops. Each method: a torch op that exports (in its own module) and a
plain NumPy reference (`reference`). Importing this package does not import torch."""

from __future__ import annotations

from typing import Any

from prunert.config import BudgetConfig, ResPruneConfig
from prunert.errors import ConfigError

METHODS = ("resprune", "none")  # "none": keep all N tokens (the unpruned baseline)


def method_params(budget: BudgetConfig) -> dict[str, Any]:
    """The selected method's parameters, as recorded in the manifest."""
    if budget.method == "resprune":
        cfg = budget.resprune
        return {"alpha": cfg.alpha, "relevance": cfg.relevance, "epsilon": cfg.epsilon, "tau": cfg.tau, "normalize": cfg.normalize}
    if budget.method == "none":
        return {}
    raise ConfigError(f"--method {budget.method!r}: unknown; expected one of {list(METHODS)}")


def config_from_params(method: str, params: dict[str, Any], budget: int) -> BudgetConfig:
    """Rebuild the BudgetConfig recorded in a manifest."""
    if method == "resprune":
        return BudgetConfig(budget=budget, method=method, resprune=ResPruneConfig(**params))
    if method == "none":
        return BudgetConfig(budget=budget, method=method)
    raise ConfigError(f"method {method!r}: unknown; expected one of {list(METHODS)}")


def select(tokens: Any, text: Any, text_mask: Any, budget: BudgetConfig) -> Any:
    """Torch: tokens [B, N, D], text [B, M, D], text_mask [B, M] -> kept indices [B, K] ascending."""
    if budget.method == "resprune":
        from prunert.pruning_ops.resprune import resprune_select

        return resprune_select(tokens, text, text_mask, budget.budget, budget.resprune)
    if budget.method == "none":
        import torch

        batch, n, _ = tokens.shape
        return torch.arange(n, device=tokens.device).expand(batch, n)
    raise ConfigError(f"--method {budget.method!r}: unknown; expected one of {list(METHODS)}")


def select_reference(tokens: Any, text: Any, text_mask: Any, budget: BudgetConfig) -> Any:
    """NumPy reference for one image: tokens [N, D], text [M, D], text_mask [M] -> kept indices [K]."""
    from prunert.pruning_ops import reference

    if budget.method == "resprune":
        return reference.resprune(tokens, text, text_mask, budget.budget, budget.resprune)
    if budget.method == "none":
        import numpy as np

        return np.arange(len(tokens))
    raise ConfigError(f"--method {budget.method!r}: unknown; expected one of {list(METHODS)}")
