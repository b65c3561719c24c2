"""LLaVA towers beyond LLaVA-1.5's default, against Hugging Face itself: a CLIP 224/14 tower read with
vision_feature_select_strategy "full" at layer -1 (the [CLS] row is token 0: N = 1 + 256) and a SigLIP
tower (no [CLS]: N = 256). N, the tokens, and the cls_attention / patch_keys extras must describe the
very tokens HF gives the LLM; a tower without [CLS] refuses what needs one. Plus the export's checks
that catch a graph whose token count is not the manifest's (output shapes, exporter errors one line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from prunert import pruning_ops
from prunert.adapters import resolve_source
from prunert.adapters.llava import synthetic
from prunert.adapters.llava.export import LlavaExportAdapter
from prunert.config import BudgetConfig, ExportConfig
from prunert.errors import ConfigError, ExportError
from prunert.export import graphs
from prunert.export.pipeline import _export, _exporter_message
from prunert.export.validate import check_output_shapes, validate_vision
from prunert.manifest import GraphSpec, TensorSpec

EXTRAS = ("cls_attention", "patch_keys")
BATCH = 2


@pytest.fixture(scope="module")
def full(prunert_cache: Path) -> LlavaExportAdapter:
    return LlavaExportAdapter(resolve_source("synthetic:llava-tiny-full").path)


@pytest.fixture(scope="module")
def siglip(prunert_cache: Path) -> LlavaExportAdapter:
    return LlavaExportAdapter(resolve_source("synthetic:llava-tiny-siglip").path)


def _pixels(adapter: LlavaExportAdapter) -> torch.Tensor:
    return torch.randn(BATCH, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(5))


def _hf(adapter: LlavaExportAdapter, pixels: torch.Tensor):
    """HF's own image features (the checkpoint's layer and strategy) and its tower's attentions."""
    with torch.no_grad():
        out = adapter.model.model.get_image_features(pixels, output_attentions=True)
    return torch.stack(list(out.pooler_output)), out.attentions  # [B, N, D], L x [B, H, T, T]


def test_presets_describe_the_two_towers() -> None:
    full, siglip = synthetic.PRESETS["llava-tiny-full"], synthetic.PRESETS["llava-tiny-siglip"]
    assert (full.image_size, full.patch_size, full.vision_feature_layer, full.vision_feature_select_strategy) == (224, 14, -1, "full")
    assert (full.num_visual_tokens, siglip.num_visual_tokens, synthetic.PRESETS["llava-tiny"].num_visual_tokens) == (257, 256, 100)
    assert full.has_cls_token and not siglip.has_cls_token
    # the presets added later leave the older ones' cache hash (and so their checkpoints) unchanged
    assert synthetic.preset_hash(synthetic.PRESETS["llava-tiny"]) == "a6890a89e973"


@pytest.mark.parametrize("name, n, has_cls", [("full", 257, True), ("siglip", 256, False)])
def test_n_is_what_hf_gives_the_llm(request, name: str, n: int, has_cls: bool) -> None:
    """N = the tower's tokens ([CLS] + 256 patches with "full" on CLIP; 256 on SigLIP), as HF's get_image_features
    and HF's processor (the <image> placeholder's expansion) count them; the tower yields 257 on CLIP."""
    adapter = request.getfixturevalue(name)
    pixels = _pixels(adapter)
    hf_tokens, _ = _hf(adapter, pixels)
    assert adapter.num_visual_tokens == n == hf_tokens.shape[1] == adapter.model.config.image_seq_length
    assert adapter.has_cls_token is has_cls
    with torch.no_grad():
        ours = adapter.vision_features(pixels)["tokens"]
    assert ours.shape == (BATCH, n, adapter.model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, hf_tokens, atol=1e-6, rtol=0)


