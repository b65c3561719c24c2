"""Draw which visual tokens an artifact keeps: the photo as the model sees it (the host adapter's model_view:
resized + center-cropped, un-normalised), kept patches at full brightness with a thin outline, pruned patches dimmed to grey.

Artifacts with a single fixed patch grid only (LLaVA-1.5 style: one [batch, 3, H, W] image, N = grid x grid
tokens); tiled (LLaVA-NeXT) or dynamic-resolution (Qwen2.5-VL) artifacts are refused up front, by their
vision graph's inputs, not by family name.

Runtime path: Pillow + numpy only, never torch. Several artifacts (methods, budgets) -> one panel each,
side by side, on the same photo and prompt.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from prunert.errors import ConfigError
from prunert.manifest import Manifest, load_manifest
from prunert.runtime.image import check_image, load_image

PAD = 8  # px around and between panels
TITLE_PAD = 6  # px above and below the title text
FONT_SIZE = 14
DIM = 0.35  # pruned patches: this fraction of their grey level ...
GREY_FLOOR = 40  # ... plus this, so black stays distinguishable from pruned
OUTLINE = (255, 210, 0)  # kept-patch outline (amber)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MIN_PANEL = 300  # auto scale: smallest integer zoom that makes a panel at least this wide
TEXT_INPUTS = ("text_embeds", "text_mask")  # the vision graph's prompt inputs; every other input is the image's


@dataclass(frozen=True)
class Panel:
    """What one artifact kept on the photo."""

    crop: Image.Image  # RGB, the model's input size
    kept_indices: np.ndarray  # [K] original patch positions, row-major on the grid
    grid: int  # patches per side
    title: str


def patch_grid(num_visual_tokens: int) -> int:
    """Side of the square patch grid of N visual tokens; ConfigError if N is not a perfect square."""
    n = int(num_visual_tokens)
    side = math.isqrt(n) if n > 0 else 0
    if side < 1 or side * side != n:
        raise ConfigError(
            f"visualize: {num_visual_tokens} visual tokens is not a perfect square, expected a square patch grid "
            f"(e.g. 576 = 24 x 24 for LLaVA-1.5 at 336 px)"
        )
    return side


def single_patch_grid(manifest: Manifest, artifact: Path | str) -> int:
    """Side of the artifact's one fixed patch grid. ConfigError, naming the artifact and its family, unless the
    vision graph takes one image of static size [batch, C, H, W] (no tiles, no per-image patch count) whose
    N visual tokens form a square grid (`patch_grid`)."""
    images = [t for t in manifest.graphs["vision"].inputs if t.name not in TEXT_INPUTS]
    if not (len(images) == 1 and len(images[0].shape) == 4 and all(isinstance(d, int) for d in images[0].shape[1:])):
        inputs = ", ".join(f"{t.name} {t.describe()}" for t in images)
        raise ConfigError(
            f"visualize: artifact '{artifact}' ({manifest.source.family} family) has image inputs {inputs}; visualize supports "
            f"a single fixed patch grid (LLaVA-1.5-style artifacts: one [batch, 3, H, W] image) only"
        )
    return patch_grid(manifest.budget.num_visual_tokens)


def patch_box(index: int, grid: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), right/bottom exclusive, of row-major patch `index` on a `grid` x `grid` image."""
    row, col = divmod(int(index), grid)
    return (col * width // grid, row * height // grid, (col + 1) * width // grid, (row + 1) * height // grid)


def auto_scale(crop_size: tuple[int, int]) -> int:
    """Integer zoom so a small model's panel (llava-tiny: 140 px) stays readable; 1 for LLaVA-1.5's 336 px."""
    return max(1, math.ceil(MIN_PANEL / max(1, min(crop_size))))


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` px; a word longer than a line is cut by characters."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if measure(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while measure(word, font=font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and measure(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines or [""]


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom) + 3


def title_height(title: str, width: int, font=None) -> int:
    """Height of the title band above a panel of `width` px."""
    font = font or _font()
    return len(_wrap(title, font, width - 2 * TITLE_PAD)) * _line_height(font) + 2 * TITLE_PAD


def render_kept_patches(
    image: Image.Image, kept_indices: Sequence[int] | np.ndarray, grid: int, title: str, scale: int = 1, title_band: int | None = None
) -> Image.Image:
    """One panel: `title` wrapped in a band on top, then `image` (the model's RGB crop, zoomed by `scale`)
    with the kept patches at full brightness and outlined, the others dimmed to grey.

    `title_band` forces the band height (to line up panels side by side); by default it fits the title.
    The picture occupies the bottom `image.height * scale` rows of the result.
    """
    if grid < 1:
        raise ConfigError(f"visualize: patch grid {grid}, expected >= 1")
    if scale < 1:
        raise ConfigError(f"visualize: scale {scale}, expected an integer >= 1")
    kept = np.asarray(kept_indices, dtype=np.int64).reshape(-1)
    if kept.size and (kept.min() < 0 or kept.max() >= grid * grid):
        raise ConfigError(f"visualize: kept indices span {kept.min()}..{kept.max()}, expected 0..{grid * grid - 1} ({grid} x {grid} patches)")
    rgb = image.convert("RGB")
    if scale > 1:
        rgb = rgb.resize((rgb.width * scale, rgb.height * scale), Image.NEAREST)
    width, height = rgb.size

    pixels = np.asarray(rgb, dtype=np.float32)  # [H, W, 3]
    grey = pixels @ np.asarray([0.299, 0.587, 0.114], np.float32)  # [H, W]
    dimmed = np.repeat((grey * DIM + GREY_FLOOR)[..., None], 3, axis=2)  # [H, W, 3]
    mask = np.zeros((height, width), bool)  # True where kept
    boxes = [patch_box(i, grid, width, height) for i in sorted(set(kept.tolist()))]
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = True
    shown = np.where(mask[..., None], pixels, dimmed).clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(shown, "RGB")
    draw = ImageDraw.Draw(picture)
    line = max(1, scale // 2)
    for left, top, right, bottom in boxes:
        draw.rectangle((left, top, right - 1, bottom - 1), outline=OUTLINE, width=line)

    font = _font()
    band = title_band if title_band is not None else title_height(title, width, font)
    panel = Image.new("RGB", (width, band + height), BACKGROUND)
    panel.paste(picture, (0, band))
    text_draw = ImageDraw.Draw(panel)
    y = TITLE_PAD
    for text_line in _wrap(title, font, width - 2 * TITLE_PAD):
        text_draw.text((TITLE_PAD, y), text_line, fill=TEXT, font=font)
        y += _line_height(font)
    return panel


def compose(panels: Sequence[Panel], scale: int | None = None) -> Image.Image:
    """Panels side by side, PAD px apart and around, title bands of equal height, tops aligned."""
    if not panels:
        raise ConfigError("visualize: got no artifacts, expected at least one")
    zoom = scale if scale is not None else auto_scale(min((p.crop.size for p in panels), key=min))
    font = _font()
    band = max(title_height(p.title, p.crop.width * zoom, font) for p in panels)
    rendered = [render_kept_patches(p.crop, p.kept_indices, p.grid, p.title, zoom, title_band=band) for p in panels]
    width = sum(r.width for r in rendered) + PAD * (len(rendered) + 1)
    height = max(r.height for r in rendered) + 2 * PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    x = PAD
    for r in rendered:
        canvas.paste(r, (x, PAD))
        x += r.width + PAD
    return canvas


def panel_title(method: str, budget: int, num_visual_tokens: int, prompt: str, synthetic: bool = False) -> str:
    """`method: kept K=.. of N=.. (..%)` [`, synthetic weights`], then the prompt on its own line(s)."""
    prompt_text = " ".join(prompt.split())
    note = ", synthetic weights" if synthetic else ""
    return f"{method}: kept K={budget} of N={num_visual_tokens} ({100 * budget / num_visual_tokens:.0f}%){note}\n\"{prompt_text}\""


def artifact_panel(artifact: Path | str, image: Image.Image, prompt: str) -> Panel:
    """Run one artifact's vision graph on `image` and `prompt` and collect its kept patches (no torch)."""
    from prunert.runtime import VLMPipeline

    pipe = VLMPipeline(artifact)
    budget = pipe.manifest.budget
    grid = single_patch_grid(pipe.manifest, artifact)
    pipe.tokenize([prompt])  # PromptError for a prompt `run` would reject (placeholder count, length)
    kept = np.asarray(pipe.encode_images([image], [prompt]).kept_indices)[0]  # [K]
    title = panel_title(budget.method, budget.budget, budget.num_visual_tokens, prompt, pipe.manifest.source.synthetic)
    view = pipe.artifact.host.model_view(image, pipe.artifact.preprocessor_config)  # the family's resize + crop, not normalised
    return Panel(view, kept, grid, title)


def visualize(artifacts: Sequence[Path | str], image: Path | str | Image.Image, prompt: str, out: Path | str, scale: int | None = None) -> Path:
    """Render the kept patches of each artifact on `image` side by side and write a PNG to `out` atomically.

    Returns `out`. Errors (missing artifact, an artifact without a single fixed patch grid, bad image, bad prompt,
    non-square N, unwritable out) are PrunertErrors; artifacts are checked before anything runs.
    """
    if not artifacts:
        raise ConfigError("visualize: got no artifacts, expected at least one")
    if scale is not None and (isinstance(scale, bool) or int(scale) != scale or scale < 1):
        raise ConfigError(f"--scale: got {scale!r}, expected an integer >= 1")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out '{out}': is a directory, expected a .png file path")
    for artifact in artifacts:  # refuse tiled / dynamic-resolution artifacts before running any graph
        single_patch_grid(load_manifest(Path(artifact), verify_hashes=False), artifact)
    picture = load_image(image) if isinstance(image, (str, Path)) else check_image(image, "image")
    panels = [artifact_panel(a, picture, prompt) for a in artifacts]
    canvas = compose(panels, scale)
    return _write_png(canvas, out)


def _write_png(canvas: Image.Image, out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out '{out}': cannot create its directory ({exc.strerror or exc})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise ConfigError(f"--out '{out}': cannot write in its directory ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            canvas.save(handle, format="PNG")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a plain file's mode
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"--out '{out}': cannot write the PNG ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["patch_grid", "single_patch_grid", "patch_box", "render_kept_patches", "compose", "visualize"]
