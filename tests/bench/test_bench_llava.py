"""bench/bench_vlm.py (the generic TTFT / tokens/s benchmark) and bench/bench_llava.py (its LLaVA-1.5 entry point).

Cheap checks of the family-generic pieces (flags and defaults, the prompt from the manifest, the rows, the
decode positions from the host adapter, Hugging Face's processor for every tiny family), and one end-to-end
run on llava-tiny (one K + unpruned + Hugging Face eager, one round) that proves the orchestration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
QUESTION = "\nWhat is the astronaut holding?"


def _load(name: str, file: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def vlm():
    return _load("prunert_bench_vlm", "bench_vlm.py")


@pytest.fixture(scope="module")
def llava():
    return _load("prunert_bench_llava", "bench_llava.py")


def test_bench_llava_keeps_its_flags_and_defaults(llava) -> None:
    args = llava.parse_args([])
    assert (args.preset, args.budgets, args.repeats, args.new_tokens) == ("llava-1.5-shaped", [64, 128, 192], 3, 32)
    assert (args.out, args.work) == (REPO / "bench/results/llava.json", REPO / "bench/results/artifacts")
    assert not args.skip_hf and not args.no_unpruned
    args = llava.parse_args(["--preset", "llava-tiny", "--budgets", "32,16,16", "--repeats", "1", "--new-tokens", "4", "--skip-hf"])
    assert (args.preset, args.budgets, args.repeats, args.new_tokens, args.skip_hf) == ("llava-tiny", [16, 32], 1, 4, True)
    assert args.out == REPO / "bench/results/llava.json"  # the entry point's report, whatever the preset
    for name in ("ROOT", "log", "machine", "peak_rss_mb", "speed_probe", "versions"):  # bench/study_methods.py imports them
        assert hasattr(llava, name)


def test_bench_vlm_needs_a_preset_and_names_its_report_after_it(vlm) -> None:
    args = vlm.parse_args(["--preset", "qwen2.5-vl-tiny", "--budgets", "16", "--no-unpruned"])
    assert (args.budgets, args.no_unpruned, args.out) == ([16], True, REPO / "bench/results/qwen2.5-vl-tiny.json")
    with pytest.raises(SystemExit):
        vlm.parse_args([])
    with pytest.raises(SystemExit):
        vlm.parse_args(["--preset", "llava-tiny", "--new-tokens", "1"])


def test_bench_vlm_runtime_flags_become_the_recorded_runtime_config(vlm) -> None:
    from prunert.config import RuntimeConfig

    assert vlm.parse_args(["--preset", "llava-tiny"]).runtime == RuntimeConfig()  # ORT's thread count, no spinning
    args = vlm.parse_args(["--preset", "llava-tiny", "--threads", "2", "--spin"])
    assert args.runtime == RuntimeConfig(threads=2, spinning=True) and args.runtime.record() == {"threads": 2, "spinning": True, "huge_pages": True}


def test_the_prompt_is_the_manifest_placeholder_then_the_question(vlm) -> None:
    qwen = "<|vision_start|><|image_pad|><|vision_end|>"
    assert vlm.user_prompt(SimpleNamespace(image_placeholder=qwen, image_token="<|image_pad|>")) == qwen + QUESTION
    # no (or an empty) image_placeholder: the image token itself; for LLaVA exactly the benchmark's historical prompt
    assert vlm.user_prompt(SimpleNamespace(image_token="<image>")) == "<image>\nWhat is the astronaut holding?"
    assert vlm.user_prompt(SimpleNamespace(image_placeholder="", image_token="<image>")) == "<image>" + QUESTION


def test_rows_are_the_budgets_then_the_unpruned_baseline(vlm) -> None:
    rows = vlm.configurations([16, 32], 100)
    assert [(r["label"], r["budget"], r["method"]) for r in rows] == [("K=16", 16, "resprune"), ("K=32", 32, "resprune"),
                                                                       ("unpruned", 100, "none")]
    assert vlm.unpruned_row(rows) is rows[-1]
    assert vlm.unpruned_row(vlm.configurations([16], None)) is None  # --no-unpruned: N is not needed
    for budgets, n in (([100], 100), ([0], None)):
        with pytest.raises(SystemExit):
            vlm.configurations(budgets, n)


def test_pixel_overrides_are_the_settings_the_artifact_changed(vlm) -> None:
    checkpoint = {"min_pixels": 3136, "max_pixels": 50176, "size": {"shortest_edge": 3136, "longest_edge": 50176}, "resample": 3}
    artifact = {**checkpoint, "min_pixels": 12544, "size": {"shortest_edge": 12544, "longest_edge": 50176}, "patch_size": 14}
    assert vlm.pixel_overrides(checkpoint, artifact) == {"min_pixels": 12544, "size": {"shortest_edge": 12544, "longest_edge": 50176}}
    assert vlm.pixel_overrides(checkpoint, dict(checkpoint)) == {}


def test_decode_positions_come_from_the_host_adapter(vlm) -> None:
    """M-RoPE: position_ids [3, B, L]; the first decode position is the host's next_position_ids, then + 1 per step."""
    calls = []

    class Session:
        def run(self, embeds, mask, positions):
            calls.append((embeds.shape, mask.shape, positions.copy()))
            return np.zeros((1, 1, 5), np.float32)

    host = SimpleNamespace(next_position_ids=lambda positions, mask: positions.max(axis=-1, keepdims=True) + 7)  # [3, B, 1]
    pipe = SimpleNamespace(artifact=SimpleNamespace(embeddings=np.zeros((5, 4), np.float32), host=host), embeds_dtype=np.dtype(np.float32),
                           manifest=SimpleNamespace(text=SimpleNamespace(max_sequence=16)))
    state = SimpleNamespace(logits=np.zeros((1, 6, 5), np.float32), session=Session(), attention_mask=np.ones((1, 6), np.int64),
                            position_ids=np.arange(18).reshape(3, 1, 6))
    vlm.ort_decode(pipe, state, 3)
    assert [c[1] for c in calls] == [(1, 7), (1, 8), (1, 9)] and all(c[0] == (1, 1, 4) for c in calls)
    assert [c[2][:, 0, 0].tolist() for c in calls] == [[12, 18, 24], [13, 19, 25], [14, 20, 26]]
    with pytest.raises(SystemExit):  # more steps than the artifact's max sequence
        vlm.ort_decode(pipe, state, 11)


