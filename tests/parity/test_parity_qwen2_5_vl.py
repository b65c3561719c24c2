"""Qwen2.5-VL end to end through the CLI: export synthetic:qwen2.5-vl-tiny (K=16; N = 16..113 merged tokens
per image once min_pixels is raised to K), run, parity PASS on two photos of different sizes (P = 256 and
216 patches), check-trt clean, a batch of two images in one `run` (one vision call per image), and the
M-RoPE rule at the output level: prunert's positions are HF's own, and renumbering the kept tokens
(as a dense grid, or 1-D) changes the logits."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from prunert import cli  # noqa: E402
from prunert.adapters import resolve_source  # noqa: E402
from prunert.adapters.qwen2_5_vl import IMAGE_PLACEHOLDER, QWEN_PROMPT_TEMPLATE, host  # noqa: E402
from prunert.config import BudgetConfig, EngineBuildConfig, GenerationConfig  # noqa: E402
from prunert.engines.profiles import derive_profiles  # noqa: E402
from prunert.errors import ArtifactError, InputShapeError  # noqa: E402
from prunert.export.pipeline import fit_budget, load_export_adapter  # noqa: E402
from prunert.manifest import load_manifest  # noqa: E402
from prunert.parity.reference import _reference_embeds, _reference_greedy_positions  # noqa: E402
from prunert.parity.report import PASS  # noqa: E402
from prunert.runtime import VLMPipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "examples" / "images"
MODEL = "synthetic:qwen2.5-vl-tiny"
BUDGET, N_MIN, N_MAX = 16, 16, 113
PROMPT = IMAGE_PLACEHOLDER + "What is the cat doing?"
PIXEL_STAGES = {f"pixels:{name}" for name in ("pixel_values", "rotary_cos", "rotary_sin", "window_gather", "window_mask", "window_slots",
                                               "reverse_index")}
STAGES = {"source", *PIXEL_STAGES, "token ids", "visual tokens before pruning", "kept indices", "kept tokens", "prefill logits",
          "greedy tokens"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("qwen2.5-vl") / "tiny-k16"
    code = cli.main(["export", "--model", MODEL, "--budget", str(BUDGET), "--out", str(out),
                     "--max-prompt-tokens", "64", "--max-new-tokens", "16"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pipe(artifact: Path) -> VLMPipeline:
    return VLMPipeline(artifact)


@pytest.fixture(scope="module")
def adapter(artifact: Path):
    adapter = load_export_adapter(resolve_source(MODEL))
    fit_budget(adapter, BudgetConfig(budget=BUDGET))
    return adapter


def _photo(name: str) -> Image.Image:
    with Image.open(IMAGES / f"{name}.jpg") as opened:
        return opened.convert("RGB")


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_manifest_and_profiles_describe_the_one_image_graph(artifact: Path) -> None:
    manifest = load_manifest(artifact)
    assert manifest.source.family == "qwen2_5_vl" and manifest.budget.num_visual_tokens == N_MAX
    vision = manifest.graphs["vision"]
    assert [(t.name, t.shape) for t in vision.inputs] == [
        ("pixel_values", ("patches", 1176)), ("rotary_cos", ("patches", 16)), ("rotary_sin", ("patches", 16)),
        ("window_gather", ("windows", "window_len")), ("window_mask", ("windows", "window_len")), ("window_slots", ("patches",)),
        ("reverse_index", ("merged",)), ("text_embeds", (1, "text", 64)), ("text_mask", (1, "text"))]
    assert [(t.name, t.shape) for t in vision.outputs] == [("visual_tokens", (1, BUDGET, 64)), ("kept_indices", (1, BUDGET))]
    assert vision.dim_ranges == {"merged": (N_MIN, 64, N_MAX), "patches": (4 * N_MIN, 256, 4 * N_MAX), "windows": (1, 16, 57),
                                 "window_len": (8, 16, 16)}
    assert manifest.graphs["decoder"].input("position_ids").shape == (3, "batch", "sequence")
    assert manifest.family_config["min_visual_tokens"] == N_MIN
    assert json.loads((artifact / "preprocessor_config.json").read_text())["min_pixels"] == BUDGET * 28 * 28  # raised from 4 tokens
    (profile,) = derive_profiles(manifest, "vision", EngineBuildConfig())
    assert profile.shapes["pixel_values"] == ((64, 1176), (256, 1176), (452, 1176)) and profile.shapes["reverse_index"] == ((16,), (64,), (113,))
    assert profile.shapes["window_gather"] == profile.shapes["window_mask"] == ((1, 8), (16, 16), (57, 16))  # profiles over the window count
    context, generation = derive_profiles(manifest, "decoder", EngineBuildConfig())
    assert context.shapes["position_ids"][2] == (3, 8, manifest.text.max_sequence) and generation.shapes["position_ids"][0] == (3, 1, 1)


@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])  # 512 x 512 -> 8 x 8 merged tokens, 451 x 300 -> 9 x 6
def test_cli_run_and_parity_pass(capsys, artifact: Path, tmp_path: Path, photo: str) -> None:
    image = IMAGES / f"{photo}.jpg"
    assert cli.main(["run", str(artifact), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "4", "--no-stream"]) == 0
    own_n = {"astronaut": 64, "chelsea": 54}[photo]
    assert f"kept {BUDGET}/{own_n} visual tokens (resprune)" in capsys.readouterr().err  # the image's own N
    report = tmp_path / "parity.json"
    code = cli.main(["parity", str(artifact), "--image", str(image), "--prompt", PROMPT, "--out", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == "parity: PASS"
    written = json.loads(report.read_text())
    assert {check["stage"] for check in written["checks"]} == STAGES
    assert all(check["status"] == PASS for check in written["checks"]), out


def test_placeholder_in_manifest_calibration_and_cli(error_line, capsys, artifact: Path, pipe: VLMPipeline, tmp_path: Path) -> None:
    """The manifest carries the full placeholder (image_token stays the token the runtime replaces): the built-in
    calibration prompts get it, `run` names it, and `visualize` (one fixed patch grid only) refuses the artifact."""
    from prunert.calibration.dataset import load_calibration_set

    text = load_manifest(artifact).text
    assert text.placeholder == text.image_placeholder == IMAGE_PLACEHOLDER and text.image_token == "<|image_pad|>"
    prompts = load_calibration_set(REPO / "examples" / "calibration", None, 2).prompts_for(text.placeholder)
    assert all(p.startswith(IMAGE_PLACEHOLDER + "\n") for p in prompts)
    assert [ids.count(text.image_token_id) for ids in pipe.tokenize(prompts)] == [1, 1]
    image = str(IMAGES / "chelsea.jpg")
    assert cli.main(["run", str(artifact), "--image", image, "--prompt", f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}?"]) == 2
    error_line(capsys.readouterr().err, f"image placeholder {IMAGE_PLACEHOLDER!r} 2 times")
    out = tmp_path / "v.png"
    assert cli.main(["visualize", str(artifact), "--image", image, "--prompt", PROMPT, "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, f"artifact '{artifact}' (qwen2_5_vl family)", "single fixed patch grid (LLaVA-1.5-style")
    assert not out.exists()


def test_dim_ranges_are_checked(artifact: Path, pipe: VLMPipeline, tmp_path: Path) -> None:
    text = (artifact / "manifest.json").read_text()
    assert text.count('"dim_ranges"') == 2  # the vision graph's and the fused decoder's cache; empty ones are not written
    feeds = pipe.artifact.host.vision_inputs([_noise(20, 20)], pipe.artifact.preprocessor_config)
    names = {t.name for t in pipe.vision.spec.inputs}  # the graph's inputs (the host also gives image_grid_thw, window_segments)
    small = {name: value[: len(value) // 2] for name, value in feeds.items() if name in names}  # 8 merged < 16
    embeds, mask = np.zeros((1, 1, 64), np.float32), np.zeros((1, 1), np.int64)
    with pytest.raises(InputShapeError, match=r"input 'pixel_values'.*patches in 64\.\.452"):
        pipe.vision.infer({**small, "text_embeds": embeds, "text_mask": mask})
    bad = json.loads(text)
    bad["graphs"]["vision"]["dim_ranges"]["merged"] = [16, 200, 113]
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"dim_ranges\.merged"):
        load_manifest(tmp_path, verify_hashes=False)


def test_check_trt_is_clean(capsys, artifact: Path) -> None:
    assert cli.main(["check-trt", str(artifact)]) == 0
    assert capsys.readouterr().out.count("OK ") == 2


def test_batch_in_one_run_equals_single_runs(capsys, artifact: Path, pipe: VLMPipeline) -> None:
    paths = [IMAGES / "chelsea.jpg", IMAGES / "astronaut.jpg"]
    prompts = [PROMPT, IMAGE_PLACEHOLDER + "Describe the astronaut and the flag in detail."]
    args = ["run", str(artifact), "--max-new-tokens", "5", "--no-stream"]
    assert cli.main([*args, *(a for p, q in zip(paths, prompts) for a in ("--image", str(p), "--prompt", q))]) == 0
    assert [line.split("]")[0] for line in capsys.readouterr().out.splitlines()] == [f"[{p}" for p in paths]
    images = [_photo("chelsea"), _photo("astronaut"), _noise(20, 20), _noise(4000, 20)]  # N = 54, 64, 16 (upscaled), 113
    prompts += [PROMPT, PROMPT]
    batch = pipe.encode_images(images, prompts)
    assert [inputs["reverse_index"].shape[0] for inputs in batch.pixel_inputs] == [54, 64, N_MIN, N_MAX]
    grids = [out["image_grid_thw"][0].tolist() for out in batch.host_outputs]  # the host's own data, back to it for positions
    assert grids == [[1, 12, 18], [1, 16, 16], [1, 8, 8], [1, 2, 226]]
    assert batch.kept_indices[2].tolist() == list(range(N_MIN))  # K = N: all kept
    config = GenerationConfig(max_new_tokens=6)
    results = pipe.generate(images[:2], prompts[:2], config)
    for row, (image, prompt) in enumerate(zip(images[:2], prompts[:2])):
        alone = pipe.generate([image], [prompt], config)[0]
        assert batch.kept_indices[row].tolist() == results[row].kept_indices.tolist() == alone.kept_indices.tolist()
        assert results[row].token_ids == alone.token_ids


def _hf_logits(adapter, embeds: np.ndarray, positions) -> np.ndarray:
    with torch.no_grad():
        out = adapter.model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            position_ids=torch.tensor(np.asarray(positions)))
    return out.logits.numpy()


def test_kept_tokens_keep_hf_positions_and_renumbering_changes_logits(pipe: VLMPipeline, adapter) -> None:
    image = _photo("chelsea")
    ids = pipe.tokenize([PROMPT])
    vision = pipe.encode_images([image], [PROMPT])
    state = pipe.prefill(ids, vision)
    kept = torch.from_numpy(vision.kept_indices)
    hf_positions, _ = adapter.hf_position_ids(ids[0], [image], resolve_source(MODEL).path, kept)  # HF's get_rope_index, restricted
    assert np.array_equal(state.position_ids, hf_positions.numpy())
    reference = _hf_logits(adapter, state.inputs_embeds, hf_positions)
    assert np.abs(state.logits - reference).max() <= 1e-3
    # renumbered: the kept tokens as a dense 4 x 4 grid, or as consecutive 1-D positions (what LLaVA does)
    image_id, at = pipe.manifest.text.image_token_id, ids[0].index(pipe.manifest.text.image_token_id)
    spliced = np.asarray(ids[0][:at] + [image_id] * BUDGET + ids[0][at + 1 :])[None]
    dense, _ = host.rope_index(spliced, [[1, 8, 8]], image_token_id=image_id)
    flat = np.broadcast_to(np.arange(spliced.shape[1]), (3, 1, spliced.shape[1]))
    for renumbered in (dense, flat):
        assert not np.array_equal(renumbered, state.position_ids)
        assert np.abs(_hf_logits(adapter, state.inputs_embeds, renumbered) - reference).max() > 0.1  # 100x the parity bar


def test_reference_greedy_loop_is_hf_generate(adapter) -> None:
    """The parity reference's greedy loop (HF forward, KV cache, explicit positions) equals HF's own
    `generate` on an unpruned prompt, where generate computes the M-RoPE positions itself."""
    image, model_dir = _photo("astronaut"), resolve_source(MODEL).path
    ids = adapter.hf_token_ids(QWEN_PROMPT_TEMPLATE.format(prompt=PROMPT), model_dir)
    hf = adapter.hf_image_inputs([image], model_dir)
    image_id = adapter.model.config.image_token_id
    count, at = int(hf["image_grid_thw"].prod()) // 4, ids.index(image_id)
    full = torch.tensor([ids[:at] + [image_id] * count + ids[at + 1 :]])
    with torch.no_grad():
        out = adapter.model.generate(input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=(full == image_id).int(),
                                     pixel_values=hf["pixel_values"], image_grid_thw=hf["image_grid_thw"], max_new_tokens=6,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
        visual = adapter.model.model.get_image_features(hf["pixel_values"], hf["image_grid_thw"]).pooler_output[0][None]
    positions, deltas = adapter.hf_position_ids(ids, [image], model_dir, torch.arange(count)[None])
    embeds = _reference_embeds(adapter, ids, image_id, visual)
    tokens, _ = _reference_greedy_positions(adapter, embeds, positions, deltas, types.SimpleNamespace(eos_token_ids=()), 6)
    assert tokens == out[0, full.shape[1] :].tolist()



def test_unpruned_artifact_keeps_each_images_own_n(tmp_path: Path, capsys) -> None:
    """--method none (K = the largest N): outputs [1, merged, D]; a batch of images with different N is padded
    with masked slots, each row splices its own N tokens and decodes as it does alone; parity PASS."""
    out = tmp_path / "tiny-none"
    assert cli.main(["export", "--model", MODEL, "--method", "none", "--budget", str(N_MAX), "--out", str(out),
                     "--max-prompt-tokens", "64", "--max-new-tokens", "16"]) == 0
    manifest = load_manifest(out)
    assert [t.shape for t in manifest.graphs["vision"].outputs] == [(1, "merged", 64), (1, "merged")]
    assert manifest.family_config["min_visual_tokens"] == 4  # the pixel range is the checkpoint's own
    pipe = VLMPipeline(out)
    images, prompts = [_photo("chelsea"), _noise(20, 20)], [PROMPT, PROMPT]
    vision = pipe.encode_images(images, prompts)
    assert vision.kept_indices.shape == (2, 54) and vision.kept_valid.sum(axis=1).tolist() == [54, 4]
    assert vision.kept(1)[1].tolist() == [0, 1, 2, 3]
    config = GenerationConfig(max_new_tokens=5)
    for row, result in enumerate(pipe.generate(images, prompts, config)):
        alone = pipe.generate([images[row]], [prompts[row]], config)[0]
        assert result.kept_indices.tolist() == alone.kept_indices.tolist() and result.token_ids == alone.token_ids
    assert cli.main(["parity", str(out), "--image", str(IMAGES / "chelsea.jpg"), "--prompt", PROMPT, "--out", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "parity: PASS"


@pytest.fixture(scope="module")
def variants(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the artifact with fp16 (`convert`, selection kept fp32) and int8 (`calibrate`: Q/DQ around the tower's
    and decoder's MatMuls, the built-in prompts carrying the full placeholder) variants, and what calibrate printed."""
    import contextlib
    import io
    import shutil

    copy = tmp_path_factory.mktemp("qwen-variants") / "artifact"
    shutil.copytree(artifact, copy)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["convert", str(copy), "--precision", "fp16"]) == 0
        assert cli.main(["calibrate", str(copy), "--precision", "int8", "--max-samples", "4"]) == 0
    assert set(load_manifest(copy).variants) == {"fp16", "int8"}
    return copy, printed.getvalue()


