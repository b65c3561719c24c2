"""The trained `synthetic:llava-shapes`: it meets the issue's accuracy bars on 1,000 held-out questions (ORT fp32,
unpruned), pruning costs it answers, its checkpoint records the state-dict hash, and every command says what it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from prunert.config import BudgetConfig, ExportConfig, RuntimeConfig  # noqa: E402
from prunert.evaluation import EvalConfig, evaluate_artifact, load_records  # noqa: E402
from prunert.shapes import DEMO_NOTE  # noqa: E402
from prunert.shapes.dataset import write_eval_set  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N = 144  # visual tokens: (168 / 14) ** 2


def _export(checkpoint: Path, out: Path, budget: BudgetConfig) -> Path:
    from prunert.export.pipeline import export_artifact

    export_artifact(str(checkpoint), out, budget, ExportConfig(), log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory):
    return load_records(write_eval_set(tmp_path_factory.mktemp("shapes") / "eval", 1000, 0))


@pytest.fixture(scope="module")
def unpruned(shapes_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(shapes_checkpoint, tmp_path_factory.mktemp("art") / "none", BudgetConfig(budget=N, method="none"))


def test_the_trained_model_meets_the_bars_unpruned_in_ort_fp32(unpruned: Path, held_out) -> None:
    result = evaluate_artifact(unpruned, held_out, EvalConfig(batch=8, runtime=RuntimeConfig(threads=2)), progress=False)
    assert len(result.predictions) == 1000
    assert result.accuracy >= 0.90, result.by_category
    assert set(result.by_category) == {"color_of_shape", "shape_of_color", "exists", "count"}
    for category, row in result.by_category.items():
        assert row["n"] == 250 and row["accuracy"] >= 0.80, (category, row)


def test_pruning_to_a_few_tokens_costs_answers(shapes_checkpoint: Path, unpruned: Path, held_out, tmp_path: Path) -> None:
    records = held_out[:200]
    full = evaluate_artifact(unpruned, records, EvalConfig(runtime=RuntimeConfig(threads=2)), progress=False)
    pruned = _export(shapes_checkpoint, tmp_path / "uniform8", BudgetConfig(budget=8, method="uniform"))
    assert evaluate_artifact(pruned, records, EvalConfig(runtime=RuntimeConfig(threads=2)), progress=False).accuracy < full.accuracy - 0.1


def test_the_checkpoint_records_its_state_dict_hash(shapes_checkpoint: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from prunert.shapes.train import state_dict_sha256

    marker = json.loads((shapes_checkpoint / "prunert_synthetic.json").read_text())
    assert marker["trained"] is True and marker["note"] == DEMO_NOTE and marker["preset"] == "llava-shapes"
    model = LlavaForConditionalGeneration.from_pretrained(shapes_checkpoint)
    assert state_dict_sha256(model) == marker["state_dict_sha256"]


def test_every_command_says_it_is_a_demonstration_model(shapes_checkpoint: Path, tmp_path: Path) -> None:
    from prunert.manifest import load_manifest

    # the preset name resolves in the cache that holds the trained checkpoint (no second training)
    env = {**os.environ, "PRUNERT_CACHE": str(shapes_checkpoint.parent.parent)}
    out = tmp_path / "k16"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prunert", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    export = cli("export", "--model", "synthetic:llava-shapes", "--budget", "16", "--out", str(out))
    assert export.returncode == 0, export.stderr
    assert f"note: {DEMO_NOTE}" in export.stdout and "seeded random weights" not in export.stdout
    source = load_manifest(out).source
    assert source.note == DEMO_NOTE and source.synthetic is False and source.model == "synthetic:llava-shapes"
    inspect = cli("inspect", str(out))
    assert inspect.returncode == 0 and DEMO_NOTE in inspect.stdout and "SYNTHETIC" not in inspect.stdout
    image = write_eval_set(tmp_path / "one", 1, 0).parent / "images" / "000000.png"
    run = cli("run", str(out), "--image", str(image), "--prompt", "<image>\nHow many objects are there?")
    assert run.returncode == 0, run.stderr
    assert f"note: {DEMO_NOTE}" in run.stderr
    assert run.stdout.strip() in {"two", "three", "four", "five"}
