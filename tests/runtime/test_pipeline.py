"""The ONNX Runtime pipeline: greedy determinism, left-padded batches, seeded sampling, stopping
(max_new_tokens, EOS), streaming, kept indices, and prompt errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prunert.adapters.llava.synthetic import PRESETS
from prunert.config import GenerationConfig
from prunert.errors import ConfigError, PromptError
from prunert.runtime import pipeline as runtime_pipeline
from prunert.runtime.sampling import next_tokens

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PHOTO_2 = REPO / "examples" / "images" / "coffee.jpg"
PROMPT = "<image>\nWhat is in the picture?"
TINY_N = PRESETS["llava-tiny"].num_patches  # 100 visual tokens
LONG_PROMPT = "<image>\nDescribe the colours of the large object on the left side of this image in detail please."
GREEDY = GenerationConfig(max_new_tokens=12)


def test_greedy_is_deterministic(tiny_pipeline) -> None:
    first = tiny_pipeline.generate([PHOTO], [PROMPT], GREEDY)[0]
    second = tiny_pipeline.generate([str(PHOTO)], [PROMPT], GREEDY)[0]
    assert first.token_ids == second.token_ids and first.text == second.text
    assert len(first.token_ids) == GREEDY.max_new_tokens and first.finish_reason == "length"
    assert first.text.strip()


def test_left_padded_batch_matches_each_row_alone(tiny_pipeline) -> None:
    pipe = tiny_pipeline
    images, prompts = [PHOTO, PHOTO_2], [PROMPT, LONG_PROMPT]
    sequences = pipe.tokenize(prompts)
    assert len(sequences[0]) < len(sequences[1])  # row 0 gets left padding

    batch = pipe.generate(images, prompts, GREEDY)
    vision = pipe.encode_images(images, prompts)
    state = pipe.prefill(sequences, vision)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        alone = pipe.generate([image], [prompt], GREEDY)[0]
        assert batch[row].token_ids == alone.token_ids, row  # fp32: identical greedy tokens
        assert batch[row].text == alone.text

        single_vision = pipe.encode_images([image], [prompt])
        np.testing.assert_array_equal(single_vision.kept_indices[0], vision.kept_indices[row])
        single = pipe.prefill(pipe.tokenize([prompt]), single_vision)
        length = single.logits.shape[1]
        assert state.attention_mask[row, :-length].sum() == 0 and state.attention_mask[row, -length:].all()
        # measured: 0.0 on CPU fp32 (padding is fully masked); asserted with a small margin
        np.testing.assert_allclose(state.logits[row, -length:], single.logits[0], atol=1e-5, rtol=0)


def test_sampling_is_seeded(tiny_pipeline) -> None:
    def sample(seed: int, top_p: float = 0.9) -> list[int]:
        config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=top_p, seed=seed)
        return tiny_pipeline.generate([PHOTO], [PROMPT], config)[0].token_ids

    assert sample(0) == sample(0)
    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in (0, 1, 2)}) > 1  # different seeds: (very likely) different
    greedy = tiny_pipeline.generate([PHOTO], [PROMPT], GREEDY)[0].token_ids
    assert sample(0) != greedy  # temperature 1 really samples
    assert sample(3, top_p=1e-6) == greedy  # nucleus of one token == greedy
    assert sample(4, top_p=1e-6) == greedy


def test_next_tokens_unit() -> None:
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(next_tokens(logits, GenerationConfig(), rng), [1, 0])  # ties -> lower id
    tiny_nucleus = GenerationConfig(temperature=2.0, top_p=0.01)
    for _ in range(20):
        assert next_tokens(logits, tiny_nucleus, rng)[1] == 0
    draws = {int(next_tokens(logits, GenerationConfig(temperature=5.0), rng)[0]) for _ in range(200)}
    assert draws == {0, 1, 2, 3}


@pytest.mark.parametrize("max_new", [1, 5])
def test_max_new_tokens_respected(tiny_pipeline, max_new: int) -> None:
    result = tiny_pipeline.generate([PHOTO], [PROMPT], GenerationConfig(max_new_tokens=max_new))[0]
    assert len(result.token_ids) == max_new and result.finish_reason == "length"
    assert tiny_pipeline.timings.decode_steps == max_new - 1  # the prefill gives the first token


def test_generation_never_exceeds_the_artifact_sequence(tiny_pipeline) -> None:
    pipe = tiny_pipeline
    length = len(pipe.tokenize([PROMPT])[0]) - 1 + pipe.manifest.budget.budget
    result = pipe.generate([PHOTO], [PROMPT], GenerationConfig(max_new_tokens=10_000))[0]
    assert len(result.token_ids) <= pipe.manifest.text.max_sequence - length
    if result.finish_reason == "length":
        assert len(result.token_ids) == pipe.manifest.text.max_sequence - length


def test_eos_stops_its_row_only(tiny_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    eos = tiny_pipeline.manifest.text.eos_token_ids[0]
    calls = []

    def eos_on_third_step_for_row_0(logits, config, rng):  # each row chooses on its own, [1, V]: rows 0, 1 per step
        chosen = next_tokens(logits, config, rng)
        calls.append(1)
        if len(calls) == 5:
            chosen = chosen.copy()
            chosen[0] = eos
        return chosen

    expected = tiny_pipeline.generate([PHOTO, PHOTO_2], [PROMPT, LONG_PROMPT], GREEDY)
    monkeypatch.setattr(runtime_pipeline, "next_tokens", eos_on_third_step_for_row_0)
    streamed: list[tuple[int, int]] = []
    rows = tiny_pipeline.generate(
        [PHOTO, PHOTO_2], [PROMPT, LONG_PROMPT], GREEDY, on_token=lambda row, token, text: streamed.append((row, token))
    )
    assert rows[0].token_ids == expected[0].token_ids[:2] + [eos]
    assert rows[0].finish_reason == "eos"
    assert rows[0].text == tiny_pipeline.artifact.tokenizer.decode(expected[0].token_ids[:2], skip_special_tokens=True)
    assert rows[1].token_ids == expected[1].token_ids and rows[1].finish_reason == expected[1].finish_reason
    assert [t for r, t in streamed if r == 0] == rows[0].token_ids  # nothing streamed after EOS


def test_all_rows_eos_stops_decoding(tiny_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    eos = tiny_pipeline.manifest.text.eos_token_ids[0]
    monkeypatch.setattr(runtime_pipeline, "next_tokens", lambda logits, config, rng: np.full(len(logits), eos))
    rows = tiny_pipeline.generate([PHOTO, PHOTO_2], [PROMPT, PROMPT], GREEDY)
    assert [r.token_ids for r in rows] == [[eos], [eos]]
    assert [r.finish_reason for r in rows] == ["eos", "eos"] and [r.text for r in rows] == ["", ""]
    assert tiny_pipeline.timings.decode_steps == 0


def test_stream_receives_every_token_and_the_final_text(tiny_pipeline) -> None:
    events: list[tuple[int, int, str]] = []
    images, prompts = [PHOTO, PHOTO_2], [PROMPT, LONG_PROMPT]
    results = tiny_pipeline.generate(images, prompts, GREEDY, on_token=lambda *event: events.append(event))
    for row, result in enumerate(results):
        assert [token for r, token, _ in events if r == row] == result.token_ids
        assert "".join(text for r, _, text in events if r == row) == result.text


def test_stream_text_with_multibyte_characters(tiny_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A character split over byte-level tokens ('é' = 'Ã' + '©') must not be lost or garbled."""
    tokenizer = tiny_pipeline.artifact.tokenizer
    forced = tokenizer.encode("café, naïve 😀 ok", add_special_tokens=False).ids
    assert len(forced) > len("café, naïve 😀 ok".split()) + 3  # really split into byte tokens
    steps = iter(forced)
    monkeypatch.setattr(runtime_pipeline, "next_tokens", lambda logits, config, rng: np.array([next(steps)]))
    pieces: list[str] = []
    result = tiny_pipeline.generate(
        [PHOTO], [PROMPT], GenerationConfig(max_new_tokens=len(forced)), on_token=lambda row, token, text: pieces.append(text)
    )[0]
    assert result.token_ids == forced
    assert result.text == "café, naïve 😀 ok"
    assert "".join(pieces) == result.text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_flushes_an_unfinished_character(tiny_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = tiny_pipeline.artifact.tokenizer
    forced = tokenizer.encode("caf", add_special_tokens=False).ids + [tokenizer.token_to_id("Ã")]
    steps = iter(forced)
    monkeypatch.setattr(runtime_pipeline, "next_tokens", lambda logits, config, rng: np.array([next(steps)]))
    pieces: list[str] = []
    result = tiny_pipeline.generate(
        [PHOTO], [PROMPT], GenerationConfig(max_new_tokens=len(forced)), on_token=lambda row, token, text: pieces.append(text)
    )[0]
    assert "".join(pieces) == result.text == tokenizer.decode(forced, skip_special_tokens=True)


def test_kept_indices(tiny_pipeline) -> None:
    budget = tiny_pipeline.manifest.budget.budget
    results = tiny_pipeline.generate([PHOTO, PHOTO_2], [PROMPT, LONG_PROMPT], GenerationConfig(max_new_tokens=1))
    for result in results:
        kept = np.asarray(result.kept_indices)
        assert kept.shape == (budget,) and kept.dtype == np.int64
        assert (np.diff(kept) > 0).all()  # ascending, hence distinct
        assert len(set(kept.tolist())) == budget
        assert kept.min() >= 0 and kept.max() < TINY_N


# ---------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompt, needle",
    [
        ("<image> and <image>: what differs?", "2 times"),
        ("<image><image>", "2 times"),
    ],
)
def test_prompt_placeholder_count(tiny_pipeline, prompt: str, needle: str) -> None:
    """Twice is an error; none is not (the chat template places the image: tests/runtime/test_chat.py)."""
    with pytest.raises(PromptError, match=needle) as info:
        tiny_pipeline.generate([PHOTO], [prompt], GREEDY)
    assert "<image>" in str(info.value) and "at most once" in str(info.value)


