"""The LLaVA export adapter against Hugging Face itself: [CLS] attention, visual tokens, text info,
and `resolve_source` errors for directories that are not LLaVA checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prunert.adapters import resolve_source
from prunert.adapters.llava.export import LlavaExportAdapter
from prunert.errors import ModelSourceError

BATCH = 2


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint: Path) -> LlavaExportAdapter:
    return LlavaExportAdapter(tiny_checkpoint)


@pytest.fixture(scope="module")
def pixels(adapter: LlavaExportAdapter) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 3, adapter.image_size, adapter.image_size, generator=generator)


def test_adapter_basics(adapter: LlavaExportAdapter) -> None:
    config = adapter.model.config
    assert adapter.num_visual_tokens == 100 and adapter.image_size == 140
    assert adapter.feature_layer == config.vision_feature_layer == -2
    assert adapter.drop_cls is True
    assert adapter.model.config._attn_implementation == "eager"
    assert adapter.embedding_table().shape == (config.text_config.vocab_size, config.text_config.hidden_size)
    assert adapter.example_vision_inputs(2)[0].shape == (2, 3, 140, 140)
    assert adapter.vision_input_specs() == [("pixel_values", "float32", ("batch", 3, 140, 140))]
    assert adapter.family_config() == {"vision_feature_layer": -2, "image_size": 140}


def test_cls_attention_matches_hf_eager_attentions(adapter: LlavaExportAdapter, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = adapter.model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        ours = adapter.cls_attention(pixels)
    # hidden_states[i] is the output of encoder layer i-1: the feature layer's own attention
    feature_index = adapter.feature_layer % len(out.hidden_states)
    attentions = out.attentions[feature_index - 1]  # [B, heads, 1+N, 1+N]
    expected = attentions.mean(dim=1)[:, 0, 1:]  # head-averaged [CLS] -> patches [B, N]
    assert ours.shape == (BATCH, adapter.num_visual_tokens)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours > 0).all() and (ours.sum(-1) < 1).all()  # the CLS->CLS weight is excluded
    # not trivially the wrong layer: the neighbouring layers' attention differs
    for other in {0, len(out.attentions) - 1} - {feature_index - 1}:
        assert not torch.allclose(out.attentions[other].mean(1)[:, 0, 1:], ours, atol=1e-3)


def test_visual_tokens_match_hf_image_features(adapter: LlavaExportAdapter, pixels: torch.Tensor) -> None:
    config = adapter.model.config
    with torch.no_grad():
        ours = adapter.visual_tokens(pixels)
        features = adapter.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    pooled = getattr(features, "pooler_output", features)  # transformers 5: per-image list of [N, D]
    expected = torch.stack(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    assert ours.shape == (BATCH, adapter.num_visual_tokens, config.text_config.hidden_size)
    torch.testing.assert_close(ours, expected.reshape(ours.shape), atol=1e-6, rtol=0)


def test_text_info_matches_checkpoint(adapter: LlavaExportAdapter, tiny_checkpoint: Path) -> None:
    info = adapter.text_info(tiny_checkpoint)
    assert info["image_token"] == "<image>"
    assert info["image_token_id"] == adapter.model.config.image_token_index == 4
    assert info["bos_token_id"] == 1 and info["eos_token_ids"] == (2,) and info["pad_token_id"] == 3
    assert info["prompt_template"] == "USER: {prompt} ASSISTANT:"
    ids = adapter.hf_token_ids(info["prompt_template"].format(prompt="<image>\nhi"), tiny_checkpoint)
    assert ids[0] == info["bos_token_id"] and ids.count(info["image_token_id"]) == 1


# ---------------------------------------------------------------------------------------- resolve_source


def test_resolve_synthetic_and_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = resolve_source("synthetic:llava-tiny")
    assert source.path == tiny_checkpoint and source.family == "llava" and source.synthetic
    assert source.config["model_type"] == "llava"
    # a plain directory holding the synthetic marker is still flagged synthetic ...
    assert resolve_source(str(tiny_checkpoint)).synthetic
    # ... and one without it is not
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_checkpoint / name, plain / name)
    source = resolve_source(str(plain))
    assert source.synthetic is False and source.label == str(plain)


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("unknown-preset", "unknown synthetic preset"),
        ("missing", "not a directory"),
        ("file", "not a directory"),
        ("no-config", "no config.json"),
        ("bad-json", "not valid JSON"),
        ("bert", "model_type 'bert' is not supported"),
        ("no-model-type", "model_type None"),
        ("no-safetensors", "no *.safetensors"),
    ],
)
def test_resolve_source_errors(tmp_path: Path, tiny_checkpoint: Path, kind: str, needle: str) -> None:
    path = tmp_path / "model"
    if kind == "unknown-preset":
        spec = "synthetic:llava-giant"
    else:
        spec = str(path)
        if kind == "file":
            path.write_text("x")
        elif kind != "missing":
            path.mkdir()
        config = {
            "bad-json": "{",
            "bert": json.dumps({"model_type": "bert"}),
            "no-model-type": json.dumps({"architectures": ["LlavaForConditionalGeneration"]}),
            "no-safetensors": (tiny_checkpoint / "config.json").read_text(),
        }.get(kind)
        if config is not None:
            (path / "config.json").write_text(config)
    with pytest.raises(ModelSourceError, match=needle.replace("*", r"\*").replace("(", r"\(")) as info:
        resolve_source(spec)
    assert repr(spec) in str(info.value)  # names the input


def test_corrupt_weights_are_a_model_source_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "corrupt"
    path.mkdir()
    shutil.copyfile(tiny_checkpoint / "config.json", path / "config.json")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="cannot load as LlavaForConditionalGeneration"):
        LlavaExportAdapter(path)