def test_ratios_and_report_lines_without_an_unpruned_row(vlm) -> None:
    def ort(ttft, tok_s, vision):
        return {s: {"ttft_s": ttft, "decode_tok_s": tok_s, "vision_s": vision, "prefill_s": 0.01} for s in vlm.STATS}

    rows = [{"label": "K=16", "budget": 16, "method": "resprune", "ort": ort(0.1, 50.0, 0.05)},
            {"label": "K=32", "budget": 32, "method": "resprune", "ort": ort(0.2, 40.0, 0.06)}]
    hf = {s: {"ttft_s": 0.4, "decode_tok_s": 10.0} for s in vlm.STATS}
    vlm.add_ratios(rows, hf, {})
    assert rows[0]["vs_hf_eager"]["best"] == {"ttft": pytest.approx(4.0), "decode_tok_s": pytest.approx(5.0)}
    assert "vs_unpruned" not in rows[0] and "selection_share" not in rows[0]
    assert "HF eager (all N)" in vlm.table(rows, hf, "median")
    probes = {"min_ms": 25.0, "max_ms": 26.0, "max_over_min": 1.04}
    lines = vlm.headlines(rows, hf, {}, probes, "no unpruned row")
    assert lines[0].startswith("ONNX Runtime K=16 vs Hugging Face eager: TTFT 4.00x") and "not timed: no unpruned row" in lines[1]


