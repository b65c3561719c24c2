"""Several images per prompt (LLaVA-NeXT, Qwen2.5-VL): one image placeholder per image, or none (the chat template
places them), each image pruned to the artifact's own K and spliced at its placeholder; `prunert run --image a
--image b --prompt ...`, the Python API (generate with a list of images per prompt, chat with several image parts);
and the bad cases: placeholders that are not one per image, LLaVA-1.5's second image, images that outgrow the
exported sequence (each one line, exit 2 through the CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prunert.config import GenerationConfig
from prunert.errors import PromptError
from prunert.runtime import VLMPipeline
from prunert.runtime.chat import user_turn

REPO = Path(__file__).resolve().parents[2]
PHOTOS = [REPO / "examples" / "images" / f"{name}.jpg" for name in ("chelsea", "astronaut")]
QUESTION = "Which picture shows the cat?"
PLACEHOLDERS = {"next": "<image>\n", "qwen": "<|vision_start|><|image_pad|><|vision_end|>"}
BUDGETS = {"next": 12, "qwen": 16}
GREEDY = GenerationConfig(max_new_tokens=6)
IMAGE = {"type": "image"}


class Family:
    def __init__(self, name: str, artifact: Path):
        self.name, self.artifact, self.pipe = name, artifact, VLMPipeline(artifact)
        self.placeholder, self.budget = PLACEHOLDERS[name], BUDGETS[name]

    def prompt(self, images: int) -> str:
        return self.placeholder * images + QUESTION


@pytest.fixture(scope="module", params=sorted(PLACEHOLDERS))
def family(request) -> Family:
    return Family(request.param, request.getfixturevalue(f"{request.param}_tiny_artifact"))


def test_each_image_keeps_its_own_budget_at_its_own_placeholder(family: Family) -> None:
    pipe = family.pipe
    vision = pipe.encode_images([PHOTOS], [family.prompt(2)])
    assert vision.kept_indices.shape[:2] == (2, family.budget) and vision.images_per_prompt == (2,)
    for row, photo in enumerate(PHOTOS):  # pruned on its own: what the image keeps alone, with the prompt's same words
        alone = pipe.encode_images([photo], [family.prompt(1)])
        np.testing.assert_array_equal(vision.kept_indices[row], alone.kept_indices[0])
        np.testing.assert_allclose(vision.visual_tokens[row], alone.visual_tokens[0], atol=1e-5)
    ids = pipe.tokenize([family.prompt(2)], [2])[0]
    embeds, mask, _ = pipe.splice([ids], vision)
    places = [at for at, token in enumerate(ids) if token == pipe.manifest.text.image_token_id]
    assert len(places) == 2 and mask.sum() == len(ids) - 2 + 2 * family.budget
    for row, at in enumerate(places):  # image i's K tokens start where its placeholder was (after image i-1's K - 1 extra)
        start = at + row * (family.budget - 1)
        np.testing.assert_array_equal(embeds[0, start : start + family.budget], vision.kept(row)[0].astype(embeds.dtype))


def test_generate_and_chat_take_several_images(family: Family) -> None:
    pipe = family.pipe
    (result,) = pipe.generate([PHOTOS], [family.prompt(2)], GREEDY)
    assert [len(k) for k in result.kept_per_image] == [family.budget] * 2 and len(result.tokens_per_image) == 2
    assert len(result.kept_indices) == 2 * family.budget and result.num_visual_tokens == sum(result.tokens_per_image)
    # no placeholder: both images where the chat template puts images, the same as the rendered two-image user turn
    rendered = pipe.chat_prompt(user_turn(QUESTION, 2))
    assert rendered.count(pipe.manifest.text.placeholder) == 2
    assert pipe.tokenize([QUESTION], [2]) == pipe.tokenize([rendered], [2])
    messages = [{"role": "user", "content": [IMAGE, IMAGE, {"type": "text", "text": QUESTION}]}]
    assert pipe.chat(messages, PHOTOS, GREEDY).text == pipe.generate([PHOTOS], [QUESTION], GREEDY)[0].text
    with pytest.raises(PromptError, match="messages: 2 image parts for 1 image, expected one image per image part"):
        pipe.chat(messages, PHOTOS[0], GREEDY)


def test_cli_run_two_images_in_one_prompt(prunert_main, family: Family) -> None:
    code, out, err = prunert_main("run", family.artifact, "--image", PHOTOS[0], "--image", PHOTOS[1], "--prompt", family.prompt(2),
                                  "--max-new-tokens", "6", "--no-stream")
    assert code == 0, err
    (expected,) = family.pipe.generate([PHOTOS], [family.prompt(2)], GREEDY)
    assert out.strip() == expected.text.strip()
    counts = ", ".join(f"{family.budget}/{n}" for n in expected.tokens_per_image)
    assert f"kept {counts} visual tokens" in err
    code, _, err = prunert_main("run", family.artifact, "--image", PHOTOS[0], "--image", PHOTOS[1], "--prompt", QUESTION,
                                "--max-new-tokens", "2")
    assert code == 0, err  # no placeholder: the chat template places both


@pytest.mark.parametrize("placeholders", [1, 3])
def test_placeholders_must_be_one_per_image(error_line, prunert_main, family: Family, placeholders: int) -> None:
    code, out, err = prunert_main("run", family.artifact, "--image", PHOTOS[0], "--image", PHOTOS[1],
                                  "--prompt", family.prompt(placeholders))
    assert code == 2 and out == ""
    error_line(err, f"{placeholders} times for 2 images", "expected 2 times or none")


def test_images_beyond_the_exported_sequence_are_one_prompt_error(family: Family) -> None:
    """Within max_prompt_tokens, but n * K visual tokens leave no room in max_sequence (the fused decoder's KV buffer)."""
    pipe, text = family.pipe, family.pipe.manifest.text
    one, two = (len(pipe.tokenize([QUESTION], [n])[0]) for n in (1, 2))
    images = next(n for n in range(2, 64) if one + (n - 1) * (two - one) + n * (family.budget - 1) >= text.max_sequence)
    assert one + (images - 1) * (two - one) <= text.max_prompt_tokens  # the text alone fits: only the images do not
    with pytest.raises(PromptError, match=f"{images} images of K={family.budget} visual tokens .* expected fewer than {text.max_sequence}"):
        pipe.generate([PHOTOS[:1] * images], [QUESTION], GREEDY)


def test_a_batch_of_two_image_prompts_equals_each_prompt_alone(next_tiny_artifact: Path) -> None:
    """The exported max batch is 2: four images take two calls of the batched vision graph."""
    pipe = VLMPipeline(next_tiny_artifact)
    prompts, images = [PLACEHOLDERS["next"] * 2 + QUESTION, "What is in the pictures?"], [PHOTOS, PHOTOS[::-1]]
    vision = pipe.encode_images(images, prompts)
    assert len(vision.host_outputs) == 2 and vision.images_per_prompt == (2, 2)
    batch = pipe.generate(images, prompts, GREEDY)
    for prompt, group, result in zip(prompts, images, batch):
        alone = pipe.generate([group], [prompt], GREEDY)[0]
        assert result.token_ids == alone.token_ids
        for ours, theirs in zip(result.kept_per_image, alone.kept_per_image):
            np.testing.assert_array_equal(ours, theirs)


def test_llava_1_5_refuses_a_second_image(error_line, prunert_main, tiny_artifact: Path, tiny_pipeline) -> None:
    code, out, err = prunert_main("run", tiny_artifact, "--image", PHOTOS[0], "--image", PHOTOS[1], "--prompt", "<image> What is it?")
    assert code == 2 and out == ""
    error_line(err, "2 images, expected at most 1 per prompt", "the llava family takes 1")
    with pytest.raises(PromptError, match="2 images, expected at most 1 per prompt"):
        tiny_pipeline.generate([PHOTOS], [QUESTION], GREEDY)
    messages = [{"role": "user", "content": [IMAGE, IMAGE, {"type": "text", "text": QUESTION}]}]
    with pytest.raises(PromptError, match="messages: 2 image parts; this artifact takes exactly 1 image per prompt"):
        tiny_pipeline.chat_prompt(messages)
