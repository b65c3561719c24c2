"""The export side's declared adapter contract (prunert.export.adapter): a fourth family's export adapter needs only
the abstract methods, every optional hook has its default, and generic export code composes with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prunert.adapters import FAMILIES, export_adapter_class  # noqa: E402
from prunert.config import BudgetConfig, ExportConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert.export import graphs  # noqa: E402
from prunert.export.adapter import ExportAdapter  # noqa: E402
from prunert.export.pipeline import _write_preprocessor_config, fit_budget  # noqa: E402

N, D, VOCAB = 16, 8, 32


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 1, "num_key_value_heads": 1, "num_attention_heads": 2,
                                          "hidden_size": D, "head_dim": 4})()


class FourthFamily(ExportAdapter):
    """A minimal new family: pixels [B, 3, 8, 8] -> N tokens; only the abstract methods."""

    family, architecture = "fourth", "FourthForConditionalGeneration"
    num_visual_tokens, vision_input_names = N, ("pixel_values",)

    def __init__(self, model_dir: Path):
        self.model = None
        self.embed = torch.nn.Embedding(VOCAB, D)
        self.backbone, self.head = Backbone(), torch.nn.Linear(D, VOCAB)

    def vision_features(self, pixel_values, extras=()):
        return {"tokens": pixel_values.flatten(1)[:, : N * D].reshape(-1, N, D)}  # [B, N, D]

    def example_vision_inputs(self, batch):
        return (torch.zeros(batch, 3, 8, 8),)

    def vision_dynamic_shapes(self, batch_dim):
        return ({0: batch_dim},)

    def vision_input_specs(self):
        return [("pixel_values", "float32", ("batch", 3, 8, 8))]

    def text_backbone(self):
        return self.backbone

    def lm_head(self):
        return self.head

    def embedding_table(self):
        return self.embed.weight  # [V, D]

    def text_info(self, model_dir):
        return {}

    def family_config(self):
        return {"grid": 4}

    def hf_vision_inputs(self, images, model_dir):
        return {}

    def hf_token_ids(self, text, model_dir):
        return []

    def hf_vision_features(self, images, model_dir, extras=()):
        return {"tokens": torch.zeros(len(images), N, D)}, torch.ones(len(images), N, dtype=torch.bool)


def test_a_fourth_family_export_adapter_needs_only_the_abstract_methods(tmp_path: Path) -> None:
    adapter = FourthFamily(tmp_path)
    assert (adapter.one_image_per_vision_call, adapter.visual_token_dim, adapter.position_ids_leading_dims) == (False, None, ())
    assert adapter.min_visual_tokens == N and adapter.vision_dim_ranges() == {}
    assert adapter.hf_position_ids([1, 2], [], tmp_path, torch.zeros(1, 4)) is None  # parity: HF's default positions
    fit_budget(adapter, BudgetConfig(budget=4))  # K checked against the fixed N
    with pytest.raises(ConfigError, match="budget"):
        fit_budget(adapter, BudgetConfig(budget=N + 1))
    assert type(graphs.selection_module(adapter, BudgetConfig(budget=4))) is graphs.Selection
    assert type(graphs.decoder_module(adapter)) is graphs.DecoderGraph
    assert graphs.kept_dim(adapter, BudgetConfig(budget=4)) == 4
    args, _, inputs, outputs = graphs.vision_export_spec(adapter, ExportConfig(), 4, D)
    assert [name for name, _, _ in inputs] == ["pixel_values", "text_embeds", "text_mask"]
    assert outputs[0] == ("visual_tokens", "float32", ("batch", 4, D))
    tokens, kept = graphs.VisionPruneGraph(adapter, BudgetConfig(budget=4, method="uniform"))(*args)  # [B, K, D], [B, K]
    assert tokens.shape == (args[0].shape[0], 4, D) and kept.shape == (args[0].shape[0], 4)


def test_an_adapter_missing_an_abstract_method_cannot_be_built(tmp_path: Path) -> None:
    class NoTokens(FourthFamily):
        vision_features = ExportAdapter.vision_features  # abstract again

    with pytest.raises(TypeError, match="vision_features"):
        NoTokens(tmp_path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_registers_an_export_adapter(family: str) -> None:
    adapter_class = export_adapter_class(family)
    assert issubclass(adapter_class, ExportAdapter) and not adapter_class.__abstractmethods__ and adapter_class.family == family


def test_the_preprocessor_config_is_copied_unless_the_adapter_changes_it(tmp_path: Path) -> None:
    """Default: the checkpoint's own bytes (formatting kept); an adapter that changes settings gets them written."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    original = '{"size": {"shortest_edge": 8},   "crop_size": 8}'  # odd spacing, no newline: kept as is
    (checkpoint / "preprocessor_config.json").write_text(original)
    adapter = FourthFamily(checkpoint)
    _write_preprocessor_config(adapter, checkpoint, tmp_path / "default.json")
    assert (tmp_path / "default.json").read_text() == original

    class WithPatch(FourthFamily):
        def artifact_preprocessor_config(self, model_dir):
            return {**super().artifact_preprocessor_config(model_dir), "patch_size": 4}

    _write_preprocessor_config(WithPatch(checkpoint), checkpoint, tmp_path / "changed.json")
    assert json.loads((tmp_path / "changed.json").read_text()) == {"size": {"shortest_edge": 8}, "crop_size": 8, "patch_size": 4}