def test_prompt_longer_than_exported_maximum(tiny_pipeline, tiny_settings: dict) -> None:
    max_prompt = tiny_settings["max_prompt_tokens"]
    words = "<image>\n" + " ".join(["river"] * 60)
    with pytest.raises(PromptError, match=f"expected at most {max_prompt}"):
        tiny_pipeline.generate([PHOTO], [words], GREEDY)
    # the longest prompt that fits is accepted
    text = tiny_pipeline.manifest.text

    def count(prompt: str) -> int:
        return len(tiny_pipeline.artifact.tokenizer.encode(text.prompt_template.format(prompt=prompt)).ids)

    fitting = "<image>"
    while count(fitting + " river") <= max_prompt:
        fitting += " river"
    assert count(fitting) >= max_prompt - 2
    assert len(tiny_pipeline.tokenize([fitting])[0]) == count(fitting)
    with pytest.raises(PromptError, match=f"{count(fitting + ' river')} tokens"):
        tiny_pipeline.tokenize([fitting + " river"])
    result = tiny_pipeline.generate([PHOTO], [fitting], GenerationConfig(max_new_tokens=64))[0]
    assert 1 <= len(result.token_ids)


def test_images_and_prompts_count_mismatch(tiny_pipeline) -> None:
    with pytest.raises(ConfigError, match="2 images and 1 prompts"):
        tiny_pipeline.generate([PHOTO, PHOTO_2], [PROMPT], GREEDY)


