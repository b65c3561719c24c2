"""Calibration set: images + prompts, paired deterministically, and the exact fp32 feeds each graph gets.

`load_calibration_set` reads a folder of images (files without an image suffix, such as prompts.txt or
SOURCES.md, are ignored) and an optional prompts file: one prompt per line, each with the artifact's
image placeholder once (`manifest.text.placeholder`: `<image>`, Qwen2.5-VL
`<|vision_start|><|image_pad|><|vision_end|>`), a literal backslash-n as a line break inside the prompt,
blank lines and lines starting with '#' skipped. Without a prompts file the built-in prompts are used;
their `<image>` is swapped for the artifact's placeholder when the samples run. Images are sorted by
file name and paired with prompts round-robin: sample i is (images[i % n_images], prompts[i % n_prompts])
for i < min(max_samples, max(n_images, n_prompts)). Every image a sample uses is opened and checked.

`collect_feeds` runs the artifact's fp32 graphs through the runtime pipeline and records the inputs it
feeds each graph: one vision feed per sample, one decoder prefill feed (spliced embeddings, mask,
positions, empty past) per sample, and greedy decode-step feeds (past = the previous step's present)
for the first few samples, so activation ranges cover both decoder regimes. Batch 1 per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from prunert.config import GenerationConfig
from prunert.errors import ConfigError, ImageError, PromptError
from prunert.runtime.image import load_image
from prunert.runtime.pipeline import make_runner
from prunert.runtime.runner import DecoderSession, HostKVSession

IMAGE_PLACEHOLDER = "<image>"  # the placeholder BUILTIN_PROMPTS use; swapped for manifest.text.placeholder
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DECODE_STEPS = 2  # decode-step feeds recorded per sample (after the prefill) ...
DECODE_SAMPLES = 4  # ... for this many samples (each feed holds the whole KV cache)

# LLaVA-1.5 style VQA prompts: short (they fit the tiny test artifact's 48 prompt tokens), varied in intent.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "<image>\nWhat is shown in this image?",
    "<image>\nDescribe the scene in one sentence.",
    "<image>\nHow many people are visible here?",
    "<image>\nWhat colour is the main object?",
    "<image>\nIs there any text in the picture? What does it say?",
    "<image>\nWhere might this photo have been taken?",
    "<image>\nWhat is the person in the image doing?",
    "<image>\nWhat animal is this, and what is it doing?",
    "<image>\nWhich object is closest to the camera?",
    "<image>\nIs it day or night in this scene?",
    "<image>\nWhat material is the table made of?",
    "<image>\nList three things you can see in the image.",
)


@dataclass(frozen=True)
class CalibrationSample:
    image: Path
    prompt: str


@dataclass(frozen=True)
class CalibrationSet:
    """Deterministically paired (image, prompt) samples; `summary()` goes into the manifest."""

    samples: tuple[CalibrationSample, ...]
    images: tuple[Path, ...]  # every image found, sorted by name
    prompts: tuple[str, ...]
    builtin_prompts: bool  # prompts are BUILTIN_PROMPTS (placeholder IMAGE_PLACEHOLDER)
    source: str = ""  # the images folder, for messages

    def summary(self) -> dict[str, Any]:
        return {
            "images": sorted({s.image.name for s in self.samples}),
            "images_found": len(self.images),
            "prompts": len(self.prompts),
            "builtin_prompts": self.builtin_prompts,
            "samples": len(self.samples),
        }

    def prompts_for(self, placeholder: str) -> list[str]:
        """Each sample's prompt, built-in ones with `<image>` replaced by the artifact's full image placeholder
        (`manifest.text.placeholder`; Qwen2.5-VL: `<|vision_start|><|image_pad|><|vision_end|>`)."""
        if not self.builtin_prompts or placeholder == IMAGE_PLACEHOLDER:
            return [s.prompt for s in self.samples]
        return [s.prompt.replace(IMAGE_PLACEHOLDER, placeholder) for s in self.samples]


def load_calibration_set(
    images_dir: Path,
    prompts_file: Path | None = None,
    max_samples: int = 32,
    placeholder: str = IMAGE_PLACEHOLDER,
) -> CalibrationSet:
    """Images of `images_dir` (sorted; every one a sample uses is checked readable) paired round-robin with prompts.

    `placeholder`: the artifact's image placeholder (`manifest.text.placeholder`), which every line of
    `prompts_file` must contain exactly once."""
    images_dir = Path(images_dir)
    if max_samples < 1:
        raise ConfigError(f"max_samples: got {max_samples}, expected >= 1")
    if not images_dir.exists():
        raise ImageError(f"calibration images '{images_dir}': no such directory")
    if not images_dir.is_dir():
        raise ImageError(f"calibration images '{images_dir}': not a directory, expected a folder of images")
    images = tuple(sorted((p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name))
    if not images:
        raise ImageError(
            f"calibration images '{images_dir}': no image files ({', '.join(IMAGE_SUFFIXES)}), expected at least one"
        )
    if prompts_file is None:
        prompts, builtin = BUILTIN_PROMPTS, True
    else:
        prompts, builtin = _read_prompts(Path(prompts_file), placeholder), False
    count = min(max_samples, max(len(images), len(prompts)))
    for path in images[:count]:
        load_image(path)  # ImageError naming the file: unreadable, too large, tiny
    samples = tuple(CalibrationSample(images[i % len(images)], prompts[i % len(prompts)]) for i in range(count))
    return CalibrationSet(samples, images, tuple(prompts), builtin, str(images_dir))


def _read_prompts(path: Path, placeholder: str) -> tuple[str, ...]:
    if not path.is_file():
        raise ConfigError(f"calibration prompts '{path}': no such file, expected a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"calibration prompts '{path}': not UTF-8 text ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        text = line.strip().replace("\\n", "\n")  # a literal \n in the file is a line break in the prompt
        if not text or text.startswith("#"):
            continue
        count = text.count(placeholder)
        if count != 1:
            raise PromptError(
                f"calibration prompts '{path}' line {number}: contains the image placeholder {placeholder!r} "
                f"{count} times, expected exactly once"
            )
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"calibration prompts '{path}': no prompts (blank lines and '#' comments are skipped)")
    return tuple(prompts)


class FeedReader:
    """onnxruntime CalibrationDataReader over recorded feeds; set_range lets the quantizer take one
    feed at a time (the histogram calibrators cannot stack feeds of different shapes)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._items = iter(self.feeds[start_index:end_index])


