"""Per-graph precision (`--precision vision=fp16,decoder=fp32`) and the runtime's thread settings (`--threads N`,
`--spin`): which graph file each session opens, the parity bars each stage takes, what reports record, one error
line for bad text, and the ONNX Runtime session options (never timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prunert import cli
from prunert.config import PRECISION_TOLERANCES, GraphPrecisions, ParityTolerances, RuntimeConfig
from prunert.errors import ConfigError
from prunert.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is the astronaut holding?"
MIXED = "vision=fp16,decoder=fp32"
SPIN = "session.intra_op.allow_spinning"


@pytest.fixture(scope="module")
def fp16_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact with an fp16 variant (both graphs), made through `prunert convert`."""
    import shutil

    out = tmp_path_factory.mktemp("graph-precision") / "artifact"
    shutil.copytree(tiny_artifact, out)
    assert cli.main(["convert", str(out), "--precision", "fp16", "--max-samples", "2"]) == 0
    return out


@pytest.fixture
def opened(monkeypatch) -> list[tuple[str, object]]:
    """(graph file name, SessionOptions) of every ONNX Runtime session opened while the test runs."""
    from prunert.runtime import runner

    seen: list[tuple[str, object]] = []
    real = runner._open_session

    def spy(ort, path, options, providers):
        seen.append((Path(path).name, options))
        return real(ort, path, options, providers)

    monkeypatch.setattr(runner, "_open_session", spy)
    return seen


# ---- parsing ---------------------------------------------------------------------------------------------------

def test_parse_forms_and_label() -> None:
    assert GraphPrecisions.parse("fp16") == GraphPrecisions("fp16", "fp16") and GraphPrecisions.parse("fp16").label == "fp16"
    mixed = GraphPrecisions.parse(" vision=fp16 , decoder=int8 ")
    assert (mixed.vision, mixed.decoder, mixed.label) == ("fp16", "int8", "vision=fp16,decoder=int8")
    assert GraphPrecisions.parse("vision=fp16") == GraphPrecisions("fp16", "fp32")  # a role not named stays fp32
    assert GraphPrecisions.parse("vision=fp16,decoder=fp16").label == "fp16"  # uniform: the short label
    assert mixed.of("decoder_fused") == "int8" and mixed.of("vision") == "fp16"  # the fused decoder has the decoder role
    assert mixed.groups() == {"fp16": ("vision",), "int8": ("decoder",)} and GraphPrecisions().groups() == {"fp32": ("vision", "decoder")}


@pytest.mark.parametrize("text, needle", [
    ("vision=fp16,decoder", "'decoder' is not ROLE=PRECISION"),
    ("vision=fp99", "--precision vision: got 'fp99'"),
    ("foo=fp16", "unknown graph role 'foo'"),
    ("vision=fp16,vision=fp32", "role 'vision' given twice"),
    ("vision=int4", "--precision vision: got 'int4'"),  # decoder-only (weight-only); unknown before int4 existed
    ("fp64", "--precision: got 'fp64'"),
])
def test_bad_precision_text_is_one_config_error(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GraphPrecisions.parse(text)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["run", "parity", "eval", "build"])
@pytest.mark.parametrize("text, needle", [
    ("vision=fp16,decoder", "is not ROLE=PRECISION"),
    ("vision=fp99", "got 'fp99'"),
    ("foo=fp16", "unknown graph role 'foo'"),
    ("decoder=fp16,decoder=fp16", "given twice"),
])
def test_bad_precision_flag_exits_2_with_one_line(prunert_main, error_line, tiny_artifact: Path, tmp_path: Path,
                                                 command: str, text: str, needle: str) -> None:
    rest = {"run": ["--image", PHOTO, "--prompt", PROMPT], "parity": ["--image", PHOTO, "--prompt", PROMPT],
            "eval": ["--data", tmp_path / "none.jsonl"], "build": []}[command]
    code, _, err = prunert_main(command, tiny_artifact, "--precision", text, *rest)
    assert code == 2
    error_line(err, "--precision", needle)


# ---- runtime: which file each graph opens -----------------------------------------------------------------------

def test_run_mixed_precision_opens_the_fp16_vision_and_fp32_decoder(prunert_main, fp16_artifact: Path, opened) -> None:
    manifest = load_manifest(fp16_artifact)
    code, _, err = prunert_main("run", fp16_artifact, "--precision", MIXED, "--image", PHOTO, "--prompt", PROMPT,
                                "--max-new-tokens", "2", "--no-stream")
    assert code == 0, err
    decoder = next(g for g in ("decoder_fused", "decoder") if g in manifest.graphs)  # the CPU runs the fused form where exported
    files = [name for name, _ in opened]
    assert files == [Path(manifest.variants["fp16"].graphs["vision"].file).name, Path(manifest.graphs[decoder].file).name]
    assert manifest.variants["fp16"].graphs["vision"].file != manifest.graphs["vision"].file  # really two variants
    assert f"onnxruntime {MIXED};" in err


