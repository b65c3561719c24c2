"""Parity against Hugging Face's own get_image_features, on the two LLaVA towers LLaVA-1.5's default hides:
CLIP 224/14 read with vision_feature_select_strategy "full" at layer -1 (257 tokens, the [CLS] row first)
and a SigLIP tower (256 tokens, no [CLS]).

  * every method that applies exports; the CLS-dependent ones (cls_attention, visionzip) and the unpruned
    baseline end to end on the full-strategy tower (export, the manifest's N and output shapes, parity PASS
    with the stage "visual tokens before pruning"), SigLIP end to end with none and resprune;
  * the methods that need only the tokens (resprune, uniform, random, divprune, cdpruner) at the vision
    graph on the 257-token tower (its export, the post-export validation against the declared shapes, and
    its kept set on HF's pixels = the torch selection on HF's own features); the decoder does not depend on
    the method;
  * the methods that cannot apply (a [CLS] method on SigLIP, --method none with K != N) are one-line refusals.

Artifacts are exported once per module (module-scoped factory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunert import cli, pruning_ops
from prunert.adapters import resolve_source
from prunert.adapters.llava.export import LlavaExportAdapter
from prunert.adapters.llava.synthetic import PRESETS
from prunert.config import BudgetConfig, ExportConfig
from prunert.export import graphs
from prunert.export.pipeline import _export, export_artifact, fit_budget
from prunert.export.validate import validate_vision
from prunert.manifest import load_manifest
from prunert.parity.reference import run_parity
from prunert.parity.report import PASS
from prunert.runtime import VLMPipeline
from prunert.runtime.runner import OnnxRuntimeRunner

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"
D = 64  # text_hidden of both presets
EXPORT = ExportConfig(max_prompt_tokens=32, max_new_tokens=4)
BASE_STAGES = {"source", "pixels:pixel_values", "token ids", "visual tokens before pruning", "kept indices", "kept tokens",
               "prefill logits", "greedy tokens"}
END_TO_END = [("llava-tiny-full", "none", 257), ("llava-tiny-full", "cls_attention", 16), ("llava-tiny-full", "visionzip", 16),
              ("llava-tiny-siglip", "none", 256), ("llava-tiny-siglip", "resprune", 16)]
TOKENS_ONLY = ["resprune", "uniform", "random", "divprune", "cdpruner"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path):
    """artifact(preset, method, budget) -> directory, exported on first use."""
    made: dict[tuple[str, str, int], Path] = {}

    def get(preset: str, method: str, budget: int) -> Path:
        key = (preset, method, budget)
        if key not in made:
            out = tmp_path_factory.mktemp("hf-reference") / f"{preset}-{method}"
            export_artifact(f"synthetic:{preset}", out, BudgetConfig(budget=budget, method=method), EXPORT, log=lambda message: None)
            made[key] = out
        return made[key]

    return get


@pytest.mark.parametrize("preset, method, budget", END_TO_END)
def test_exports_and_passes_parity_against_hf(artifact, preset: str, method: str, budget: int) -> None:
    out = artifact(preset, method, budget)
    manifest = load_manifest(out)
    assert manifest.budget.num_visual_tokens == PRESETS[preset].num_visual_tokens  # 257 with the [CLS] row, 256 on SigLIP
    vision = manifest.graphs["vision"]
    assert [(t.name, t.shape) for t in vision.outputs] == [("visual_tokens", ("batch", budget, D)), ("kept_indices", ("batch", budget))]
    encoded = VLMPipeline(out).encode_images([PHOTO], [PROMPT])
    assert encoded.visual_tokens.shape == (1, budget, D) and encoded.kept_indices.shape == (1, budget)  # rows as declared
    report = run_parity(out, PHOTO, PROMPT)
    needs = pruning_ops.method_spec(method).needs
    assert {check.stage for check in report.checks} == BASE_STAGES | {f"{name} before pruning" for name in needs}
    failed = [check for check in report.checks if check.status != PASS]
    assert not failed and report.passed, report.table()
    before = [c for c in report.checks if c.stage == "visual tokens before pruning"]
    assert [c.metric for c in before] == ["max abs diff", "cosine"] and before[0].value <= 1e-5


@pytest.mark.parametrize("method", TOKENS_ONLY)
def test_vision_graph_of_the_token_methods_matches_hf(method: str, tmp_path: Path, prunert_cache: Path) -> None:
    """On the 257-token tower: the vision graph exports, its outputs have the declared [batch, 16, D], and on
    HF's pixels it keeps what the torch selection keeps on HF's own get_image_features."""
    model_dir = resolve_source("synthetic:llava-tiny-full").path
    adapter = LlavaExportAdapter(model_dir)
    budget = BudgetConfig(budget=16, method=method)
    fit_budget(adapter, budget)
    module = graphs.VisionPruneGraph(adapter, budget).eval()
    args, dynamic, inputs, outputs = graphs.vision_export_spec(adapter, EXPORT, graphs.kept_dim(adapter, budget), D)
    path = tmp_path / "vision.onnx"
    spec = _export(module, args, dynamic, inputs, outputs, path, EXPORT)
    validate_vision(module, args, path, spec)  # torch vs ONNX Runtime, and every output's shape vs the spec
    with Image.open(PHOTO) as opened:
        image = opened.convert("RGB")
    text = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(7))  # [1, M, D]
    mask = torch.ones(1, 3, dtype=torch.int64)
    features, _ = adapter.hf_vision_features([image], model_dir)
    with torch.no_grad():
        ref_tokens, ref_kept = adapter.selection_module(budget, adapter.family_config())({**features, "text": text, "text_mask": mask})
    pixels = adapter.hf_vision_inputs([image], model_dir)["pixel_values"]
    got = OnnxRuntimeRunner(path, spec).infer({"pixel_values": pixels.numpy(), "text_embeds": text.numpy(), "text_mask": mask.numpy()})
    assert got["visual_tokens"].shape == (1, 16, D)
    assert set(got["kept_indices"][0].tolist()) == set(ref_kept[0].tolist())
    np.testing.assert_allclose(got["visual_tokens"], ref_tokens.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["cls_attention", "visionzip"])
def test_siglip_refuses_methods_that_need_a_cls_token(capsys, error_line, tmp_path: Path, method: str) -> None:
    out = tmp_path / "out"
    code = cli.main(["export", "--model", "synthetic:llava-tiny-siglip", "--method", method, "--budget", "16", "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, f"--method {method}", "[CLS] token", "resprune")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unpruned_budget_other_than_n_is_refused(capsys, error_line, tmp_path: Path) -> None:
    """--method none --budget 256 on the 257-token tower used to export 257 rows against [batch, 256, D]."""
    out = tmp_path / "out"
    code = cli.main(["export", "--model", "synthetic:llava-tiny-full", "--method", "none", "--budget", "256", "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, "256", "expected 257")
    assert list(tmp_path.iterdir()) == []
