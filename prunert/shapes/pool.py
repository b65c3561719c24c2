"""The training pool of `synthetic:llava-shapes`: scenes drawn from the training seed stream, the pixels the
model sees (the runtime's own CLIP resize / normalisation) and per-patch labels (numpy + Pillow only).

Per-patch labels: every patch an object covers (at least COVER_FRACTION of the patch's canvas block) gets that
object's (colour, shape) class 1..18, the rest background 0; the patch holding an object's centre is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunert.adapters.llava.host import ImagePreprocessConfig, rescale_normalize, model_view
from prunert.shapes.dataset import TRAIN_STREAM
from prunert.shapes.scenes import CANVAS, COLOR_NAMES, SHAPES, Scene, sample_scene

COVER_FRACTION = 0.3
NUM_PATCH_CLASSES = 1 + len(COLOR_NAMES) * len(SHAPES)  # background + every (colour, shape)


def patch_class(color: str, shape: str) -> int:
    return 1 + COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class ScenePool:
    scenes: list[Scene]
    pixels: np.ndarray  # [P, S, S, 3] uint8, the model's view (resized, cropped)
    labels: np.ndarray  # [P, G*G] int64 patch classes
    centers: np.ndarray  # [P, G*G] float32, 1 where an object's centre lies

    def pixel_values(self, index: np.ndarray, cfg: ImagePreprocessConfig) -> np.ndarray:
        """float32 [B, 3, S, S] exactly as the runtime's preprocess gives them."""
        return np.stack([rescale_normalize(p, cfg).transpose(2, 0, 1) for p in self.pixels[index]])


def patch_labels(scene: Scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """([G*G] int64 classes, [G*G] float32 centre flags) of a scene for a G x G patch grid."""
    block = CANVAS // grid
    owners = scene.object_map()  # [336, 336]
    labels = np.zeros(grid * grid, dtype=np.int64)
    best = np.zeros(grid * grid, dtype=np.float32)
    centers = np.zeros(grid * grid, dtype=np.float32)
    for index, obj in enumerate(scene.objects):
        cover = (owners == index).reshape(grid, block, grid, block).mean(axis=(1, 3)).reshape(-1)  # [G*G]
        take = (cover >= COVER_FRACTION) & (cover > best)
        labels[take], best[take] = patch_class(obj.color, obj.shape), cover[take]
        x, y = obj.center
        centers[min(y // block, grid - 1) * grid + min(x // block, grid - 1)] = 1.0
    return labels, centers


def build_pool(count: int, seed: int, cfg: ImagePreprocessConfig, grid: int) -> ScenePool:
    rng = np.random.default_rng([TRAIN_STREAM, seed])
    scenes = [sample_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(model_view(s.render(), cfg), dtype=np.uint8) for s in scenes])
    labels, centers = zip(*(patch_labels(s, grid) for s in scenes))
    return ScenePool(scenes, pixels, np.stack(labels), np.stack(centers))
