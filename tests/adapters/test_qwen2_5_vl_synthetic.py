"""Synthetic Qwen2.5-VL checkpoints: HF round trip, processor + forward on a real image, the host's
numpy inputs against the loaded model's own, and a vision forward driven only by host inputs.

Only `qwen2.5-vl-tiny` is built; `qwen2.5-vl-shaped` is checked on the meta device.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import vision_utils  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision  # noqa: E402

from prunert.adapters.qwen2_5_vl import IMAGE_PLACEHOLDER, QWEN_PROMPT_TEMPLATE, host, synthetic  # noqa: E402
from prunert.adapters.qwen2_5_vl.synthetic import PRESETS, QwenSyntheticPreset, write_checkpoint  # noqa: E402
from prunert.errors import ConfigError  # noqa: E402

TINY = "qwen2.5-vl-tiny"
IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
PROMPT = "What is in the picture?"


class ImageOnlyProcessor(transformers.Qwen2_5_VLProcessor):
    """HF's Qwen2_5_VLProcessor without its video processor (which needs torchvision, absent here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(TINY, tmp_path_factory.mktemp("synthetic") / TINY)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    image_processor = transformers.AutoImageProcessor.from_pretrained(tiny_dir)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module")
def family(tiny_dir: Path) -> dict:
    return host.family_config(json.loads((tiny_dir / "config.json").read_text()))


def _inputs(processor, image_name: str = "chelsea.jpg"):
    image = Image.open(IMAGES / image_name).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return image, processor(text=[text], images=[image], return_tensors="pt")


def test_directory_has_hf_files(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", synthetic.MARKER_FILE} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    marker = json.loads((tiny_dir / synthetic.MARKER_FILE).read_text())
    assert marker["preset"] == TINY and marker["synthetic"] is True and marker["family"] == "qwen2_5_vl"
    assert not list(tiny_dir.parent.glob(".*tmp-*"))


def test_config_and_tokenizer_agree(tiny_dir: Path, processor) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    tokenizer = processor.tokenizer
    assert config.model_type == "qwen2_5_vl"
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(tokenizer) == config.text_config.vocab_size == PRESETS[TINY].vocab_size
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    ids = tokenizer("Hello" + IMAGE_PLACEHOLDER).input_ids  # no BOS, the vision tokens are single ids
    assert ids[-3:] == [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]
    assert tokenizer.bos_token is None


def test_chat_template_is_the_prompt_template(processor) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == QWEN_PROMPT_TEMPLATE.format(prompt=IMAGE_PLACEHOLDER + PROMPT)


def test_hf_forward_and_host_inputs_on_a_real_image(tiny_dir: Path, tiny_model, processor) -> None:
    image, inputs = _inputs(processor)
    ours = host.vision_inputs([image], json.loads((tiny_dir / "preprocessor_config.json").read_text()))
    assert np.array_equal(ours["image_grid_thw"], inputs["image_grid_thw"].numpy())  # [[1, 12, 18]]
    assert np.abs(ours["pixel_values"] - inputs["pixel_values"].numpy()).max() <= 1e-6
    with torch.no_grad():
        logits = tiny_model(**inputs).logits[0, -1]
    top2 = logits.topk(2).values
    assert 1.0 < float(logits.std()) < 4.0 and float(top2[0] - top2[1]) > 1e-3
    ref, ref_deltas = tiny_model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    positions, deltas = host.rope_index(inputs["input_ids"].numpy(), inputs["image_grid_thw"].numpy(),
                                        image_token_id=tiny_model.config.image_token_id,
                                        attention_mask=inputs["attention_mask"].numpy())
    assert np.array_equal(positions, ref.numpy()) and np.array_equal(deltas, ref_deltas.numpy())


def test_another_image_changes_the_logits(tiny_model, processor) -> None:
    with torch.no_grad():
        first = tiny_model(**_inputs(processor, "chelsea.jpg")[1]).logits[0, -1]
        second = tiny_model(**_inputs(processor, "coffee.jpg")[1]).logits[0, -1]
    assert (first - second).abs().max() > 0.1


def test_host_metadata_is_what_the_vision_blocks_receive(tiny_model, processor, family) -> None:
    _, inputs = _inputs(processor)
    visual = tiny_model.model.visual
    grid = inputs["image_grid_thw"]
    meta = host.vision_metadata(grid.numpy(), family)
    seen = {}

    def capture(module, args, kwargs):
        seen[module] = (kwargs["cu_seqlens"], kwargs["position_embeddings"])

    hooks = [block.register_forward_pre_hook(capture, with_kwargs=True) for block in visual.blocks]
    try:
        with torch.no_grad():
            pooled = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
    finally:
        for hook in hooks:
            hook.remove()
    full_layers = set(visual.fullatt_block_indexes)
    assert 0 < len(full_layers) < len(visual.blocks)  # both attention kinds occur
    assert len(meta["cu_window_seqlens"]) - 1 == 15  # 6x9 merged tokens in 2x2 windows: 3 x 5 windows
    for layer, block in enumerate(visual.blocks):
        cu, (cos, sin) = seen[block]
        expected = meta["cu_seqlens"] if layer in full_layers else meta["cu_window_seqlens"]
        assert np.array_equal(cu.numpy(), expected) and cu.dtype == torch.int32
        assert np.abs(cos.numpy() - meta["rotary_cos"]).max() <= 1e-6 and np.abs(sin.numpy() - meta["rotary_sin"]).max() <= 1e-6
    index, _ = vision_utils.get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    assert np.array_equal(meta["window_index"], index.numpy())
    assert pooled.shape == (54, tiny_model.config.text_config.hidden_size)


def _masked_vision_forward(visual, pixel_values: torch.Tensor, meta: dict) -> torch.Tensor:
    """The exported vision graph's computation: no cu_seqlens splits, only static-shape inputs
    (patch permutation, rotary tables, two additive masks, reverse index)."""
    x = visual.patch_embed(pixel_values[torch.from_numpy(host.patch_permutation(meta["window_index"], 2))])
    cos, sin = torch.from_numpy(meta["rotary_cos"]), torch.from_numpy(meta["rotary_sin"])
    masks = {kind: torch.from_numpy(host.additive_mask(meta[f"{kind}_attention_mask"])) for kind in ("full", "window")}
    for layer, block in enumerate(visual.blocks):
        mask = masks["full" if layer in visual.fullatt_block_indexes else "window"]
        attn, length = block.attn, x.shape[0]
        q, k, v = attn.qkv(block.norm1(x)).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, P, head_dim]
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scaling + mask, dim=-1)
        x = x + attn.proj((probs @ v).transpose(0, 1).reshape(length, -1))
        x = x + block.mlp(block.norm2(x))
    return visual.merger(x)[torch.from_numpy(meta["reverse_index"])]


