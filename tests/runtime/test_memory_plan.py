"""`prunert plan`: every component on all three families, verdicts on small and large devices, one error line for bad
flags, and the CPU estimate held against the measured peak RSS of the ONNX Runtime CPU pipeline (within 15%)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from prunert.config import GraphPrecisions
from prunert.errors import ConfigError
from prunert.manifest import load_manifest
from prunert.runtime.memory_plan import GIB, PATHS, PlanConfig, devices, estimate_path, plan, resolve_device

COMPONENTS = {"tensorrt": ("runtime overhead", "weights vision", "weights decoder", "KV cache", "activations", "TensorRT workspace",
                           "embedding table"),
              "onnxruntime-cpu": ("runtime overhead", "weights vision", "weights decoder", "session load", "KV cache", "activations",
                                  "embedding table")}
RSS_TOLERANCE = 0.15  # the bar: the CPU estimate within 15% of measured peak RSS


def _export(tmp_path_factory, model: str, name: str, budget: int, **sizes) -> Path:
    from prunert.config import BudgetConfig, ExportConfig
    from prunert.export.pipeline import export_artifact

    out = tmp_path_factory.mktemp("plan") / name
    export_artifact(model, out, BudgetConfig(budget=budget), ExportConfig(**sizes), log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def family_artifacts(tiny_artifact: Path, next_tiny_artifact: Path, qwen_tiny_artifact: Path) -> dict[str, Path]:
    """The session's tiny artifact of each family (read-only)."""
    return {"llava": tiny_artifact, "llava_next": next_tiny_artifact, "qwen2_5_vl": qwen_tiny_artifact}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_plan_prints_every_component_on_every_family(family_artifacts, prunert_main, family: str) -> None:
    artifact = family_artifacts[family]
    code, out, err = prunert_main("plan", artifact, "--device", "orin-nano-8gb", "--batch", "2")
    assert code == 0, err
    assert f"({family}, " in out and "Jetson Orin Nano 8GB" in out and "https://" in out
    for graph in load_manifest(artifact, verify_hashes=False).graphs:
        assert any(line.split()[:1] == [graph] for line in out.splitlines()), (graph, out)
    for path in PATHS:
        block = out.split(f"\n{path}: ")[1].split("\n\n")[0]
        for component in COMPONENTS[path]:
            assert f"  {component}" in block, (path, component, block)
        assert "verdict: fits" in block
    code, out, _ = prunert_main("plan", artifact, "--device", "thor", "--json")
    data = json.loads(out)
    assert code == 0 and [p["path"] for p in data["paths"]] == list(PATHS)
    assert {c["precision"] for c in data["weights"] if c["graph"] == "decoder"} == {"fp32", "fp16", "bf16", "int8", "fp8", "int4"}
    assert "int4" not in {c["precision"] for c in data["weights"] if c["graph"] == "vision"}  # int4 is decoder-only