def _variant_parity(capsys, variants: tuple[Path, str], tmp_path: Path, precision: str) -> None:
    capsys.readouterr()
    code = cli.main(["parity", str(variants[0]), "--precision", precision, "--image", str(IMAGES / "chelsea.jpg"),
                     "--prompt", PROMPT, "--out", str(tmp_path / f"{precision}.json")])
    assert code == 0 and capsys.readouterr().out.rstrip().splitlines()[-1] == "parity: PASS", precision


def test_fp16_variant_passes_its_bars(variants: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """The generic precision path on this family, parity at fp16's bars against HF in fp32."""
    assert "'<|vision_start|><|image_pad|><|vision_end|> What" in variants[1]  # calibrate's prompts as run
    _variant_parity(capsys, variants, tmp_path, "fp16")


@pytest.mark.xfail(strict=True, reason="issue 14, open: int8 on the tiny random preset misses the kept-overlap / prefill-cosine bars since the "
                   "padded-window graph (chelsea: 14/16 kept, cosine 0.974; its kept tokens as close as before, cosine 0.998). The "
                   "masked graph passed on chelsea but failed on astronaut too (cosine 0.980): int8's kept set is near-tie sensitive here")
def test_int8_variant_passes_its_bars(variants: tuple[Path, str], tmp_path: Path, capsys) -> None:
    _variant_parity(capsys, variants, tmp_path, "int8")


@pytest.mark.parametrize("method", ["uniform", "random"])
def test_uniform_and_random_follow_each_images_n(tmp_path: Path, capsys, method: str) -> None:
    """One graph over a range of N: the indices come from each image's own N at run time (54 and 64 here),
    equal to the flat op on that N; parity PASS."""
    from prunert import pruning_ops

    out = tmp_path / method
    assert cli.main(["export", "--model", MODEL, "--method", method, "--budget", str(BUDGET), "--out", str(out),
                     "--max-prompt-tokens", "64", "--max-new-tokens", "16"]) == 0
    pipe, manifest = VLMPipeline(out), load_manifest(out)
    budget = pruning_ops.config_from_params(method, manifest.budget.params, BUDGET)
    for name, n in (("chelsea", 54), ("astronaut", 64)):
        vision = pipe.encode_images([_photo(name)], [PROMPT])
        want, _ = pruning_ops.select_reference({"tokens": np.zeros((n, 1))}, budget)
        assert vision.kept_indices[0].tolist() == want.tolist(), name
    assert cli.main(["parity", str(out), "--image", str(IMAGES / "chelsea.jpg"), "--prompt", PROMPT, "--out", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "parity: PASS"