def test_full_strategy_extras_cover_the_same_tokens_as_the_gather(full: LlavaExportAdapter) -> None:
    """cls_attention [B, 257]: the [CLS] query's row over every token HF keeps, [CLS] column included, so index i
    scores token i; patch_keys likewise. A cls_attention selection then keeps exactly HF's top-scored tokens."""
    pixels = _pixels(full)
    hf_tokens, attentions = _hf(full, pixels)
    with torch.no_grad():
        ours = full.vision_features(pixels, EXTRAS)
    expected = attentions[-1].mean(dim=1)[:, 0, :]  # layer -1's own attention: [CLS] -> all 257 tokens
    assert ours["cls_attention"].shape == (BATCH, 257) and ours["patch_keys"].shape[:2] == (BATCH, 257)
    torch.testing.assert_close(ours["cls_attention"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["cls_attention"].sum(-1), torch.ones(BATCH), atol=1e-5, rtol=0)  # the whole softmax row
    kept_tokens, kept = pruning_ops.select(ours, BudgetConfig(budget=16, method="cls_attention"))  # [B, K, D], [B, K]
    for b in range(BATCH):
        top = set(torch.topk(expected[b], 16).indices.tolist())
        assert set(kept[b].tolist()) == top
        torch.testing.assert_close(kept_tokens[b], hf_tokens[b, kept[b]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["full", "siglip"])
def test_hf_reference_features_equal_the_adapters(request, name: str) -> None:
    """parity's reference (hf_vision_features: HF's processor + get_image_features, extras from that run)
    equals the adapter's vision_features on the same pixels, every token."""
    from PIL import Image

    adapter = request.getfixturevalue(name)
    model_dir = resolve_source(f"synthetic:llava-tiny-{name}").path
    image = Image.new("RGB", (300, 200), (40, 120, 200))
    extras = EXTRAS if adapter.has_cls_token else ("patch_keys",)
    features, valid = adapter.hf_vision_features([image], model_dir, extras)
    with torch.no_grad():
        ours = adapter.vision_features(adapter.hf_vision_inputs([image], model_dir)["pixel_values"], extras)
    assert valid.shape == (1, adapter.num_visual_tokens) and valid.all()
    assert set(features) == {"tokens", *extras}
    for key, value in features.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0, msg=key)


def test_a_tower_without_cls_refuses_cls_methods(siglip: LlavaExportAdapter) -> None:
    """SigLIP has no [CLS]: its first token is a patch, never silently used as the query."""
    with pytest.raises(ConfigError, match=r"no \[CLS\] token"):
        siglip.vision_features(_pixels(siglip), ("cls_attention",))
    for method in pruning_ops.methods():
        if pruning_ops.method_spec(method).needs_cls:
            with pytest.raises(ConfigError, match=rf"--method {method}: needs the vision tower's \[CLS\] token"):
                pruning_ops.check_applies(method, siglip.has_cls_token)
        else:
            pruning_ops.check_applies(method, siglip.has_cls_token)
    assert {m for m in pruning_ops.methods() if pruning_ops.method_spec(m).needs_cls} == {"cls_attention", "visionzip"}


def test_unpruned_budget_must_be_every_token(full: LlavaExportAdapter) -> None:
    """--method none --budget 256 on the 257-token tower: refused (it used to emit 257 rows as [batch, 256, D])."""
    with pytest.raises(ConfigError, match=r"expected 257"):
        full.fit_budget(BudgetConfig(budget=256, method="none"))
    full.fit_budget(BudgetConfig(budget=257, method="none"))


# ------------------------------------------------------------------------- the export's own checks


def test_output_shapes_must_match_the_manifest() -> None:
    spec = GraphSpec(file="vision.onnx", inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, 224, 224)),),
                     outputs=(TensorSpec("visual_tokens", "float32", ("batch", 256, 64)), TensorSpec("kept_indices", "int64", ("batch", 256))))
    fed = {"pixel_values": (2, 3, 224, 224)}
    check_output_shapes(Path("vision.onnx"), spec, fed, {"visual_tokens": (2, 256, 64), "kept_indices": (2, 256)})
    bad = [{"visual_tokens": (2, 257, 64), "kept_indices": (2, 257)},  # a static dim: 257 rows, 256 declared
           {"visual_tokens": (2, 256, 64), "kept_indices": (1, 256)},  # "batch" 2 at the inputs, 1 here
           {"visual_tokens": (2, 256), "kept_indices": (2, 256)}]  # rank
    for got in bad:
        with pytest.raises(ExportError, match=r"^vision\.onnx: output '\w+' has shape \[[\d, ]+\] in ONNX Runtime, expected \[batch, 256"):
            check_output_shapes(Path("vision.onnx"), spec, fed, got)


def test_vision_graph_with_another_token_count_than_declared_fails_validation(full: LlavaExportAdapter, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The landed bug: N declared 256, the tower yields 257; an unpruned graph (K = N) then emits 257 rows
    against a manifest shape [batch, 256, D]. The post-export validation says so in one line."""
    monkeypatch.setattr(full, "num_visual_tokens", 256)
    budget = BudgetConfig(budget=256, method="none")
    cfg = ExportConfig(max_prompt_tokens=32, max_new_tokens=4)
    module = graphs.VisionPruneGraph(full, budget).eval()
    args, dynamic, inputs, outputs = graphs.vision_export_spec(full, cfg, graphs.kept_dim(full, budget), 64)
    spec = _export(module, args, dynamic, inputs, outputs, tmp_path / "vision.onnx", cfg)
    with pytest.raises(ExportError, match=r"output 'visual_tokens' has shape \[2, 257, 64\] .* expected \[batch, 256, 64\]"):
        validate_vision(module, args, tmp_path / "vision.onnx", spec)


def test_exporter_errors_are_one_clean_line(full: LlavaExportAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """visionzip on scores of 256 tokens against 257 tokens (the landed bug, with the op's own check off): the
    exporter's TorchExportError is full of ANSI colour codes and its first line hides the 256-vs-257 mismatch."""
    monkeypatch.setattr(pruning_ops, "check_same_tokens", lambda method, counts: None)
    original = LlavaExportAdapter.vision_features

    def off_by_one(self, pixel_values, extras=()):
        features = original(self, pixel_values, extras)
        return {**features, **{name: features[name][:, 1:] for name in extras}}  # extras of patches 1..256 only

    monkeypatch.setattr(LlavaExportAdapter, "vision_features", off_by_one)
    budget = BudgetConfig(budget=16, method="visionzip")
    cfg = ExportConfig(max_prompt_tokens=32, max_new_tokens=4)
    args, dynamic, inputs, outputs = graphs.vision_export_spec(full, cfg, 16, 64)
    with pytest.raises(ExportError) as raised:
        _export(graphs.VisionPruneGraph(full, budget).eval(), args, dynamic, inputs, outputs, tmp_path / "vision.onnx", cfg)
    message = str(raised.value)
    assert "\x1b" not in message and "\n" not in message, repr(message)
    assert message.startswith("export of vision.onnx failed: ") and re.search(r"\b257\b", message) and re.search(r"\b256\b", message), message


def test_exporter_message_strips_ansi_and_prefers_the_summary() -> None:
    text = ("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of exporting.\n- Modify the model\n\n"
            "## Exception summary\n\n<class 'RuntimeError'>: size 257 vs 256\n\n(Refer to the full stack trace above)")
    assert _exporter_message(RuntimeError(text)) == "RuntimeError: size 257 vs 256"
    assert _exporter_message(RuntimeError("\x1b[31mbad\x1b[0m thing\nmore")) == "bad thing"
