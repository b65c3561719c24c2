"""Training `synthetic:llava-shapes`: per-patch labels, the QA batch's token layout, and a deterministic state dict."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from prunert.shapes.pool import NUM_PATCH_CLASSES, patch_class, patch_labels  # noqa: E402
from prunert.shapes.scenes import Scene, SceneObject  # noqa: E402
from prunert.shapes.train import TrainConfig, Trainer  # noqa: E402

MICRO = TrainConfig(pool_scenes=12, tower_steps=3, tower_batch=4, qa_steps=3, qa_scenes=3, joint_steps=2, joint_scenes=2,
                    warmup_steps=1)


def test_patch_labels_cover_every_patch_an_object_covers() -> None:
    # a square centred exactly on cell (0, 0): canvas x, y in [14, 70) -> 28 px patches 0..2 (12 x 12 grid)
    scene = Scene(90, (SceneObject("square", "red", 0, (42, 42)),), 0)
    labels, centers = patch_labels(scene, 12)
    grid = labels.reshape(12, 12)
    red_square = patch_class("red", "square")
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # centre full, edges 1/2, corners 1/4 < 0.3
    assert (grid[:3, :3][cross] == red_square).all() and (grid[:3, :3][~cross] == 0).all()
    assert (grid[3:, :] == 0).all() and (grid[:, 3:] == 0).all()
    assert centers.reshape(12, 12)[1, 1] == 1 and centers.sum() == 1
    assert 1 <= red_square < NUM_PATCH_CLASSES


def test_question_tokens_split_at_the_image_and_end_with_answer_and_eos() -> None:
    from prunert.shapes.model import build_shapes_tokenizer, prompt
    from prunert.shapes.train import QATokens

    tokenizer = build_shapes_tokenizer()
    tokens = QATokens(tokenizer, tokenizer.token_to_id("<image>"), tokenizer.token_to_id("</s>"))
    suffix, count = tokens.suffix("What color is the circle?", "red")
    full = tokenizer.encode(prompt("What color is the circle?")).ids
    assert tokens.prefix + [tokenizer.token_to_id("<image>")] + suffix[:-2] == full
    assert count == 2 and tokenizer.decode(suffix[-2:-1]) == " red" and suffix[-1] == tokenizer.token_to_id("</s>")


def test_the_same_config_trains_the_same_state_dict() -> None:
    first = Trainer(MICRO, progress=False).train()
    second = Trainer(MICRO, progress=False).train()
    assert first.sha256 == second.sha256
    other = Trainer(TrainConfig(**{**MICRO.__dict__, "seed": 1}), progress=False).train()
    assert other.sha256 != first.sha256
    assert set(first.losses) == {"tower", "qa", "joint"} and all(np.isfinite(v) for v in first.losses.values())


@pytest.mark.parametrize("bad", [{"tower_lr": float("nan")}, {"qa_lr": float("inf")}, {"seed": -1}, {"tower_batch": 0}])
def test_a_bad_train_config_is_one_error(bad: dict) -> None:
    from prunert.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)