@pytest.mark.parametrize("preset", ["llava-tiny", "llava-next-tiny", "qwen2.5-vl-tiny"])
def test_hf_processor_loads_from_every_tiny_checkpoint(vlm, preset: str) -> None:
    """AutoProcessor of the synthetic checkpoint (Qwen2.5-VL's without its video processor where torchvision is
    missing), the artifact's pixel settings applied; collapsed image tokens, its ids are the checkpoint tokenizer's."""
    from PIL import Image
    from tokenizers import Tokenizer

    from prunert.adapters.llava import LLAVA_PROMPT_TEMPLATE
    from prunert.adapters.llava_next import LLAVA_NEXT_PROMPT_TEMPLATE
    from prunert.adapters.qwen2_5_vl import IMAGE_PAD, IMAGE_PLACEHOLDER, QWEN_PROMPT_TEMPLATE

    template, placeholder, image_token = {"llava-tiny": (LLAVA_PROMPT_TEMPLATE, "<image>", "<image>"),
                                          "llava-next-tiny": (LLAVA_NEXT_PROMPT_TEMPLATE, "<image>", "<image>"),
                                          "qwen2.5-vl-tiny": (QWEN_PROMPT_TEMPLATE, IMAGE_PLACEHOLDER, IMAGE_PAD)}[preset]
    directory = vlm.checkpoint_dir(preset)
    checkpoint_config = json.loads((directory / "preprocessor_config.json").read_text())
    overrides = {}
    if "min_pixels" in checkpoint_config:  # as the K=16 artifact's preprocessor_config.json (fit_budget raises min_pixels)
        overrides = {"min_pixels": 12544, "size": {**checkpoint_config["size"], "shortest_edge": 12544}}
    processor, left_out = vlm.hf_processor(directory, overrides)
    assert set(left_out) <= {"video_processor"}
    text = template.format(prompt=placeholder + QUESTION)
    with Image.open(vlm.IMAGE) as image:
        ids = processor(images=image.convert("RGB"), text=text, return_tensors="pt")["input_ids"][0].tolist()
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    image_id = tokenizer.token_to_id(image_token)
    collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
    assert ids.count(image_id) > 1 and collapsed == tokenizer.encode(text).ids
    if overrides:
        size = processor.image_processor.size
        assert (size["shortest_edge"] if "shortest_edge" in size else size.shortest_edge) == 12544


@pytest.mark.slow
def test_bench_llava_runs_end_to_end_on_llava_tiny(llava, tmp_path: Path, capsys) -> None:
    out, work = tmp_path / "report.json", tmp_path / "work"
    argv = ["--preset", "llava-tiny", "--budgets", "16", "--repeats", "1", "--new-tokens", "2", "--work", str(work), "--out", str(out)]
    assert llava.main(argv) == 0
    report, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert (report["preset"], report["family"], report["architecture"]) == ("llava-tiny", "llava", "LlavaForConditionalGeneration")
    assert report["prompt"] == "<image>" + QUESTION and report["same_checkpoint"]
    k16, base = report["configurations"]
    assert (k16["label"], k16["visual_tokens"]) == ("K=16", 16)
    assert (base["label"], base["budget"], base["visual_tokens"]) == ("unpruned (N=100)", 100, 100)
    assert Path(base["artifact"]).name == "llava-tiny-none-k100" and Path(k16["artifact"]).name == "llava-tiny-resprune-k16"
    assert report["export_adapter"]["num_visual_tokens"] == 100 and report["export_adapter"]["plain_selection"]
    assert k16["ort"]["best"]["decode_tok_s"] > 0 and {"ttft", "decode_tok_s"} <= set(k16["vs_unpruned"]["median"])
    assert set(k16["selection_share"]["best"]) == {"direct", "by_difference"} and report["selection_op_skipped"] is None
    assert report["selection_op"]["16"]["shape"] == [1, 100, 64]
    hf = report["hf_eager"]
    assert hf["prompt_matches_ort"] and hf["image_tokens"] == 100 and hf["pixel_overrides"] == {} and hf["best"]["ttft_s"] > 0
    assert "TTFT ratio K=16 vs unpruned" in printed and "ORT unpruned (N=100)" in printed
    # a second run reuses both artifacts and the adapter facts (no export, no checkpoint load)
    assert llava.main(argv[:-2] + ["--out", str(tmp_path / "again.json"), "--skip-hf"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert all(row["reused"] for row in again["configurations"]) and again["export_adapter"]["reused"] and again["hf_eager"] is None
