"""The LLaVA-NeXT export adapter against Hugging Face: the static tile layout's tokens are HF's packed
image features (minus image_newline), the [CLS] per tile comes from the feature layer, HF's processor
laid out by `hf_vision_inputs` equals the host's preprocessing, the tile-budget settings travel in
family_config, and methods without per-tile support are refused with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from prunert import cli  # noqa: E402
from prunert.adapters import resolve_source  # noqa: E402
from prunert.adapters.llava_next.export import LlavaNextExportAdapter  # noqa: E402
from prunert.adapters.llava_next.host import AnyresConfig, LlavaNextHostAdapter, hf_packed_positions  # noqa: E402
from prunert.adapters.llava_next.synthetic import synthetic_checkpoint  # noqa: E402
from prunert.config import BudgetConfig  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402
from prunert.export.graphs import TiledSelection, selection_module  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"


def _images() -> list[Image.Image]:
    """Wide photo (3:2, 4 tiles) and a tall noise image (2 tiles, columns unpadded away)."""
    with Image.open(IMAGES / "chelsea.jpg") as opened:
        wide = opened.convert("RGB")
    tall = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 60, 3), dtype=np.uint8))
    return [wide, tall]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return synthetic_checkpoint("llava-next-tiny")


@pytest.fixture(scope="module")
def adapter(checkpoint: Path) -> LlavaNextExportAdapter:
    return LlavaNextExportAdapter(checkpoint)


def test_adapter_layout_and_manifest_pieces(adapter: LlavaNextExportAdapter, checkpoint: Path) -> None:
    assert (adapter.max_tiles, adapter.tokens_per_tile, adapter.num_visual_tokens) == (5, 16, 80)
    assert adapter.vision_input_specs() == [
        ("pixel_values", "float32", ("batch", 5, 3, 56, 56)),
        ("tile_mask", "int64", ("batch", 5)),
        ("token_mask", "int64", ("batch", 5, 16)),
    ]
    pixels, tile_mask, token_mask = adapter.example_vision_inputs(2)
    assert pixels.shape == (2, 5, 3, 56, 56) and tile_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert token_mask[0].all() and token_mask[1, 0].all() and token_mask[1, 1:3].sum() == 24 and not token_mask[1, 3:].any()
    config = adapter.family_config()
    assert config["max_tiles"] == 5 and config["tokens_per_tile"] == 16 and config["patch_size"] == 14
    assert config["tile_budgets"] == {"thumbnail_share": 0.25, "text_weight": 0.5, "temperature": 0.1}
    assert adapter.text_info(checkpoint)["prompt_template"] == "USER: {prompt} ASSISTANT:"
    assert resolve_source("synthetic:llava-next-tiny").family == "llava_next"


def test_tokens_and_cls_match_hf(adapter: LlavaNextExportAdapter, checkpoint: Path) -> None:
    """Every valid token of our [B, T, N, D] layout is HF's packed feature at `hf_packed_positions`."""
    images = _images()
    inputs = adapter.hf_vision_inputs(images, checkpoint)
    hf = adapter.model.model
    processed = _hf_processor(checkpoint)(images=images, return_tensors="pt")
    cfg = AnyresConfig.from_hf_dict(adapter.artifact_preprocessor_config(checkpoint))
    with torch.no_grad():
        ours = adapter.vision_features(inputs["pixel_values"], inputs["tile_mask"], inputs["token_mask"])
        packed = hf.get_image_features(processed["pixel_values"], processed["image_sizes"]).pooler_output  # B x [L_b, D]
        states = hf.vision_tower(inputs["pixel_values"].flatten(0, 1), output_hidden_states=True).hidden_states
    assert ours["tokens"].shape == (2, 5, 16, 64) and ours["tile_cls"].shape == (2, 5, 64)
    torch.testing.assert_close(ours["tile_cls"].flatten(0, 1), states[-2][:, 0], atol=0, rtol=0)
    for b, image in enumerate(images):
        positions, length = hf_packed_positions((image.height, image.width), cfg)
        keep = inputs["token_mask"][b].bool()
        assert length == len(packed[b]) and keep.tolist() == (positions >= 0).tolist()
        torch.testing.assert_close(ours["tokens"][b][keep], packed[b][torch.from_numpy(positions)[keep]], atol=1e-5, rtol=1e-5)


def _hf_processor(checkpoint: Path):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil.from_pretrained(checkpoint)


def test_hf_vision_inputs_equal_the_host(adapter: LlavaNextExportAdapter, checkpoint: Path) -> None:
    images = _images()
    reference = adapter.hf_vision_inputs(images, checkpoint)
    ours = LlavaNextHostAdapter({}, 0).vision_inputs(images, adapter.artifact_preprocessor_config(checkpoint))
    assert list(reference) == list(adapter.vision_input_names)
    for name in adapter.vision_input_names:
        np.testing.assert_array_equal(reference[name].numpy(), ours[name], err_msg=name)
    assert reference["tile_mask"].sum(1).tolist() == [5, 3]


def test_artifact_preprocessor_config_adds_patch_size(adapter: LlavaNextExportAdapter, checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    del config["patch_size"]  # as in a downloaded llava-hf checkpoint
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert adapter.artifact_preprocessor_config(tmp_path) == {**config, "patch_size": 14}


def test_selection_follows_family_config_and_refuses_other_methods(adapter: LlavaNextExportAdapter) -> None:
    budget = BudgetConfig(budget=10)
    assert isinstance(selection_module(adapter, budget), TiledSelection)
    thumbnail_only = {**adapter.family_config(), "tile_budgets": {"thumbnail_share": 1.0, "text_weight": 0.5, "temperature": 0.1}}
    module = selection_module(adapter, budget, thumbnail_only)
    with torch.no_grad():
        features = adapter.vision_features(*adapter.example_vision_inputs(2))
        text = {"text": torch.randn(2, 3, 64), "text_mask": torch.ones(2, 3, dtype=torch.int64)}
        _, kept = module({**features, **text})
    assert (kept < 16).all()  # the whole budget stayed in the thumbnail
    with pytest.raises(ConfigError, match="does not support per-tile budgets"):
        selection_module(adapter, BudgetConfig(budget=10, method="divprune"))


def test_cli_export_with_untiled_method_is_one_error_line(capsys, error_line, tmp_path: Path) -> None:
    out = tmp_path / "art"
    code = cli.main(["export", "--model", "synthetic:llava-next-tiny", "--budget", "8", "--method", "cls_attention", "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, "cls_attention", "does not support per-tile budgets")
    assert not out.exists() and not any(tmp_path.iterdir())