def test_pipeline_takes_each_graph_from_its_role(fp16_artifact: Path) -> None:
    from prunert.runtime import VLMPipeline

    manifest = load_manifest(fp16_artifact)
    pipe = VLMPipeline(fp16_artifact, precision="vision=fp32,decoder=fp16")
    assert pipe.vision.spec.file == manifest.graphs["vision"].file
    assert pipe.decoder.spec.file == manifest.variants["fp16"].graphs["decoder"].file
    assert pipe.precision == GraphPrecisions("fp32", "fp16")


def test_host_inputs_follow_the_decoder_graphs_declared_dtype(tiny_pipeline, monkeypatch) -> None:
    """inputs_embeds and the past the host builds take the dtype the decoder graph declares (fp16 KV I/O halves it)."""
    from dataclasses import replace

    spec = tiny_pipeline.decoder.spec
    half = replace(spec, inputs=tuple(replace(t, dtype="float16") if t.dtype == "float32" else t for t in spec.inputs))
    monkeypatch.setattr(tiny_pipeline.decoder, "spec", half)
    vision = tiny_pipeline.encode_images([PHOTO], [PROMPT])
    embeds, _, _ = tiny_pipeline.splice(tiny_pipeline.tokenize([PROMPT]), vision)
    assert embeds.dtype == np.float16
    assert {p.dtype for p in tiny_pipeline.empty_past(1)} == {np.dtype(np.float16)}


def test_text_embeds_follow_the_vision_graphs_declared_dtype(tiny_pipeline, monkeypatch) -> None:
    from dataclasses import replace

    vision = tiny_pipeline.vision
    spec = vision.spec
    half = replace(spec, inputs=tuple(replace(t, dtype="float16") if t.name == "text_embeds" else t for t in spec.inputs))
    fed, run = {}, vision._run

    def spy(feeds):  # the real graph is fp32: record what the host fed, then run it at fp32
        fed.update(feeds)
        return run({**feeds, "text_embeds": feeds["text_embeds"].astype(np.float32)})

    monkeypatch.setattr(vision, "spec", half)
    monkeypatch.setattr(vision, "_run", spy)
    tiny_pipeline.encode_images([PHOTO], [PROMPT])
    assert fed["text_embeds"].dtype == np.float16


# ---- parity: bars per stage from its graph's precision ----------------------------------------------------------

def test_for_precisions_takes_vision_bars_from_vision_and_the_looser_decoder_bars() -> None:
    bars = ParityTolerances.for_precisions(GraphPrecisions("fp16", "int8"), greedy_tokens=4)
    fp16, int8 = PRECISION_TOLERANCES["fp16"], PRECISION_TOLERANCES["int8"]
    assert (bars.kept_min_overlap, bars.tokens_min_cosine) == (fp16["kept_min_overlap"], fp16["tokens_min_cosine"])
    assert (bars.logits_min_cosine, bars.tie_margin) == (int8["logits_min_cosine"], int8["tie_margin"])
    assert bars.greedy_tokens == 4
    assert ParityTolerances.for_precisions(GraphPrecisions.parse("bf16")) == ParityTolerances.for_precision("bf16")
    # an fp16 tower ahead of an fp32 decoder: the decoder's bars are the looser of the two, fp16's (it reads fp16 tokens)
    tower = ParityTolerances.for_precisions(GraphPrecisions("fp16", "fp32"))
    assert (tower.logits_max_abs, tower.logits_min_cosine, tower.tie_margin) == (None, fp16["logits_min_cosine"], fp16["tie_margin"])
    assert ParityTolerances.for_precisions(GraphPrecisions("fp32", "int4")).kept_min_overlap == 1.0


