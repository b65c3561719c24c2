"""Calibration set loading (errors name their input) and the fp32 feeds collected for each graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunert.calibration.dataset import (
    BUILTIN_PROMPTS,
    DECODE_SAMPLES,
    DECODE_STEPS,
    IMAGE_PLACEHOLDER,
    collect_feeds,
    load_calibration_set,
)
from prunert.errors import ConfigError, ImageError, PromptError
from prunert.runtime.runner import check_inputs

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "calibration"
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # manifest.text.placeholder of a Qwen2.5-VL artifact


def _photo(path: Path, size=(64, 48), color=(200, 30, 40)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def test_builtin_prompts_have_one_placeholder_each():
    assert 10 <= len(BUILTIN_PROMPTS) <= 16
    assert len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)
    assert all(prompt.count(IMAGE_PLACEHOLDER) == 1 for prompt in BUILTIN_PROMPTS)


def test_examples_set_pairs_round_robin_and_is_deterministic():
    prompts = EXAMPLES / "prompts.txt"
    first = load_calibration_set(EXAMPLES, prompts, max_samples=32)
    again = load_calibration_set(EXAMPLES, prompts, max_samples=32)
    assert first == again
    names = [p.name for p in first.images]
    assert names == sorted(names) and 8 <= len(names) <= 12
    assert all(p.suffix == ".jpg" for p in first.images)  # prompts.txt and SOURCES.md are not images
    assert len(first.samples) == max(len(first.images), len(first.prompts))
    for i, sample in enumerate(first.samples):
        assert sample.image == first.images[i % len(first.images)]
        assert sample.prompt == first.prompts[i % len(first.prompts)]
        assert sample.prompt.count("<image>") == 1 and sample.prompt.startswith("<image>\n")  # \n unescaped
    capped = load_calibration_set(EXAMPLES, None, max_samples=3)
    assert len(capped.samples) == 3 and capped.builtin_prompts
    assert capped.summary()["samples"] == 3 and capped.summary()["images"] == [p.name for p in capped.images[:3]]


def test_example_images_are_small_rgb_jpegs():
    for path in sorted(EXAMPLES.glob("*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert max(image.size) <= 640
    assert (EXAMPLES / "SOURCES.md").is_file()


def test_missing_and_empty_directories_name_the_input(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(ImageError, match="nope"):
        load_calibration_set(missing, None, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="empty.*no image files"):
        load_calibration_set(empty, None, 4)
    a_file = _photo(tmp_path / "one.png")
    with pytest.raises(ImageError, match="not a directory"):
        load_calibration_set(a_file, None, 4)


def test_unreadable_image_is_named(tmp_path: Path):
    _photo(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        load_calibration_set(tmp_path, None, 4)


def test_prompt_errors_name_file_and_line(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    _photo(images / "a.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment with no placeholder\n<image> fine\n\nno placeholder here\n")
    with pytest.raises(PromptError, match=r"prompts.txt' line 4.*0 times"):
        load_calibration_set(images, prompts, 4)
    prompts.write_text("<image> twice <image>\n")
    with pytest.raises(PromptError, match="line 1.*2 times"):
        load_calibration_set(images, prompts, 4)
    prompts.write_text("# only comments\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        load_calibration_set(images, prompts, 4)
    with pytest.raises(ConfigError, match="missing.txt"):
        load_calibration_set(images, tmp_path / "missing.txt", 4)
    prompts.write_text("<img> custom token\n")
    assert load_calibration_set(images, prompts, 4, placeholder="<img>").prompts == ("<img> custom token",)


def test_builtin_placeholder_follows_the_artifact_placeholder():
    calibration = load_calibration_set(EXAMPLES, None, max_samples=2)
    assert calibration.prompts_for("<image>") == [s.prompt for s in calibration.samples]
    assert all(p.count("<IMG>") == 1 and "<image>" not in p for p in calibration.prompts_for("<IMG>"))
    qwen = calibration.prompts_for(QWEN_PLACEHOLDER)  # the full placeholder, not just the <|image_pad|> token
    assert qwen == [s.prompt.replace("<image>", QWEN_PLACEHOLDER) for s in calibration.samples]
    assert all(p.startswith(QWEN_PLACEHOLDER + "\n") and p.count("<|image_pad|>") == 1 for p in qwen)


def test_prompt_files_need_the_full_placeholder(tmp_path: Path):
    """A Qwen2.5-VL artifact's prompts carry <|vision_start|><|image_pad|><|vision_end|>: `<image>` or the bare
    image token is refused, naming the file, the line and the placeholder expected."""
    images = tmp_path / "images"
    images.mkdir()
    _photo(images / "a.png")
    prompts = tmp_path / "qwen_prompts.txt"
    for bad in ("<image>\nWhat is it?", "<|image_pad|>What is it?"):
        prompts.write_text(f"{QWEN_PLACEHOLDER}Fine.\n{bad}\n")
        with pytest.raises(PromptError, match="qwen_prompts.txt' line 2") as info:
            load_calibration_set(images, prompts, 4, placeholder=QWEN_PLACEHOLDER)
        assert repr(QWEN_PLACEHOLDER) in str(info.value) and "0 times, expected exactly once" in str(info.value)
    prompts.write_text(f"{QWEN_PLACEHOLDER}What is it?\\nAnswer briefly.\n")
    calibration = load_calibration_set(images, prompts, 4, placeholder=QWEN_PLACEHOLDER)
    assert calibration.prompts == (f"{QWEN_PLACEHOLDER}What is it?\nAnswer briefly.",)
    assert calibration.prompts_for(QWEN_PLACEHOLDER) == [calibration.prompts[0]]  # user prompts are used as written


def test_collect_feeds_match_the_manifest_specs(tiny_pipeline):
    calibration = load_calibration_set(EXAMPLES, None, max_samples=DECODE_SAMPLES + 1)
    runners = tiny_pipeline.vision, tiny_pipeline.decoder
    feeds = collect_feeds(tiny_pipeline, calibration)
    assert (tiny_pipeline.vision, tiny_pipeline.decoder) == runners  # the recorders are removed again
    manifest = tiny_pipeline.manifest
    samples = len(calibration.samples)
    assert len(feeds["vision"]) == samples
    assert len(feeds["decoder"]) == samples + DECODE_SAMPLES * DECODE_STEPS
    for graph, items in feeds.items():
        for feed in items:
            check_inputs(manifest.graphs[graph], feed)  # names, dtypes, static sizes, consistent dims
            assert all(feed[t.name].shape[0] == 1 for t in manifest.graphs[graph].inputs)
    past = [f["past_key_values.0.key"].shape[2] for f in feeds["decoder"]]
    prefill = [f for f, length in zip(feeds["decoder"], past) if length == 0]
    steps = [f for f, length in zip(feeds["decoder"], past) if length > 0]
    assert len(prefill) == samples and len(steps) == DECODE_SAMPLES * DECODE_STEPS
    for feed in prefill:
        assert feed["inputs_embeds"].shape[1] > manifest.budget.budget  # the K visual tokens are spliced in
        assert np.array_equal(feed["position_ids"][0], np.arange(feed["inputs_embeds"].shape[1]))
    for feed in steps:
        assert feed["inputs_embeds"].shape[1] == 1
        assert feed["attention_mask"].shape[1] == feed["past_key_values.0.key"].shape[2] + 1
