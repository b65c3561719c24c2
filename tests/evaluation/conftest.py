"""Fixtures of the `prunert eval` tests: a small held-out shapes set and an unpruned tiny artifact (exported once)."""

from __future__ import annotations

from pathlib import Path

import pytest

SET_COUNT = 8
SET_SEED = 3


@pytest.fixture(scope="session")
def shapes_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """questions.jsonl of write_eval_set(8 questions, seed 3): two of each template. Read-only!"""
    from prunert.shapes.dataset import write_eval_set

    return write_eval_set(tmp_path_factory.mktemp("shapes") / "set", SET_COUNT, SET_SEED)


@pytest.fixture(scope="session")
def tiny_unpruned(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path, tiny_settings: dict) -> Path:
    """synthetic:llava-tiny exported with --method none (K = N), sized like tiny_artifact. Read-only!"""
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-none"
    export_artifact(tiny_settings["model"], out, BudgetConfig(budget=tiny_settings["num_visual_tokens"], method="none"),
                    ExportConfig(max_prompt_tokens=tiny_settings["max_prompt_tokens"], max_new_tokens=tiny_settings["max_new_tokens"]),
                    log=lambda message: None)
    return out