class _Recorder:
    """Wraps a runner: records a copy of every feed, then runs it. Its decoder session keeps the KV cache in
    numpy and feeds it through `infer`, so decode steps are recorded with their whole past."""

    def __init__(self, runner: Any, sink: list[dict[str, np.ndarray]]):
        self.runner, self.sink, self.spec = runner, sink, runner.spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sink.append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return self.runner.infer(feeds)

    def decoder_session(self, num_layers: int) -> DecoderSession:
        return HostKVSession(self, num_layers)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def collect_feeds(
    pipe: Any,
    calibration_set: CalibrationSet,
    decode_steps: int = DECODE_STEPS,
    decode_samples: int = DECODE_SAMPLES,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """{"vision": [...], "decoder": [...]}: the fp32 inputs the runtime gives each graph on the set.

    Every sample gives one vision feed and one decoder prefill feed; the first `decode_samples` samples
    also give `decode_steps` greedy decode-step feeds each. Those carry the whole KV cache (hundreds of
    MB per feed for a 7B decoder), hence the cap. The decoder feeds are the standard decoder's (the form
    convert and calibrate rewrite), whichever form the pipeline runs.
    """
    vision: list[dict[str, np.ndarray]] = []
    decoder: list[dict[str, np.ndarray]] = []
    runners = pipe.vision, pipe.decoder
    standard = runners[1] if runners[1].spec.kv_cache is None else make_runner(pipe.artifact, "decoder", pipe.backend, pipe.precision, pipe.runtime)
    pipe.vision, pipe.decoder = _Recorder(runners[0], vision), _Recorder(standard, decoder)  # the standard decoder: the form calibrated
    head, tail = calibration_set.samples[:decode_samples], calibration_set.samples[decode_samples:]
    try:
        for samples, tokens in ((head, decode_steps + 1), (tail, 1)):
            if samples:
                for_each_sample(pipe, replace(calibration_set, samples=samples), lambda *_: None, tokens)
    finally:
        pipe.vision, pipe.decoder = runners
    return {"vision": vision, "decoder": decoder}


def for_each_sample(
    pipe: Any,
    calibration_set: CalibrationSet,
    visit: Callable[[int, Any, Any, list[int]], None],
    greedy_tokens: int,
) -> None:
    """Run every sample through `pipe` (batch 1): vision, prefill, then greedy decoding, the runtime's own
    stages (VLMPipeline.prefill and .decode, the one decode loop).

    visit(sample index, VisionResult, the pipeline's Prefill, greedy token ids). Decoding yields `greedy_tokens`
    tokens (greedy_tokens - 1 decode steps after the prefill), capped by the artifact's max_sequence.
    """
    prompts = calibration_set.prompts_for(pipe.manifest.text.placeholder)
    greedy = GenerationConfig(max_new_tokens=greedy_tokens)  # temperature 0
    for index, (sample, prompt) in enumerate(zip(calibration_set.samples, prompts)):
        image = load_image(sample.image)
        sequences = pipe.tokenize([prompt])
        result = pipe.encode_images([image], [prompt])
        state = pipe.prefill(sequences, result)
        visit(index, result, state, pipe.decode(state, greedy)[0])


def feed_summary(feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, int]:
    return {graph: len(items) for graph, items in sorted(feeds.items())}