def test_parity_mixed_precision_applies_each_stages_bars(prunert_main, fp16_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    code, stdout, err = prunert_main("parity", fp16_artifact, "--precision", MIXED, "--image", PHOTO, "--prompt", PROMPT,
                                     "--out", out, "--threads", "1", "--greedy-tokens", "2")
    report = json.loads(out.read_text())
    assert code == (0 if report["verdict"] == "PASS" else 1), err
    assert report["precision"] == MIXED and f"{MIXED} bars" in stdout
    assert report["runtime"] == {"threads": 1, "spinning": False, "huge_pages": True}
    bounds = {(c["stage"].split(" (")[0], c["metric"]): c["bound"] for c in report["checks"]}
    assert bounds[("kept indices", "set overlap")] == f">= {PRECISION_TOLERANCES['fp16']['kept_min_overlap']:g}"  # vision: fp16
    assert bounds[("kept tokens", "max abs diff")] == "(reported)"
    assert bounds[("prefill logits", "max abs diff")] == "(reported)"  # fp32 decoder behind an fp16 tower: fp16's bars
    assert bounds[("prefill logits", "cosine")] == f">= {PRECISION_TOLERANCES['fp16']['logits_min_cosine']:g}"


# ---- eval, inspect, build ---------------------------------------------------------------------------------------

def test_eval_records_the_per_graph_label_and_threads(prunert_main, fp16_artifact: Path, tmp_path: Path, opened) -> None:
    from prunert.shapes.dataset import write_eval_set

    data = write_eval_set(tmp_path / "set", 2, 3)
    out = tmp_path / "eval.json"
    code, stdout, err = prunert_main("eval", fp16_artifact, "--data", data, "--precision", MIXED, "--threads", "2", "--out", out)
    assert code == 0, err
    row = json.loads(out.read_text())["artifacts"][0]
    assert row["precision"] == MIXED and row["runtime"] == {"threads": 2, "spinning": False, "huge_pages": True}
    assert MIXED in stdout
    assert {options.intra_op_num_threads for _, options in opened} == {2}


@pytest.mark.parametrize("precision", ["fp16", "vision=fp32,decoder=fp16"])
def test_eval_runs_a_variant_without_the_fused_decoder(prunert_main, fp16_artifact: Path, tmp_path: Path, precision: str) -> None:
    """convert's fp16 variant has only the standard decoder: eval's up-front manifest check asks each role's standard graph
    (the runtime falls back to it), not every top-level graph such as decoder_fused."""
    from prunert.shapes.dataset import write_eval_set

    code, _, err = prunert_main("eval", fp16_artifact, "--data", write_eval_set(tmp_path / "set", 1, 3), "--precision", precision)
    assert code == 0, err


def test_inspect_shows_a_precision_per_graph_table(prunert_main, fp16_artifact: Path) -> None:
    manifest = load_manifest(fp16_artifact)
    code, out, err = prunert_main("inspect", fp16_artifact)
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("precision per graph"))
    assert lines[at + 1].split() == ["graph", "fp32", "fp16"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[at + 2 : at + 2 + len(manifest.graphs)]}
    fp16 = manifest.variants["fp16"].graphs
    assert rows == {graph: [spec.file, fp16[graph].file if graph in fp16 else "-"] for graph, spec in manifest.graphs.items()}
    assert rows["vision"][1] == fp16["vision"].file != rows["vision"][0]


def test_build_builds_each_graph_from_its_own_variant(prunert_main, monkeypatch, fp16_artifact: Path) -> None:
    """`build --precision vision=fp16,decoder=fp32`: one build per precision, each with only its roles (no TensorRT here:
    the builder is replaced by a recorder)."""
    import prunert.engines as engines
    import prunert.engines.builder as builder

    built = []
    monkeypatch.setattr(engines, "import_tensorrt", lambda: None)
    monkeypatch.setattr(builder, "build_engines", lambda artifact, config: built.append(config) or load_manifest(artifact))
    code, _, err = prunert_main("build", fp16_artifact, "--precision", MIXED)
    assert code == 0, err
    assert [(c.precision, c.graphs) for c in built] == [("fp16", ("vision",)), ("fp32", ("decoder",))]
    built.clear()
    assert prunert_main("build", fp16_artifact, "--precision", MIXED, "--graph", "decoder")[0] == 0
    assert [(c.precision, c.graphs) for c in built] == [("fp32", ("decoder",))]


# ---- threads and spinning ---------------------------------------------------------------------------------------

def test_threads_and_spinning_reach_every_session(prunert_main, tiny_artifact: Path, opened) -> None:
    code, _, err = prunert_main("run", tiny_artifact, "--threads", "3", "--image", PHOTO, "--prompt", PROMPT, "--max-new-tokens", "1")
    assert code == 0, err
    assert len(opened) == 2
    for _, options in opened:
        assert options.intra_op_num_threads == 3
        assert options.get_session_config_entry(SPIN) == "0" and options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    opened.clear()
    assert prunert_main("run", tiny_artifact, "--spin", "--image", PHOTO, "--prompt", PROMPT, "--max-new-tokens", "1")[0] == 0
    assert [(o.intra_op_num_threads, o.get_session_config_entry(SPIN)) for _, o in opened] == [(0, "1"), (0, "1")]


def test_a_runner_does_not_spin_by_default(tiny_artifact: Path) -> None:
    """Every OnnxRuntimeRunner (calibration's, validation's, a test's) gets the non-spinning default, not only the CLI's."""
    from prunert.runtime.runner import OnnxRuntimeRunner

    spec = load_manifest(tiny_artifact).graphs["vision"]
    runner = OnnxRuntimeRunner(tiny_artifact / spec.file, spec)
    assert runner.session.get_session_options().get_session_config_entry(SPIN) == "0"


@pytest.mark.parametrize("threads", [-1, True, 1.5])
def test_bad_threads_is_one_config_error(threads) -> None:
    with pytest.raises(ConfigError, match=r"^--threads: got .*, expected >= 0"):
        RuntimeConfig(threads=threads)


def test_negative_threads_flag_exits_2(prunert_main, error_line, tiny_artifact: Path) -> None:
    code, _, err = prunert_main("run", tiny_artifact, "--threads", "-1", "--image", PHOTO, "--prompt", PROMPT)
    assert code == 2
    error_line(err, "--threads: got -1")
