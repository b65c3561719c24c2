"""Continuous batching in the runtime (prunert.runtime.decode.DecodeBatch): rows admitted after their own prefill while
others decode, rows leaving at EOS / length / cancel, on both decoder forms (the fused graph's shared buffer and the
standard graph's host cache). Batching must not change a row's tokens: each equals the request run alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prunert.config import GenerationConfig
from prunert.runtime import VLMPipeline
from prunert.runtime.decode import DecodeBatch, table_embedder

REPO = Path(__file__).resolve().parents[2]
IMAGES = [REPO / "examples" / "images" / name for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg", "coffee.jpg")]
PROMPTS = ["<image>\nWhat is in the picture?", "<image> a cat?",
           "<image>\nDescribe the colours of the large object on the left side of this image in detail please.", "<image>\nWhy?"]
BUDGETS = [9, 4, 12, 6]


@pytest.fixture(scope="module", params=["decoder_fused", "decoder"])
def pipe(request, tiny_artifact: Path) -> VLMPipeline:
    return VLMPipeline(tiny_artifact, decoder=request.param)


def _prefill(pipe: VLMPipeline, row: int, config: GenerationConfig):
    """One request's own vision and prefill (batch 1) -> DecodeBatch.admit's arguments after the handle."""
    prompt = PROMPTS[row]
    state = pipe.prefill(pipe.tokenize([prompt]), pipe.encode_images([IMAGES[row]], [prompt]))
    mask, positions, _, choosers, budgets, _, _ = pipe.decode_inputs(state, config)
    return state.session, state.logits[:, -1], mask, positions, choosers, budgets


def _alone(pipe: VLMPipeline, row: int, config: GenerationConfig) -> list[int]:
    return pipe.generate([IMAGES[row]], [PROMPTS[row]], config)[0].token_ids


def _run(pipe: VLMPipeline, configs: list[GenerationConfig], admit_at: dict[int, list[int]]) -> dict[int, list[int]]:
    """Rows admitted before the steps named in admit_at (step -> rows); -> each row's tokens."""
    text = pipe.manifest.text
    batch = DecodeBatch(table_embedder(pipe.artifact.embeddings, pipe.embeds_dtype), text.eos_token_ids)
    tokens: dict[int, list[int]] = {}
    step = 0
    while step <= max(admit_at) or batch.rows:
        for row in admit_at.get(step, []):
            for event in batch.admit(*_prefill(pipe, row, configs[row]), [row]):
                tokens[row] = [event.token]
        for event in batch.step():
            tokens[event.handle].append(event.token)
            assert event.index == len(tokens[event.handle]) - 1
        if batch.rows:  # the session's cache and the host's mask stay the same width: the longest row held
            assert batch.session.rows == len(batch.rows) == batch.mask.shape[0]
            assert batch.mask[:, 0].any() and all(p.shape[2] == batch.mask.shape[1] for p in batch.session.present()[:1])
        step += 1
    return tokens


def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(pipe: VLMPipeline) -> None:
    configs = [GenerationConfig(max_new_tokens=n) for n in BUDGETS]
    alone = {row: _alone(pipe, row, configs[row]) for row in range(len(PROMPTS))}
    batched = _run(pipe, configs, {0: [0], 2: [1], 3: [2, 3]})  # one row first, another two steps later, then two at once
    assert batched == alone
    assert [len(alone[row]) for row in range(4)] == BUDGETS  # each stopped at its own budget (no EOS on the tiny model)


def test_seeded_sampling_per_row_does_not_depend_on_the_batch(pipe: VLMPipeline) -> None:
    configs = [GenerationConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=row + 11) for row in range(3)]
    alone = {row: _alone(pipe, row, configs[row]) for row in range(3)}
    assert _run(pipe, configs, {0: [0, 1], 1: [2]}) == alone


def test_a_cancelled_row_leaves_and_the_others_carry_on(pipe: VLMPipeline) -> None:
    configs = [GenerationConfig(max_new_tokens=n) for n in (10, 10, 10)]
    text = pipe.manifest.text
    batch = DecodeBatch(table_embedder(pipe.artifact.embeddings, pipe.embeds_dtype), text.eos_token_ids)
    tokens = {}
    for row in (2, 0, 1):  # row 2 has the longest prompt: its leaving narrows the mask
        tokens[row] = [batch.admit(*_prefill(pipe, row, configs[row]), [row])[0].token]
    width = batch.mask.shape[1]
    for event in batch.step():
        tokens[event.handle].append(event.token)
    assert batch.cancel(2) and not batch.cancel(2)
    assert batch.handles == [0, 1] and batch.session.rows == 2
    assert batch.mask.shape[1] < width + 1  # the columns only row 2 needed are gone, from the cache too
    assert batch.session.present()[0].shape[2] == batch.mask.shape[1]
    while batch.rows:
        for event in batch.step():
            tokens[event.handle].append(event.token)
    assert tokens[0] == _alone(pipe, 0, configs[0]) and tokens[1] == _alone(pipe, 1, configs[1])
    assert batch.session is None and batch.step() == []


def test_a_row_that_finishes_on_its_first_token_never_joins(pipe: VLMPipeline) -> None:
    text = pipe.manifest.text
    batch = DecodeBatch(table_embedder(pipe.artifact.embeddings, pipe.embeds_dtype), text.eos_token_ids)
    (event,) = batch.admit(*_prefill(pipe, 0, GenerationConfig(max_new_tokens=1)), ["a"])
    assert event.finish == "length" and event.index == 0 and not batch.rows
    eos = text.eos_token_ids[0]
    session, logits, mask, positions, _, budgets = _prefill(pipe, 1, GenerationConfig(max_new_tokens=5))
    (event,) = batch.admit(session, logits, mask, positions, lambda lg: np.array([eos]), budgets, ["b"])
    assert event.finish == "eos" and event.token == eos and not batch.rows
