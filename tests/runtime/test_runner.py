"""Runner input checking: names, dtypes, static dims and one size per symbolic dim, checked against
the manifest before anything runs (InputShapeError with a message naming the input)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from prunert.errors import InputShapeError
from prunert.manifest import GraphSpec, load_manifest
from prunert.runtime.runner import OnnxRuntimeRunner, Runner


class RecordingRunner(Runner):
    """A runner whose backend only records calls: proves bad input never reaches it."""

    def __init__(self, spec: GraphSpec):
        super().__init__(spec)
        self.calls = 0

    def _run(self, feeds):
        self.calls += 1
        return {}


@pytest.fixture(scope="module")
def specs(tiny_artifact: Path) -> dict[str, GraphSpec]:
    return load_manifest(tiny_artifact).graphs


@pytest.fixture(scope="module")
def vision_runner(tiny_artifact: Path, specs) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(tiny_artifact / specs["vision"].file, specs["vision"])


def vision_feeds(batch: int = 1, words: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "pixel_values": rng.standard_normal((batch, 3, 140, 140)).astype(np.float32),
        "text_embeds": rng.standard_normal((batch, words, 64)).astype(np.float32),
        "text_mask": np.ones((batch, words), np.int64),
    }


def decoder_feeds(batch: int = 1, seq: int = 4) -> dict[str, np.ndarray]:
    feeds = {
        "inputs_embeds": np.zeros((batch, seq, 64), np.float32),
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((batch, 2, 0, 16), np.float32)
    return feeds


def test_valid_feeds_run(vision_runner: OnnxRuntimeRunner) -> None:
    out = vision_runner.infer(vision_feeds(batch=2))
    assert set(out) == {"visual_tokens", "kept_indices"}
    assert out["visual_tokens"].shape == (2, 16, 64) and out["kept_indices"].dtype == np.int64


def test_missing_input(vision_runner: OnnxRuntimeRunner) -> None:
    feeds = vision_feeds()
    del feeds["text_mask"]
    with pytest.raises(InputShapeError, match=re.escape("missing inputs ['text_mask']")):
        vision_runner.infer(feeds)


def test_unknown_input(vision_runner: OnnxRuntimeRunner) -> None:
    feeds = {**vision_feeds(), "input_ids": np.zeros((1, 3), np.int64)}
    with pytest.raises(InputShapeError, match=re.escape("unknown inputs ['input_ids']")) as info:
        vision_runner.infer(feeds)
    assert "pixel_values" in str(info.value)  # lists what was expected


@pytest.mark.parametrize(
    "name, dtype, expected",
    [("pixel_values", np.float64, "float32"), ("pixel_values", np.float16, "float32"), ("text_mask", np.int32, "int64")],
)
def test_wrong_dtype(vision_runner: OnnxRuntimeRunner, name: str, dtype, expected: str) -> None:
    feeds = vision_feeds()
    feeds[name] = feeds[name].astype(dtype)
    message = f"input '{name}': got dtype {np.dtype(dtype).name}, expected {expected}"
    with pytest.raises(InputShapeError, match=re.escape(message)):
        vision_runner.infer(feeds)


def test_wrong_static_dim(vision_runner: OnnxRuntimeRunner) -> None:
    feeds = vision_feeds()
    feeds["pixel_values"] = np.zeros((1, 3, 224, 224), np.float32)
    with pytest.raises(InputShapeError) as info:
        vision_runner.infer(feeds)
    assert str(info.value) == "input 'pixel_values': got (1, 3, 224, 224), expected (batch, 3, 140, 140)"


@pytest.mark.parametrize("shape", [(3, 140, 140), (1, 1, 3, 140, 140), (1, 4, 140, 140)])
def test_wrong_rank_or_channels(vision_runner: OnnxRuntimeRunner, shape) -> None:
    feeds = vision_feeds()
    feeds["pixel_values"] = np.zeros(shape, np.float32)
    with pytest.raises(InputShapeError, match=re.escape(f"input 'pixel_values': got {shape}, expected (batch, 3, 140, 140)")):
        vision_runner.infer(feeds)


def test_inconsistent_batch_across_inputs(vision_runner: OnnxRuntimeRunner) -> None:
    feeds = vision_feeds(batch=1)
    two = vision_feeds(batch=2)
    feeds["text_embeds"], feeds["text_mask"] = two["text_embeds"], two["text_mask"]
    with pytest.raises(InputShapeError) as info:
        vision_runner.infer(feeds)
    message = str(info.value)
    assert "input 'text_embeds'" in message and "batch=1" in message and "'pixel_values'" in message


def test_inconsistent_symbolic_text_dim(vision_runner: OnnxRuntimeRunner) -> None:
    feeds = vision_feeds(words=3)
    feeds["text_mask"] = np.ones((1, 5), np.int64)
    with pytest.raises(InputShapeError, match=re.escape("input 'text_mask': got (1, 5), expected (batch, text) with text=3")):
        vision_runner.infer(feeds)


def test_not_an_array(vision_runner: OnnxRuntimeRunner) -> None:
    feeds = vision_feeds()
    feeds["text_mask"] = [[1, 1, 1]]
    with pytest.raises(InputShapeError, match=re.escape("input 'text_mask': got list, expected a numpy array")):
        vision_runner.infer(feeds)


def test_decoder_inputs_checked_across_kv_cache(specs) -> None:
    runner = RecordingRunner(specs["decoder"])
    runner.infer(decoder_feeds(batch=2))
    assert runner.calls == 1

    feeds = decoder_feeds(batch=2)
    feeds["past_key_values.1.value"] = np.zeros((1, 2, 0, 16), np.float32)  # batch 1 vs 2
    with pytest.raises(InputShapeError, match=re.escape("input 'past_key_values.1.value'")):
        runner.infer(feeds)

    feeds = decoder_feeds()
    feeds["past_key_values.0.key"] = np.zeros((1, 2, 3, 16), np.float32)  # past 3 vs 0 in .value
    feeds["past_key_values.0.value"] = np.zeros((1, 2, 3, 16), np.float32)
    feeds["past_key_values.1.key"] = np.zeros((1, 2, 2, 16), np.float32)
    with pytest.raises(InputShapeError, match=re.escape("past=3")):
        runner.infer(feeds)

    feeds = decoder_feeds()
    feeds["past_key_values.0.key"] = np.zeros((1, 4, 0, 16), np.float32)  # kv heads: static 2
    with pytest.raises(InputShapeError, match=re.escape("got (1, 4, 0, 16), expected (batch, 2, past, 16)")):
        runner.infer(feeds)

    feeds = decoder_feeds(seq=4)
    feeds["position_ids"] = np.zeros((1, 5), np.int64)  # sequence 5 vs 4 in inputs_embeds
    with pytest.raises(InputShapeError, match="sequence=4"):
        runner.infer(feeds)
    assert runner.calls == 1  # no bad input reached the backend
