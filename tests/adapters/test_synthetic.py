"""Synthetic LLaVA-1.5 checkpoints: determinism, HF round trip, tokenizer, logit spread, atomicity.

Only `llava-tiny` is ever built here; `llava-1.5-shaped` is checked on the meta device.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prunert.adapters.llava import synthetic  # noqa: E402
from prunert.adapters.llava.synthetic import (  # noqa: E402
    LLAVA_PROMPT_TEMPLATE,
    MARKER_FILE,
    PRESETS,
    build_config,
    build_model,
    parameter_counts,
    synthetic_checkpoint,
    write_checkpoint,
)
from prunert.adapters.llava.tokenizer_builder import build_tokenizer  # noqa: E402
from prunert.errors import ConfigError, ModelSourceError  # noqa: E402

TINY = "llava-tiny"
PROMPTS = (
    "<image>\nWhat is in the picture?",
    "<image>\nDescribe the image in detail.",
    "<image>\nHow many people are in the photo?",
    "<image>\nWhat color is the car?",
    "<image>\nIs there a cat in the image?",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(TINY, tmp_path_factory.mktemp("synthetic") / TINY)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path):
    return transformers.LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pixels(seed: int, preset=PRESETS[TINY]) -> torch.Tensor:
    """Random CLIP-normalised pixels [1, 3, image_size, image_size]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, preset.image_size, preset.image_size, generator=generator)


def _input_ids(tokenizer, prompt: str, num_patches: int) -> torch.Tensor:
    """Prompt ids [1, seq] with `<image>` expanded to one id per visual token."""
    text = LLAVA_PROMPT_TEMPLATE.format(prompt=prompt).replace("<image>", "<image>" * num_patches)
    return torch.tensor([tokenizer(text).input_ids])


def test_directory_has_hf_files(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", MARKER_FILE}
    assert expected <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["preset"] == TINY and marker["synthetic"] is True and marker["seed"] == PRESETS[TINY].seed
    processor = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "CLIPImageProcessor"
    assert processor["crop_size"] == {"height": 140, "width": 140}
    assert not list(tiny_dir.parent.glob(".*tmp-*")), "temporary directory left behind"


def test_config_matches_preset(tiny_dir: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "llava"
    assert config.image_token_index == 4 and config.image_seq_length == 100
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.text_config.vocab_size == PRESETS[TINY].vocab_size
    assert config.text_config.pad_token_id == 3


def test_two_writes_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_checkpoint(TINY, tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_dir / name), name


def test_build_model_is_bit_identical() -> None:
    first, second = build_model(PRESETS[TINY]).state_dict(), build_model(PRESETS[TINY]).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_round_trip_gives_identical_outputs(tiny_model, hf_tokenizer) -> None:
    fresh = build_model(PRESETS[TINY])
    ids = _input_ids(hf_tokenizer, PROMPTS[0], PRESETS[TINY].num_patches)
    with torch.no_grad():
        loaded = tiny_model(input_ids=ids, pixel_values=_pixels(0)).logits
        built = fresh(input_ids=ids, pixel_values=_pixels(0)).logits
    assert torch.equal(loaded, built)


def test_auto_tokenizer_loads_with_specials(hf_tokenizer) -> None:
    assert hf_tokenizer.is_fast
    assert (hf_tokenizer.unk_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (0, 1, 2)
    assert hf_tokenizer.pad_token_id == 3
    ids = hf_tokenizer(LLAVA_PROMPT_TEMPLATE.format(prompt="<image>\nWhat is this?")).input_ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids.count(4) == 1 and hf_tokenizer.convert_ids_to_tokens(4) == "<image>"


def test_tokenizer_vocab_matches_config_and_every_id_decodes(tiny_dir: Path, hf_tokenizer) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    assert len(hf_tokenizer) == config.text_config.vocab_size
    raw = build_tokenizer(config.text_config.vocab_size)
    assert raw.get_vocab_size(with_added_tokens=True) == config.text_config.vocab_size
    assert all(raw.decode([i], skip_special_tokens=False) for i in range(config.text_config.vocab_size))


def test_tokenizer_is_deterministic_and_round_trips_ascii() -> None:
    assert build_tokenizer(1024).to_str() == build_tokenizer(1024).to_str()
    tokenizer = build_tokenizer(1024)
    text = "Hello, World! 42 zebras ~ {x: 'y'}\tqux\nThe end."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_padded_vocabulary_has_exact_size() -> None:
    tokenizer = build_tokenizer(4000)  # far more than the corpus can train: fillers pad it
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 4000
    assert tokenizer.decode([3999]) == "<extra_{}>".format(3999 - synthetic.num_trained_tokens(tokenizer))


def test_logits_are_not_near_uniform(tiny_model, hf_tokenizer) -> None:
    margins, stds = [], []
    for seed, prompt in enumerate(PROMPTS):
        ids = _input_ids(hf_tokenizer, prompt, PRESETS[TINY].num_patches)
        with torch.no_grad():
            logits = tiny_model(input_ids=ids, pixel_values=_pixels(seed)).logits[0, -1]  # [vocab]
        top2 = logits.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        stds.append(float(logits.std()))
    assert np.median(margins) > 0.05, margins
    assert 1.0 < np.median(stds) < 4.0, stds


def test_image_and_patches_matter(tiny_model, hf_tokenizer) -> None:
    """Distinct patch features, and a different image changes the next-token logits."""
    with torch.no_grad():
        hidden = tiny_model.model.vision_tower(_pixels(0), output_hidden_states=True).hidden_states[-2]
        patches = torch.nn.functional.normalize(hidden[0, 1:], dim=-1)  # [num_patches, vision_hidden]
        cosines = patches @ patches.T
        off_diagonal = cosines[~torch.eye(len(cosines), dtype=torch.bool)]
        assert off_diagonal.mean() < 0.9
        ids = _input_ids(hf_tokenizer, PROMPTS[0], PRESETS[TINY].num_patches)
        first = tiny_model(input_ids=ids, pixel_values=_pixels(0)).logits[0, -1]
        second = tiny_model(input_ids=ids, pixel_values=_pixels(1)).logits[0, -1]
    assert (first - second).abs().max() > 0.1


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "save_pretrained", explode)
    out_dir = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(TINY, out_dir)
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_not_overwritten(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not empty"):
        write_checkpoint(TINY, tiny_dir)


def test_synthetic_checkpoint_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNERT_CACHE", str(tmp_path))
    first = synthetic_checkpoint(TINY)
    assert first.parent == tmp_path / "synthetic" and first.name.startswith(f"{TINY}-")
    calls = []
    monkeypatch.setattr(synthetic, "write_checkpoint", lambda *a, **k: calls.append(a))
    assert synthetic_checkpoint(TINY) == first and calls == []
    synthetic_checkpoint(TINY, cache_dir=tmp_path / "other")  # a cache miss writes
    assert len(calls) == 1 and Path(calls[0][1]).parent == tmp_path / "other"


def test_unknown_preset_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="llava-tiny"):
        synthetic_checkpoint("llava-huge", cache_dir=tmp_path)
    with pytest.raises(ModelSourceError, match="available"):
        write_checkpoint("nope", tmp_path / "x")


def test_llava_15_shaped_parameter_counts() -> None:
    preset = PRESETS["llava-1.5-shaped"]
    counts = parameter_counts(preset)
    assert preset.num_patches == 576
    assert 0.45e9 <= counts["decoder"] <= 0.55e9
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(build_config(preset, build_tokenizer(preset.vocab_size)))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision"] == sum(p.numel() for p in model.model.vision_tower.parameters())