def test_weights_are_measured_for_fp32_and_estimated_below_it(tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    result = plan(tiny_artifact, manifest, PlanConfig(), resolve_device("thor"))
    cells = {(c.graph, c.precision): c for c in result.weights}
    fp32 = (tiny_artifact / "decoder.onnx").stat().st_size
    assert cells["decoder", "fp32"].measured and cells["decoder", "fp32"].bytes == fp32
    assert not cells["decoder", "fp16"].measured and cells["decoder", "fp16"].bytes == pytest.approx(fp32 / 2, rel=0.01)
    assert cells["decoder", "int8"].bytes < cells["decoder", "fp16"].bytes and cells["decoder", "int4"].bytes < cells["decoder", "int8"].bytes


def test_kv_cache_is_2_layers_b_s_heads_head_dim(tiny_artifact: Path) -> None:
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    dec = manifest.decoder  # 2 layers, 2 kv heads, head_dim 16, fp32 graph I/O
    one = 2 * dec.num_layers * 3 * 50 * dec.num_kv_heads * dec.head_dim * 4
    trt = estimate_path(tiny_artifact, manifest, PlanConfig(batch=3, max_seq=50), "tensorrt")
    assert next(c for c in trt.components if c.name == "KV cache").bytes == 2 * one  # ping-pong front and back buffers
    longer = estimate_path(tiny_artifact, manifest, PlanConfig(batch=3, max_seq=70), "tensorrt")
    assert longer.total > trt.total


@pytest.mark.parametrize("device", ["1.2", "orin-nano-8gb"])
def test_verdicts_fit_on_a_large_device_and_not_on_a_small_one(family_artifacts, prunert_main, device: str) -> None:
    artifact = family_artifacts["llava"]
    code, out, err = prunert_main("plan", artifact, "--device", device, "--batch", "8")
    assert code == 0, err
    cpu = out.split("\nonnxruntime-cpu: ")[1]
    assert "verdict: fits" in cpu  # the tiny artifact fits in 0.2 GiB (1.2 GiB less the reserve) on the CPU path
    trt = out.split("\ntensorrt: ")[1].split("\n\n")[0]
    if device == "1.2":  # 0.2 GiB usable: the GPU path's runtime alone is 1 GiB
        assert "verdict: does not fit" in trt and "nothing here fits" in trt
    else:
        assert "verdict: fits" in trt


def test_a_verdict_that_does_not_fit_names_a_shorter_sequence_that_does(tiny_artifact: Path) -> None:
    """The concrete S, B and int4 changes: each fits on its own, and S + 1 would not."""
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    config = PlanConfig(batch=8, os_reserve_bytes=0)
    full = estimate_path(tiny_artifact, manifest, config, "onnxruntime-cpu").total
    short = estimate_path(tiny_artifact, manifest, replace(config, max_seq=20), "onnxruntime-cpu").total
    device = resolve_device(f"{(full + short) / 2 / GIB:.6f}")  # between the two
    result = plan(tiny_artifact, manifest, config, device)
    cpu = dict(zip(PATHS, result.verdicts))["onnxruntime-cpu"]
    assert not cpu.fits
    seq = int(next(c for c in cpu.changes if c.startswith("lower --max-seq to ")).split()[3])
    assert 20 <= seq < manifest.text.max_sequence
    assert estimate_path(tiny_artifact, manifest, replace(config, max_seq=seq), "onnxruntime-cpu").total <= cpu.usable
    assert estimate_path(tiny_artifact, manifest, replace(config, max_seq=seq + 1), "onnxruntime-cpu").total > cpu.usable
    assert any(c.startswith("--batch ") for c in cpu.changes)


@pytest.mark.parametrize("flags, needle", [
    (["--device", "orin-nano-4gb"], "--device"), (["--device", "0"], "--device"), (["--device", "nan"], "--device"),
    (["--device", "thor", "--batch", "0"], "--batch"), (["--device", "thor", "--batch", "two"], "--batch"),
    (["--device", "thor", "--batch", "9"], "max_batch"), (["--device", "thor", "--max-seq", "-3"], "--max-seq"),
    (["--device", "thor", "--max-seq", "100000"], "max_sequence"), (["--device", "thor", "--precision", "vision=int4"], "--precision"),
])
def test_bad_flags_are_one_error_line(tiny_artifact: Path, prunert_main, error_line, flags: list[str], needle: str) -> None:
    code, out, err = prunert_main("plan", tiny_artifact, *flags)
    assert code == 2 and not out
    error_line(err, needle)


def test_plan_needs_neither_torch_nor_onnx_nor_onnxruntime(tiny_artifact: Path, python_without) -> None:
    """The plan reads the manifest and file sizes: it runs where not even ONNX Runtime is installed."""
    result = python_without("""
        from prunert.cli import main
        code = main(["plan", sys.argv[1], "--device", "orin-nx-16gb", "--json"])
        assert_no_heavy_modules()
        assert code == 0
        """, tiny_artifact, blocked=("torch", "transformers", "onnx", "onnxruntime"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"]["name"] == "orin-nx-16gb"


def test_the_device_table_names_a_source_per_row() -> None:
    table = devices()
    assert {name: d.memory_bytes // GIB for name, d in table.items()} == {"orin-nano-8gb": 8, "orin-nx-16gb": 16, "agx-orin-64gb": 64,
                                                                          "thor": 128}
    assert all("https://" in d.source and "LPDDR" in d.memory for d in table.values())
    assert resolve_device("12.5").memory_bytes == int(12.5 * GIB)
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("inf")


def test_per_graph_precision_plans_each_role_at_its_own(tiny_artifact: Path, prunert_main) -> None:
    code, out, err = prunert_main("plan", tiny_artifact, "--device", "thor", "--precision", "vision=fp16,decoder=int4")
    assert code == 0, err
    assert "weights vision (fp16)" in out and "weights decoder (int4)" in out
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    mixed = estimate_path(tiny_artifact, manifest, PlanConfig(precisions=GraphPrecisions.parse("vision=fp16,decoder=int4")), "tensorrt")
    assert mixed.total < estimate_path(tiny_artifact, manifest, PlanConfig(), "tensorrt").total


# ---- the CPU estimate against measured peak RSS ----------------------------------------------------------------------
# A decoder large enough that weights, KV cache and logits outweigh the process's fixed ~80 MB (tiny artifacts are all
# overhead): 23M parameters (92 MB fp32), vocabulary 8192, S up to 543. Exported once here (~30 s).
MID = dict(vision_hidden=128, vision_layers=3, vision_heads=4, vision_intermediate=512, image_size=224, patch_size=14,
           text_hidden=512, text_layers=6, text_heads=8, text_kv_heads=4, text_head_dim=64, text_intermediate=1536,
           vocab_size=8192, max_position_embeddings=2048, seed=0, description="memory-plan test: a mid-size LLaVA decoder")

# The child: the ONNX Runtime CPU pipeline at batch B up to total sequence S (the longest prompt the artifact accepts whose
# prefill fits in S, as the plan assumes, then decode steps without EOS), torch blocked; prints its peak RSS in bytes:
# VmHWM, the high-water mark of the child's own memory. Not ru_maxrss: Linux carries the parent's RSS at fork into it
# across exec (this pytest process, torch loaded, is ~1.2 GB), so a child's ru_maxrss is never below its parent's.
PROBE = """
import json
import numpy as np
from PIL import Image
from prunert.runtime import VLMPipeline
from prunert.runtime.decode import decode_steps, table_embedder

artifact, batch, seq, precision = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = VLMPipeline(artifact, precision=precision)
text, rng = pipe.manifest.text, np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
from prunert.errors import PromptError
words = 0
while words < text.max_prompt_tokens:  # the longest prompt the artifact accepts
    try:
        ids = pipe.tokenize([text.placeholder + " red" * (words + 1)])[0]
    except PromptError:
        break
    if len(ids) - 1 + pipe.manifest.budget.budget > seq:  # the prefill (K visual tokens for the placeholder) within S
        break
    words += 1
prompts = [text.placeholder + " red" * words] * batch
state = pipe.prefill(pipe.tokenize(prompts), pipe.encode_images(images, prompts))
length = state.attention_mask.shape[1]
positions = pipe.artifact.host.next_position_ids(state.position_ids, state.attention_mask)
steps = max(1, seq - length + 1)
for step in decode_steps(state.session, state.logits[:, -1], state.attention_mask, positions, table_embedder(pipe.artifact.embeddings), steps=steps):
    pass
assert_no_heavy_modules()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # "VmHWM:  123456 kB"
print(json.dumps({"peak": int(hwm.split()[1]) * 1024, "prefill": length, "seq": length + steps - 1}))
"""


@pytest.fixture(scope="module")
def mid_artifact(tmp_path_factory) -> Path:
    from prunert.adapters.llava import synthetic

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(synthetic.PRESETS, "llava-plan-mid", synthetic.SyntheticPreset(**MID))
        return _export(tmp_path_factory, "synthetic:llava-plan-mid", "mid", 32, max_prompt_tokens=256, max_new_tokens=256)


@pytest.fixture(scope="module")
def mid_standard(mid_artifact: Path, tmp_path_factory, edit_manifest) -> Path:
    """The mid artifact without its fused decoder (as exported before it existed): the CPU runs the standard one."""
    from prunert.config import FUSED_DECODER

    copy = tmp_path_factory.mktemp("plan") / "mid-standard"
    shutil.copytree(mid_artifact, copy)
    fused = load_manifest(copy, verify_hashes=False).graphs[FUSED_DECODER]
    files = [fused.file] + ([fused.external_data] if fused.external_data else [])

    def drop(data: dict) -> None:
        del data["graphs"][FUSED_DECODER]
        for name in files:
            del data["files"][name]

    edit_manifest(copy, drop)
    for name in files:
        (copy / name).unlink()
    return copy


@pytest.fixture(scope="module")
def mid_int4(mid_artifact: Path, tmp_path_factory) -> Path:
    """The mid artifact with its int4 variant (`prunert quantize --weights int4`, RTN: seconds)."""
    from prunert import cli

    copy = tmp_path_factory.mktemp("plan") / "mid-int4"
    shutil.copytree(mid_artifact, copy)
    assert cli.main(["quantize", str(copy), "--weights", "int4", "--max-samples", "2"]) == 0
    return copy


def measure_peak_rss(python_without, artifact: Path, batch: int, seq: int, precision: str = "fp32") -> dict:
    result = python_without(PROBE, artifact, batch, seq, precision)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize("form", ["fused", "standard", "int4"])
@pytest.mark.parametrize("batch, seq", [(1, 80), (4, 543), (8, 400)])
def test_cpu_estimate_is_within_15_percent_of_measured_peak_rss(request, python_without, form: str, batch: int, seq: int) -> None:
    """Both decoder forms the CPU runs, the fused one (KV preallocated at S) and the standard one (past + present), and
    the fused one at int4 (MatMulNBits; measured -7..-8% here, the lowest of the three)."""
    artifact = request.getfixturevalue({"fused": "mid_artifact", "standard": "mid_standard", "int4": "mid_int4"}[form])
    precision = "int4" if form == "int4" else "fp32"
    manifest = load_manifest(artifact, verify_hashes=False)
    measured = measure_peak_rss(python_without, artifact, batch, seq, precision)
    assert measured["seq"] == seq  # the probe reached S
    estimate = estimate_path(artifact, manifest, PlanConfig(batch=batch, max_seq=seq, precisions=GraphPrecisions.parse(precision)),
                             "onnxruntime-cpu")
    graph = "decoder" if form == "standard" else "decoder_fused"
    assert any(c.name == f"weights {graph} ({precision})" for c in estimate.components), estimate.components
    overhead = next(c for c in estimate.components if c.name == "runtime overhead").bytes
    if batch > 1:  # there the weights, KV cache and activations carry the estimate, not the process constant
        assert overhead < 0.6 * estimate.total
    assert abs(estimate.total - measured["peak"]) <= RSS_TOLERANCE * measured["peak"], (estimate.total, measured)