def test_vision_forward_from_host_inputs_matches_hf(tiny_model, processor, family) -> None:
    _, inputs = _inputs(processor)
    meta = host.vision_metadata(inputs["image_grid_thw"].numpy(), family)
    with torch.no_grad():
        ref = tiny_model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        ours = _masked_vision_forward(tiny_model.model.visual, inputs["pixel_values"], meta)
    assert float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_pruned_tokens_keep_positions_and_renumbering_changes_logits(tiny_model, processor) -> None:
    _, inputs = _inputs(processor)
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    image_id = tiny_model.config.image_token_id
    with torch.no_grad():
        visual = tiny_model.model.get_image_features(inputs["pixel_values"], grid).pooler_output[0]  # [54, D]
        embeds = tiny_model.get_input_embeddings()(ids)
        embeds[ids == image_id] = visual
        positions, _ = host.rope_index(ids.numpy(), grid.numpy(), image_token_id=image_id)
        full = tiny_model(inputs_embeds=embeds, position_ids=torch.from_numpy(positions)).logits[0, -1]
        assert float((full - tiny_model(**inputs).logits[0, -1]).abs().max()) <= 1e-4  # host positions drive HF's decoder

        kept = np.sort(np.random.default_rng(0).choice(54, 16, replace=False))
        start = int(np.flatnonzero(ids[0].numpy() == image_id)[0])
        rows = np.concatenate([np.arange(start), start + kept, np.arange(start + 54, ids.shape[1])])
        pruned_ids, pruned_embeds = ids[:, rows], embeds[:, rows]
        pruned, _ = host.pruned_rope_index(pruned_ids.numpy(), [kept], grid.numpy(), image_token_id=image_id)
        assert np.array_equal(pruned, positions[:, :, rows])
        renumbered, _ = host.rope_index(pruned_ids.numpy(), [[1, 8, 8]], image_token_id=image_id)  # a dense 4x4 grid
        kept_logits = tiny_model(inputs_embeds=pruned_embeds, position_ids=torch.from_numpy(pruned)).logits[0, -1]
        renumbered_logits = tiny_model(inputs_embeds=pruned_embeds, position_ids=torch.from_numpy(renumbered)).logits[0, -1]
    assert float((kept_logits - renumbered_logits).abs().max()) > 1e-3


def test_two_writes_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_checkpoint(TINY, tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert hashlib.sha256((again / name).read_bytes()).digest() == hashlib.sha256((tiny_dir / name).read_bytes()).digest()


def test_synthetic_checkpoint_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNERT_CACHE", str(tmp_path))
    calls = []

    def fake_write(name: str, out: Path) -> Path:  # the real writer is covered by tiny_dir
        calls.append(out)
        out.mkdir(parents=True)
        (out / synthetic.MARKER_FILE).write_text("{}")
        return out

    monkeypatch.setattr(synthetic, "write_checkpoint", fake_write)
    first = synthetic.synthetic_checkpoint(TINY)
    assert first.parent == tmp_path / "synthetic" and first.name == f"{TINY}-{synthetic.preset_hash(PRESETS[TINY])}"
    assert synthetic.synthetic_checkpoint(TINY) == first and len(calls) == 1
    assert synthetic.preset_hash(PRESETS[TINY]) != synthetic.preset_hash(PRESETS["qwen2.5-vl-shaped"])


def test_shaped_preset_on_meta_device() -> None:
    preset = PRESETS["qwen2.5-vl-shaped"]
    counts = synthetic.parameter_counts(preset)
    assert 0.6e9 < counts["vision"] < 0.7e9, counts  # Qwen2.5-VL-3B's tower (merger to 896 wide)
    assert 0.45e9 < counts["decoder"] < 0.52e9, counts  # Qwen2.5-0.5B's shape, tied embeddings
    assert preset.max_visual_tokens == 576 and preset.window_size // preset.factor == 4


def test_preset_validation() -> None:
    base = {k: v for k, v in PRESETS[TINY].__dict__.items()}
    with pytest.raises(ConfigError, match="mrope_section"):
        QwenSyntheticPreset(**{**base, "mrope_section": (2, 2, 2)})
    with pytest.raises(ConfigError, match="window_size"):
        QwenSyntheticPreset(**{**base, "window_size": 40})
    with pytest.raises(ConfigError, match="fullatt"):
        QwenSyntheticPreset(**{**base, "fullatt_block_indexes": (4,)})