def test_generation_config_validation() -> None:
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            GenerationConfig(**kwargs)


def test_batch_larger_than_exported_maximum(tiny_pipeline) -> None:
    limit = tiny_pipeline.manifest.text.max_batch
    with pytest.raises(ConfigError, match=f"at most {limit}"):
        tiny_pipeline.generate([PHOTO] * (limit + 1), [PROMPT] * (limit + 1), GenerationConfig(max_new_tokens=1))


def test_calls_of_different_lengths_stack_with_masked_slots() -> None:
    """Per-image vision calls whose K is the image's own N (unpruned, dynamic N) -> one padded batch; kept(row)
    gives back each call's own tokens and indices."""
    tokens = [np.full((1, 3, 2), 1.0, np.float32), np.full((1, 5, 2), 2.0, np.float32)]
    kept = [np.array([[0, 1, 2]]), np.array([[0, 1, 2, 3, 4]])]
    valid = [np.ones((1, 3), bool), np.array([[True, True, False, True, True]])]
    visual, indices, mask = runtime_pipeline._stack_calls(tokens, kept, valid)
    assert visual.shape == (2, 5, 2) and indices[0].tolist() == [0, 1, 2, -1, -1]
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True, True, False, True, True]]
    result = runtime_pipeline.VisionResult({}, visual, indices, mask)
    assert result.kept(0)[1].tolist() == [0, 1, 2] and (result.kept(0)[0] == 1.0).all()
    assert result.kept(1)[1].tolist() == [0, 1, 3, 4] and result.kept(1)[0].shape == (4, 2)
    assert runtime_pipeline.VisionResult({}, visual, indices).kept(0)[1].tolist() == [0, 1, 2, -1, -1]  # no mask: all slots
