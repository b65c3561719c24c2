"""Static-budget token-selection ops, one registry entry per method.

Each method has a frozen config dataclass, a torch op that exports to ONNX and a plain NumPy reference:

  op(inputs: dict[str, Tensor], budget, cfg) -> (kept_tokens [B, K, D], kept_indices [B, K] ascending)
  reference(inputs: dict[str, ndarray], budget, cfg) -> (kept_indices [K] ascending, kept_tokens [K, D])   (one sample)

`inputs` always holds "tokens" [N, D] (projector outputs), "text" [M, D] and "text_mask" [M] (content
words in LLM embedding space), plus whatever the method `needs` from the vision tower
("cls_attention" [N]: head-averaged [CLS]->patch attention of the feature layer; "patch_keys" [N, Dv]:
that layer's attention keys). Importing this package imports neither torch nor numpy.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

from prunert.config import (
    BudgetConfig,
    CDPrunerConfig,
    ClsAttentionConfig,
    DivPruneConfig,
    NoPruningConfig,
    RandomConfig,
    ResPruneConfig,
    UniformConfig,
    VisionZipConfig,
)
from prunert.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_type: type  # frozen dataclass of the method's parameters
    op: str  # "module:function" of the torch op
    reference: str  # "module:function" of the NumPy reference
    needs: tuple[str, ...] = ()  # extra vision-tower outputs: "cls_attention", "patch_keys"
    description: str = ""
    keeps_all: bool = False  # the unpruned baseline: K must equal N and every token is kept, in order
    # scores tokens by the vision tower's [CLS] query (its "cls_attention" row): no such token, no such method
    # (SigLIP, Qwen2.5-VL); the export adapter's `has_cls_token` says whether the tower has one (check_applies)
    needs_cls: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    _REGISTRY[spec.name] = spec


register(MethodSpec(
    "resprune", ResPruneConfig, "prunert.pruning_ops.resprune:resprune_op", "prunert.pruning_ops.reference:resprune_reference",
    description="greedy residual energy (weighted pivoted QR) x text relevance^alpha",
))
register(MethodSpec(
    "none", NoPruningConfig, "prunert.pruning_ops.none:keep_all_op", "prunert.pruning_ops.none:keep_all_reference",
    description="unpruned baseline: keeps all N tokens (budget must equal N)", keeps_all=True,
))

for _name, _config, _needs, _description in (
    ("uniform", UniformConfig, (), "evenly spaced raster indices"),
    ("random", RandomConfig, (), "seeded random subset"),
    ("cls_attention", ClsAttentionConfig, ("cls_attention",), "FasterVLM: top-K [CLS] attention"),
    ("visionzip", VisionZipConfig, ("cls_attention", "patch_keys"), "VisionZip: dominant + merged contextual tokens"),
    ("divprune", DivPruneConfig, (), "DivPrune: max-min diversity, 1 - cosine"),
    ("cdpruner", CDPrunerConfig, (), "CDPruner: greedy DPP MAP, relevance-weighted cosine kernel"),
):
    register(MethodSpec(
        _name, _config, f"prunert.pruning_ops.{_name}:{_name}_op", f"prunert.pruning_ops.{_name}:{_name}_reference",
        _needs, _description, needs_cls="cls_attention" in _needs,
    ))


def methods() -> list[str]:
    return sorted(_REGISTRY)


def check_same_tokens(method: str, counts: dict[str, int]) -> None:
    """ConfigError unless every per-token input of `method` covers the same N tokens, e.g. {"tokens": 257,
    "cls_attention": 256} (scores of one token set gathering rows of another: an off-by-one, not a selection)."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise ConfigError(f"{method}: inputs cover different numbers of tokens ({listed}); expected the same N tokens in each")


def check_applies(method: str, has_cls_token: bool) -> None:
    """ConfigError (one line) unless `method` applies to a vision tower with (or without) a [CLS] token."""
    spec = method_spec(method)
    if spec.needs_cls and not has_cls_token:
        usable = [name for name in methods() if not _REGISTRY[name].needs_cls]
        raise ConfigError(f"--method {method}: needs the vision tower's [CLS] token, and this checkpoint's tower has none; "
                          f"expected one of {usable}")


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"--method {name!r}: unknown; expected one of {methods()}")
    return _REGISTRY[name]


def _load(target: str) -> Callable[..., Any]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def method_params(budget: BudgetConfig) -> dict[str, Any]:
    """The selected method's parameters, as recorded in the manifest."""
    spec = method_spec(budget.method)
    if not isinstance(budget.params, spec.config_type):
        raise ConfigError(f"--method {budget.method}: parameters of type {type(budget.params).__name__}, expected {spec.config_type.__name__}")
    return asdict(budget.params)


def config_from_params(method: str, params: dict[str, Any], budget: int) -> BudgetConfig:
    """Rebuild the BudgetConfig recorded in a manifest."""
    spec = method_spec(method)
    try:
        return BudgetConfig(budget=budget, method=method, params=spec.config_type(**params))
    except TypeError as exc:
        raise ConfigError(f"method {method!r} parameters {params}: {exc}") from None


def select(inputs: dict[str, Any], budget: BudgetConfig) -> tuple[Any, Any]:
    """Torch: batched inputs -> (kept_tokens [B, K, D], kept_indices [B, K] ascending)."""
    return _load(method_spec(budget.method).op)(inputs, budget.budget, budget.params)


def select_reference(inputs: dict[str, Any], budget: BudgetConfig) -> tuple[Any, Any]:
    """NumPy: one sample's inputs -> (kept indices [K] ascending, kept tokens [K, D])."""
    return _load(method_spec(budget.method).reference)(inputs, budget.budget, budget.params)
