"""LLaVA-NeXT end to end through the CLI: export synthetic:llava-next-tiny (K=12 of 5 tiles x 16 tokens),
run, parity PASS on a square and a wide photo (different tile grids), check-trt clean; a batch of images
with different tile counts keeps per row what each keeps alone; an image whose real tiles are all
unpadded away keeps its whole budget in the thumbnail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunert import cli
from prunert.manifest import load_manifest
from prunert.parity.report import PASS
from prunert.runtime import VLMPipeline

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "examples" / "images"
MODEL = "synthetic:llava-next-tiny"
BUDGET, N, T = 12, 16, 5
PROMPT = "<image>\nWhat is the cat doing?"
STAGES = {"source", "pixels:pixel_values", "pixels:tile_mask", "pixels:token_mask", "token ids", "kept indices",
          "kept tokens", "prefill logits", "greedy tokens", "visual tokens before pruning"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, prunert_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("llava-next") / "tiny-k12"
    code = cli.main(["export", "--model", MODEL, "--budget", str(BUDGET), "--out", str(out),
                     "--max-prompt-tokens", "48", "--max-new-tokens", "16"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pipe(artifact: Path) -> VLMPipeline:
    return VLMPipeline(artifact)


def _photo(name: str) -> Image.Image:
    with Image.open(IMAGES / f"{name}.jpg") as opened:
        return opened.convert("RGB")


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_manifest_describes_the_tiled_graph(artifact: Path) -> None:
    manifest = load_manifest(artifact)
    assert manifest.source.family == "llava_next" and manifest.source.architecture == "LlavaNextForConditionalGeneration"
    assert manifest.budget.budget == BUDGET and manifest.budget.num_visual_tokens == T * N
    vision = manifest.graphs["vision"]
    assert [(t.name, t.shape) for t in vision.inputs[:3]] == [
        ("pixel_values", ("batch", T, 3, 56, 56)), ("tile_mask", ("batch", T)), ("token_mask", ("batch", T, N))]
    assert [(t.name, t.shape) for t in vision.outputs] == [("visual_tokens", ("batch", BUDGET, 64)), ("kept_indices", ("batch", BUDGET))]
    assert manifest.family_config["tile_budgets"]["thumbnail_share"] == 0.25
    assert json.loads((artifact / "preprocessor_config.json").read_text())["patch_size"] == 14


@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])  # square (2 x 2 tiles) and 3:2 (tokens unpadded away)
def test_cli_run_and_parity_pass(capsys, artifact: Path, tmp_path: Path, photo: str) -> None:
    image = IMAGES / f"{photo}.jpg"
    assert cli.main(["run", str(artifact), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "4", "--no-stream"]) == 0
    own_n = {"astronaut": T * N, "chelsea": N + 4 * 12}[photo]  # chelsea (3:2): 4 of each tile's 16 tokens unpadded away
    assert f"kept {BUDGET}/{own_n} visual tokens" in capsys.readouterr().err
    report = tmp_path / "parity.json"
    code = cli.main(["parity", str(artifact), "--image", str(image), "--prompt", PROMPT, "--out", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == "parity: PASS"
    written = json.loads(report.read_text())
    assert {check["stage"] for check in written["checks"]} == STAGES
    assert all(check["status"] == PASS for check in written["checks"]), out


def test_check_trt_is_clean(capsys, artifact: Path) -> None:
    assert cli.main(["check-trt", str(artifact)]) == 0
    assert capsys.readouterr().out.count("OK ") == 2


def test_visualize_refuses_the_tiled_artifact(error_line, capsys, artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.png"
    code = cli.main(["visualize", str(artifact), "--image", str(IMAGES / "chelsea.jpg"), "--prompt", PROMPT, "--out", str(out)])
    assert code == 2
    error_line(capsys.readouterr().err, f"artifact '{artifact}' (llava_next family)", "single fixed patch grid (LLaVA-1.5-style")
    assert not out.exists()


def test_batch_rows_equal_single_runs(pipe: VLMPipeline) -> None:
    images = [_photo("chelsea"), _noise(60, 200)]  # 4 real tiles and 2 real tiles
    prompts = [PROMPT, "<image>\nDescribe the noise in detail."]
    batch = pipe.encode_images(images, prompts)
    assert batch.pixel_inputs["tile_mask"].sum(1).tolist() == [5, 3]
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        alone = pipe.encode_images([image], [prompt])
        assert batch.kept_indices[row].tolist() == alone.kept_indices[0].tolist()
        np.testing.assert_allclose(batch.visual_tokens[row], alone.visual_tokens[0], atol=1e-5)
    assert len({tuple(row) for row in (batch.kept_indices // N).tolist()}) == 2  # different tile splits


def test_real_tiles_without_valid_tokens_keep_nothing(pipe: VLMPipeline) -> None:
    image = _noise(1200, 20)  # 60:1: HF unpads every high-res token away
    vision = pipe.encode_images([image], [PROMPT])
    assert vision.pixel_inputs["tile_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert vision.pixel_inputs["token_mask"][0, 1:].sum() == 0
    assert (vision.kept_indices[0] < N).all()  # budget 0 for the real tiles: all K in the thumbnail
    result = pipe.generate([image], [PROMPT])[0]
    assert result.token_ids


def test_unpruned_artifact_splices_only_real_tokens_and_passes_parity(tmp_path: Path, capsys) -> None:
    """--method none (K = T x N, every slot): the splice leaves out padding tiles and unpadded-away tokens,
    so a 3:2 photo gets exactly HF's visual tokens minus its image_newline rows; parity PASS."""
    out = tmp_path / "tiny-none"
    assert cli.main(["export", "--model", MODEL, "--method", "none", "--budget", str(T * N), "--out", str(out),
                     "--max-prompt-tokens", "48", "--max-new-tokens", "16"]) == 0
    pipe = VLMPipeline(out)
    images, prompts = [_photo("chelsea"), _noise(60, 200)], [PROMPT, PROMPT]
    vision = pipe.encode_images(images, prompts)
    assert vision.kept_indices.shape == (2, T * N)
    real = (vision.pixel_inputs["token_mask"] * vision.pixel_inputs["tile_mask"][:, :, None]).sum(axis=(1, 2))  # [B]
    assert [len(vision.kept(b)[1]) for b in range(2)] == real.tolist() and real.max() < T * N
    ids = pipe.tokenize(prompts)
    _, mask, _ = pipe.splice(ids, vision)
    assert mask.sum(axis=1).tolist() == [len(row) - 1 + count for row, count in zip(ids, real)]
    assert cli.main(["parity", str(out), "--image", str(IMAGES / "chelsea.jpg"), "--prompt", PROMPT, "--out", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "parity: PASS"


def test_uniform_per_tile_artifact_passes_parity(tmp_path: Path, capsys) -> None:
    """--method uniform: the same HERO budgets, the flat op's evenly spaced rule inside each tile's valid tokens."""
    out = tmp_path / "tiny-uniform"
    assert cli.main(["export", "--model", MODEL, "--method", "uniform", "--budget", str(BUDGET), "--out", str(out),
                     "--max-prompt-tokens", "48", "--max-new-tokens", "16"]) == 0
    assert cli.main(["check-trt", str(out)]) == 0
    assert cli.main(["parity", str(out), "--image", str(IMAGES / "chelsea.jpg"), "--prompt", PROMPT, "--out", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "parity: PASS"


def test_budget_above_an_images_valid_tokens_splices_only_those(tmp_path: Path, capsys) -> None:
    """K = 24 > N = 16: a 60:1 image has only its thumbnail's 16 valid tokens; the graph still outputs 24 (8
    masked fill slots), the prompt gets the 16 real ones, and parity (which leaves the same slots out) passes."""
    out = tmp_path / "tiny-k24"
    assert cli.main(["export", "--model", MODEL, "--budget", "24", "--out", str(out), "--max-prompt-tokens", "48", "--max-new-tokens", "16"]) == 0
    pipe = VLMPipeline(out)
    image = tmp_path / "wide.png"
    _noise(1200, 20).save(image)
    vision = pipe.encode_images([_photo_from(image)], [PROMPT])
    assert vision.kept_indices.shape == (1, 24) and vision.kept_valid[0].sum() == N
    assert vision.kept(0)[1].tolist() == list(range(N))  # the thumbnail's tokens only
    ids = pipe.tokenize([PROMPT])
    assert pipe.splice(ids, vision)[1].sum() == len(ids[0]) - 1 + N
    assert cli.main(["parity", str(out), "--image", str(image), "--prompt", PROMPT, "--out", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "parity: PASS"


def _photo_from(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        return opened.convert("RGB")
