"""The shapes scene distribution and its four question templates (a contract: other evaluations rely on it).

- Canvas 336x336 RGB; background one gray level ~ U[60, 120] plus per-pixel Gaussian noise (sigma 8, the same
  value on R, G and B), clipped to [0, 255]. Objects are drawn flat on top.
- 2-5 objects, each in a distinct cell of a 4x4 grid of 84 px cells, 56 px across (circle: diameter; square:
  side; triangle: upright isosceles, base and height), centred in the cell with a jitter of +-8 px per axis.
- Shapes circle / square / triangle; colours red, green, blue, yellow, purple, white; no two objects of a scene
  share both colour and shape.
- Questions (one-word, lower-case answers), templates drawn evenly (question i uses template i % 4):
  1. "What color is the {shape}?"      only when the shape is unique in the scene; answer a colour
  2. "What shape is the {color} object?" only when the colour is unique; answer a shape
  3. "Is there a {color} {shape}?"      yes / no alternating (50/50); a "no" names an absent pair whose colour,
                                        shape or both are present (POPE-style)
  4. "How many objects are there?"      two / three / four / five
Numpy and Pillow only: usable on the runtime path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 336
GRID = 4
CELL = CANVAS // GRID  # 84 px
OBJECT_SIZE = 56
JITTER = 8
BACKGROUND_RANGE = (60, 120)
NOISE_SIGMA = 8.0
MIN_OBJECTS, MAX_OBJECTS = 2, 5
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
}
COLOR_NAMES = tuple(COLORS)
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
TEMPLATES = ("color_of_shape", "shape_of_color", "exists", "count")
ANSWERS = tuple(COLOR_NAMES) + SHAPES + ("yes", "no") + tuple(COUNT_WORDS.values())


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: int  # row-major index into the 4x4 grid
    center: tuple[int, int]  # (x, y) canvas pixels


@dataclass(frozen=True)
class Scene:
    background: int
    objects: tuple[SceneObject, ...]
    noise_seed: int

    def render(self) -> Image.Image:
        """The 336x336 RGB canvas (deterministic from the scene)."""
        noise = np.random.default_rng(self.noise_seed).normal(0.0, NOISE_SIGMA, size=(CANVAS, CANVAS))
        gray = np.clip(np.rint(self.background + noise), 0, 255).astype(np.uint8)  # [H, W]
        image = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw(draw, obj.shape, obj.center, COLORS[obj.color])
        return image

    def object_map(self) -> np.ndarray:
        """[336, 336] int8: index of the object covering each canvas pixel, -1 for background."""
        canvas = Image.new("L", (CANVAS, CANVAS), 255)
        draw = ImageDraw.Draw(canvas)
        for index, obj in enumerate(self.objects):
            _draw(draw, obj.shape, obj.center, index)
        ids = np.asarray(canvas).astype(np.int16)
        return np.where(ids == 255, -1, ids).astype(np.int8)


@dataclass(frozen=True)
class Question:
    template: str
    question: str
    answer: str


def _draw(draw: ImageDraw.ImageDraw, shape: str, center: tuple[int, int], fill) -> None:
    x, y = center
    h = OBJECT_SIZE / 2
    if shape == "circle":
        draw.ellipse((x - h, y - h, x + h - 1, y + h - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x - h, y - h, x + h - 1, y + h - 1), fill=fill)
    else:  # upright isosceles triangle: apex at the top centre, base along the bottom of the box
        draw.polygon(((x, y - h), (x + h - 1, y + h - 1), (x - h, y + h - 1)), fill=fill)


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    pairs = rng.choice(len(SHAPES) * len(COLORS), size=count, replace=False)  # distinct (shape, colour) pairs
    objects = []
    for cell, pair in zip(cells, pairs):
        row, col = divmod(int(cell), GRID)
        jx, jy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
        center = (col * CELL + CELL // 2 + jx, row * CELL + CELL // 2 + jy)
        objects.append(SceneObject(SHAPES[int(pair) % len(SHAPES)], COLOR_NAMES[int(pair) // len(SHAPES)], int(cell), center))
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    return Scene(background, tuple(objects), int(rng.integers(2**31)))


def _unique(values: list[str]) -> list[str]:
    return sorted(v for v in set(values) if values.count(v) == 1)


def ask(scene: Scene, template: str, rng: np.random.Generator, want_yes: bool = True) -> Question | None:
    """A question of `template` about `scene`, or None when the template does not apply to it."""
    shapes = [o.shape for o in scene.objects]
    colors = [o.color for o in scene.objects]
    if template == "color_of_shape":
        unique = _unique(shapes)
        if not unique:
            return None
        shape = unique[int(rng.integers(len(unique)))]
        return Question(template, f"What color is the {shape}?", colors[shapes.index(shape)])
    if template == "shape_of_color":
        unique = _unique(colors)
        if not unique:
            return None
        color = unique[int(rng.integers(len(unique)))]
        return Question(template, f"What shape is the {color} object?", shapes[colors.index(color)])
    if template == "exists":
        present = sorted(zip(colors, shapes))
        if want_yes:
            color, shape = present[int(rng.integers(len(present)))]
            return Question(template, f"Is there a {color} {shape}?", "yes")
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES
                  if (c, s) not in present and (c in colors or s in shapes)]
        color, shape = absent[int(rng.integers(len(absent)))]
        return Question(template, f"Is there a {color} {shape}?", "no")
    if template == "count":
        return Question(template, "How many objects are there?", COUNT_WORDS[len(scene.objects)])
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def sample_question(index: int, rng: np.random.Generator) -> tuple[Scene, Question]:
    """Question `index` of a set: template index % 4 (even draw), "exists" alternating yes / no; scenes are
    redrawn until the template applies."""
    template = TEMPLATES[index % len(TEMPLATES)]
    want_yes = (index // len(TEMPLATES)) % 2 == 0
    while True:
        scene = sample_scene(rng)
        question = ask(scene, template, rng, want_yes)
        if question is not None:
            return scene, question
