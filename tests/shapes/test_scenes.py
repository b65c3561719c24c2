"""The shapes scene distribution and question templates: the contract other evaluations rely on."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from prunert.shapes import scenes
from prunert.shapes.dataset import eval_questions, write_eval_set
from prunert.shapes.scenes import CELL, COLORS, JITTER, OBJECT_SIZE, sample_question, sample_scene


@pytest.fixture(scope="module")
def drawn() -> list:
    rng = np.random.default_rng(123)
    return [sample_scene(rng) for _ in range(300)]


def test_objects_follow_the_contract(drawn) -> None:
    counts = Counter(len(s.objects) for s in drawn)
    assert set(counts) == {2, 3, 4, 5}
    for scene in drawn:
        assert 60 <= scene.background <= 120
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            row, col = divmod(o.cell, 4)
            dx, dy = o.center[0] - (col * CELL + CELL // 2), o.center[1] - (row * CELL + CELL // 2)
            assert abs(dx) <= JITTER and abs(dy) <= JITTER
            assert o.shape in scenes.SHAPES and o.color in COLORS


def test_rendered_canvas_has_the_background_noise_and_flat_objects(drawn) -> None:
    scene = drawn[0]
    pixels = np.asarray(scene.render()).astype(np.float64)  # [336, 336, 3]
    assert pixels.shape == (336, 336, 3)
    owners = scene.object_map()
    background = pixels[owners < 0]
    assert abs(background.mean() - scene.background) < 1.0
    assert 7.0 < background[:, 0].std() < 9.0  # sigma 8 (clipping is far away for levels 60..120)
    assert (background[:, 0] == background[:, 1]).all()  # gray: one noise value per pixel
    for index, obj in enumerate(scene.objects):
        inside = pixels[owners == index]
        assert (inside == np.asarray(COLORS[obj.color])).all()
        ys, xs = np.nonzero(owners == index)
        assert xs.max() - xs.min() + 1 == OBJECT_SIZE and ys.max() - ys.min() + 1 == OBJECT_SIZE


def test_templates_are_even_and_answers_are_consistent() -> None:
    questions = eval_questions(400, seed=7)
    templates = Counter(q.template for _, q in questions)
    assert set(templates.values()) == {100}
    exists = [q.answer for _, q in questions if q.template == "exists"]
    assert Counter(exists) == {"yes": 50, "no": 50}
    for scene, q in questions:
        shapes = [o.shape for o in scene.objects]
        colors = [o.color for o in scene.objects]
        assert q.answer == q.answer.lower() and q.answer.isalpha()
        if q.template == "color_of_shape":
            shape = q.question.split()[-1].rstrip("?")
            assert shapes.count(shape) == 1 and q.answer == colors[shapes.index(shape)]
        elif q.template == "shape_of_color":
            color = q.question.split()[-2]
            assert colors.count(color) == 1 and q.answer == shapes[colors.index(color)]
        elif q.template == "exists":
            color, shape = q.question.rstrip("?").split()[-2:]
            present = (color, shape) in set(zip(colors, shapes))
            assert present == (q.answer == "yes")
            assert color in colors or shape in shapes  # a "no" is POPE-style: colour, shape or both present
        else:
            assert q.question == "How many objects are there?"
            assert q.answer == {2: "two", 3: "three", 4: "four", 5: "five"}[len(scene.objects)]


def test_a_set_is_a_function_of_its_seed(tmp_path) -> None:
    a = write_eval_set(tmp_path / "a", 6, seed=11).read_text()
    b = write_eval_set(tmp_path / "b", 6, seed=11).read_text()
    c = write_eval_set(tmp_path / "c", 6, seed=12).read_text()
    assert a == b and a != c
    assert (tmp_path / "a" / "images" / "000000.png").read_bytes() == (tmp_path / "b" / "images" / "000000.png").read_bytes()
    assert eval_questions(3, 11)[2][1] == eval_questions(6, 11)[2][1]  # a prefix of a longer set


def test_held_out_sets_do_not_share_scenes_with_training() -> None:
    from prunert.shapes.dataset import TRAIN_STREAM

    train_rng = np.random.default_rng([TRAIN_STREAM, 0])
    train = {sample_scene(train_rng) for _ in range(500)}
    held_out = {scene for scene, _ in eval_questions(200, seed=0)}
    assert not train & held_out


def test_write_eval_set_never_replaces_what_it_did_not_write(tmp_path) -> None:
    from prunert.errors import ConfigError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a shapes set"):
        write_eval_set(mine, 2, 0, overwrite=True)
    assert (mine / "keep.txt").read_text() == "x"
    with pytest.raises(ConfigError, match="already exists"):
        write_eval_set(mine, 2, 0)
    done = write_eval_set(tmp_path / "set", 2, 0)
    assert write_eval_set(tmp_path / "set", 3, 0, overwrite=True) == done
    assert len(done.read_text().splitlines()) == 3


def test_sample_question_redraws_until_the_template_applies() -> None:
    rng = np.random.default_rng(0)
    for index in range(40):
        _, q = sample_question(index, rng)
        assert q.template == scenes.TEMPLATES[index % 4]
