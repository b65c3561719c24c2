"""The Qwen2.5-VL export adapter against Hugging Face itself, in torch and through ONNX Runtime:
static-shape vision graph driven by host inputs (one image per call, dynamic patch count) and the
M-RoPE decoder wrapper with a flat KV cache (batch 2, left padding, prefill + 2 decode steps).

Both graphs are exported once per module (dynamo, opset 20) and checked with check_trt."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from prunert.adapters.qwen2_5_vl import IMAGE_PAD, IMAGE_PLACEHOLDER, QWEN_PROMPT_TEMPLATE, host  # noqa: E402
from prunert.adapters.qwen2_5_vl import export as qwen_export  # noqa: E402
from prunert.adapters.qwen2_5_vl.export import QwenDecoderGraph, QwenExportAdapter, QwenVisionGraph  # noqa: E402
from prunert.adapters.qwen2_5_vl.synthetic import synthetic_checkpoint  # noqa: E402
from prunert.errors import ConfigError, ImageError  # noqa: E402
from prunert.config import ExportConfig  # noqa: E402
from prunert.export.graphs import decoder_dims, decoder_export_spec  # noqa: E402
from prunert.export.trt_check import TrtCheckConfig, check_trt, op_histogram  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
PROMPTS = [("astronaut.jpg", "Describe the picture in a few words."), ("chelsea.jpg", "Cat?")]


def _noise(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return synthetic_checkpoint("qwen2.5-vl-tiny")


@pytest.fixture(scope="module")
def adapter(model_dir: Path) -> QwenExportAdapter:
    return QwenExportAdapter(model_dir)


def _image(name: str) -> Image.Image:
    return Image.open(IMAGES / name).convert("RGB")


def _hf_tokens(adapter: QwenExportAdapter, image: Image.Image, model_dir: Path) -> torch.Tensor:
    hf = adapter.hf_image_inputs([image], model_dir)
    with torch.no_grad():
        return adapter.model.model.visual(hf["pixel_values"], grid_thw=hf["image_grid_thw"]).pooler_output  # [N, D]


# ----------------------------------------------------------------------------------- adapter basics
def test_adapter_basics(adapter: QwenExportAdapter, model_dir: Path) -> None:
    config = adapter.model.config
    assert adapter.model.config._attn_implementation == "eager" and not adapter.model.training
    assert (adapter.min_visual_tokens, adapter.max_visual_tokens) == (4, 113) == (adapter.min_visual_tokens, adapter.num_visual_tokens)
    assert adapter.embedding_table().shape == (1024, 64)
    assert adapter.text_backbone() is adapter.model.model.language_model and adapter.lm_head() is adapter.model.lm_head
    specs = adapter.vision_input_specs()
    assert [name for name, _, _ in specs] == list(adapter.vision_input_names)
    assert specs[0] == ("pixel_values", "float32", ("patches", 3 * 2 * 14 * 14))
    example = adapter.example_vision_inputs(2)
    assert [tuple(t.shape) for t in example] == [(96, 1176), (96, 16), (96, 16), (6, 16), (6, 16), (96,), (24,)]  # 8 x 12 patches, 6 windows
    info = adapter.text_info(model_dir)
    assert info["image_token"] == IMAGE_PAD and info["image_token_id"] == config.image_token_id
    assert info["bos_token_id"] is None and info["eos_token_ids"] == (config.text_config.eos_token_id,)
    assert info["prompt_template"] == QWEN_PROMPT_TEMPLATE
    family = adapter.family_config()
    assert family == {**host.family_config(json.loads((model_dir / "config.json").read_text())),
                      "min_visual_tokens": 4, "max_visual_tokens": 113, "pixel_range": {"min_pixels": 4 * 784, "max_pixels": 64 * 784}}
    ids = adapter.hf_token_ids(QWEN_PROMPT_TEMPLATE.format(prompt=IMAGE_PLACEHOLDER + "Hi"), model_dir)
    assert ids.count(info["image_token_id"]) == 1  # one placeholder; the runtime splices the K tokens
    with pytest.raises(ConfigError, match="cls_attention"):
        adapter.vision_features(*example, extras=("cls_attention",))
    with pytest.raises(ImageError, match="one image"):
        adapter.hf_vision_inputs([_image("chelsea.jpg")] * 2, model_dir)


def test_visual_token_range_bounds_what_smart_resize_produces() -> None:
    rng = np.random.default_rng(0)
    for pixels in ({"min_pixels": 3136, "max_pixels": 50176}, {}, {"min_pixels": 40000, "max_pixels": 50000}):
        cfg = host.QwenPreprocessConfig.from_hf_dict(pixels)
        low, high = qwen_export.visual_token_range(cfg)
        seen = set()
        heights = np.exp(rng.uniform(0, np.log(8000), 3000)).astype(int) + 1
        ratios = np.exp(rng.uniform(-np.log(200), np.log(200), 3000))
        sizes = [(int(h), max(1, int(h * r))) for h, r in zip(heights, ratios)] + [(20, 4000), (4000, 20), (1, 1), (9000, 9000)]
        for h, w in sizes:
            if max(h, w) / min(h, w) <= host.MAX_ASPECT_RATIO:
                hb, wb = host.smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
                seen.add(hb * wb // cfg.factor**2)
        assert low <= min(seen) and max(seen) <= high, (pixels, low, high, min(seen), max(seen))
        assert (low, high) == (min(seen), max(seen))  # tight here (the extremes are in `sizes`)


# -------------------------------------------------------------------------------- vision, in torch
def test_graph_inputs_from_host_equal_hf_processor_converted(adapter: QwenExportAdapter, model_dir: Path) -> None:
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    image = _image("chelsea.jpg")
    ours = host.vision_inputs([image], preprocessor)
    ours = qwen_export.graph_vision_inputs(ours["pixel_values"], ours["image_grid_thw"], adapter.family_config())
    ref = adapter.hf_vision_inputs([image], model_dir)
    assert list(ref) == list(adapter.vision_input_names) == list(ours)
    for name in ref:
        assert ours[name].dtype == ref[name].numpy().dtype and ours[name].shape == tuple(ref[name].shape)
        assert np.abs(ours[name] - ref[name].numpy()).max() <= 1e-6, name
    # the padded windows are HF's cu_window_seqlens: slot (w, j) of a real patch is row cu[w] + j
    meta = host.vision_metadata([[1, 12, 18]], adapter.family_config())
    cu, mask = meta["cu_window_seqlens"], ours["window_mask"]
    assert np.array_equal(mask.sum(1), np.diff(cu)) and np.array_equal(ours["window_gather"][mask == 1], np.arange(cu[-1]))
    patches, (windows, width) = len(ours["window_slots"]), mask.shape  # 216 patches in 15 windows of <= 16
    assert (patches, windows, width) == (216, 15, 16) and windows * width ** 2 < patches**2 / 10  # window-layer scores per head


@pytest.mark.parametrize("name", ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"])
def test_vision_features_match_hf_visual(adapter: QwenExportAdapter, model_dir: Path, name: str) -> None:
    image = _image(name)
    ref = _hf_tokens(adapter, image, model_dir)
    hf = adapter.hf_image_inputs([image], model_dir)
    with torch.no_grad():
        ours = adapter.vision_features(*adapter.hf_vision_inputs([image], model_dir).values())["tokens"]
        features = adapter.model.get_image_features(hf["pixel_values"], hf["image_grid_thw"]).pooler_output[0]
    grid = hf["image_grid_thw"][0]
    assert ours.shape == (1, int(grid.prod()) // 4, 64)
    assert float((ours[0] - ref).abs().max()) <= 1e-5 and float((ours[0] - features).abs().max()) <= 1e-5


# ----------------------------------------------------------------------------- decoder, in torch
def _batch(adapter: QwenExportAdapter, model_dir: Path, vision_tokens) -> dict:
    """Two prompts with one image each, left-padded; vision_tokens(image) -> [N, D] numpy."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    image_id = adapter.model.config.image_token_id
    images = [_image(name) for name, _ in PROMPTS]
    hf = adapter.hf_image_inputs(images, model_dir)
    rows = []
    for (_, prompt), grid in zip(PROMPTS, hf["image_grid_thw"]):
        ids = tokenizer(QWEN_PROMPT_TEMPLATE.format(prompt=IMAGE_PLACEHOLDER + prompt))["input_ids"]
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * (int(grid.prod()) // 4) + ids[at + 1 :])
    length = max(map(len, rows))
    input_ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
    assert mask.min() == 0  # the batch really is padded
    table = adapter.embedding_table().detach().numpy()
    embeds = table[input_ids]
    for b, image in enumerate(images):
        embeds[b, input_ids[b] == image_id] = vision_tokens(image)
    positions, deltas = host.rope_index(input_ids, hf["image_grid_thw"].numpy(), image_token_id=image_id, attention_mask=mask)
    hf_inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                 "pixel_values": hf["pixel_values"], "image_grid_thw": hf["image_grid_thw"],
                 "mm_token_type_ids": torch.from_numpy((input_ids == image_id).astype(np.int64))}
    return {"embeds": embeds.astype(np.float32), "mask": mask, "positions": positions, "deltas": deltas, "hf": hf_inputs, "table": table}


def _hf_reference(adapter: QwenExportAdapter, batch: dict) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """HF's own forward (prefill logits [B, L, V]) and greedy generate: 3 steps of logits and 3 tokens."""
    with torch.no_grad():
        prefill = adapter.model(**batch["hf"]).logits.numpy()
        out = adapter.model.generate(**batch["hf"], max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return prefill, [step.numpy() for step in out.logits], out.sequences[:, -3:].numpy()


def _our_steps(run, batch: dict, tokens: np.ndarray, dims: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prefill + 2 decode steps through `run(embeds, mask, positions, past) -> (logits, present)`, feeding HF's tokens."""
    past = [np.zeros((2, dims["num_kv_heads"], 0, dims["head_dim"]), np.float32) for _ in range(2 * dims["num_layers"])]
    mask, positions = batch["mask"], batch["positions"]
    logits, past = run(batch["embeds"], mask, positions, past)
    prefill, steps = logits, [logits[:, -1]]
    for step in range(2):
        positions = host.decode_position_ids(batch["deltas"], mask.sum(1))  # [3, B, 1]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, past = run(batch["table"][tokens[:, step]][:, None].astype(np.float32), mask, positions, past)
        steps.append(logits[:, -1])
    return prefill, steps


def _torch_runner(graph: torch.nn.Module):
    def run(embeds, mask, positions, past):
        with torch.no_grad():
            logits, *present = graph(torch.from_numpy(embeds), torch.from_numpy(mask), torch.from_numpy(positions),
                                     tuple(torch.from_numpy(p) for p in past))
        return logits.numpy(), [p.numpy() for p in present]
    return run


def _assert_logits(ours_prefill, ours_steps, ref_prefill, ref_steps, mask, atol: float) -> float:
    assert len(ours_steps) == len(ref_steps) == 3
    valid = mask.astype(bool)
    worst = float(np.abs(ours_prefill[valid] - ref_prefill[valid]).max())
    for ours, ref in zip(ours_steps, ref_steps):
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def hf_run(adapter: QwenExportAdapter, model_dir: Path):
    batch = _batch(adapter, model_dir, lambda image: _hf_tokens(adapter, image, model_dir).numpy())
    return batch, _hf_reference(adapter, batch)


def test_decoder_graph_matches_hf_generate(adapter: QwenExportAdapter, hf_run) -> None:
    batch, (ref_prefill, ref_steps, tokens) = hf_run
    graph = QwenDecoderGraph(adapter).eval()
    prefill, steps = _our_steps(_torch_runner(graph), batch, tokens, decoder_dims(adapter))
    _assert_logits(prefill, steps, ref_prefill, ref_steps, batch["mask"], 1e-4)
    assert np.array_equal(np.stack([s.argmax(-1) for s in steps[:3]], 1), tokens)
    flat = host.rope_index(batch["hf"]["input_ids"].numpy(), batch["hf"]["image_grid_thw"].numpy(), image_token_id=6)[0]
    with pytest.raises(ConfigError, match=r"\[3, B, S\]"):  # 2-D text positions are refused, not silently broadcast
        graph(torch.zeros(1, 2, 64), torch.ones(1, 2, dtype=torch.long), torch.from_numpy(flat[0, :1, :2]), ())


# ------------------------------------------------------------------------------ ONNX export + ORT
def _export(module, args, dynamic, inputs, outputs, path: Path) -> Path:
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=20, dynamic_shapes=dynamic,
                              input_names=[n for n, _, _ in inputs], output_names=[n for n, _, _ in outputs],
                              optimize=True, verbose=False)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return path


@pytest.fixture(scope="module")
def onnx_graphs(adapter: QwenExportAdapter, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("qwen-onnx")
    vision = _export(QwenVisionGraph(adapter).eval(), *qwen_export.vision_features_export_spec(adapter), out / "vision.onnx")
    dims = decoder_dims(adapter)
    decoder_spec = decoder_export_spec(dims, ExportConfig(max_batch=8), budget=1, position_leading=(3,))  # max sequence 512
    decoder = _export(QwenDecoderGraph(adapter).eval(), *decoder_spec, out / "decoder.onnx")
    return {"vision": vision, "decoder": decoder}


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _host_feeds(adapter: QwenExportAdapter, model_dir: Path, image: Image.Image) -> dict[str, np.ndarray]:
    """The deployed path: numpy preprocessing and metadata only (no HF processor, no torch)."""
    out = host.vision_inputs([image], json.loads((model_dir / "preprocessor_config.json").read_text()))
    return qwen_export.graph_vision_inputs(out["pixel_values"], out["image_grid_thw"], adapter.family_config())


def test_onnx_graphs_pass_check_trt(onnx_graphs: dict[str, Path]) -> None:
    for name, path in onnx_graphs.items():
        assert check_trt(path, TrtCheckConfig()) == [], name
        assert not {"NonZero", "Loop", "If", "Scan", "SequenceConstruct"} & set(op_histogram(path)), name
    vision_ops = op_histogram(onnx_graphs["vision"])
    assert "Split" not in vision_ops  # no cu_seqlens splits: windows padded, full layers one head at a time
    assert vision_ops["Softmax"] == 2 + 2 * 4 and vision_ops["Equal"] == 1 and vision_ops["Where"] == 1  # one key mask, built once
    session = _session(onnx_graphs["vision"])
    layout = ["windows", "window_len"]
    assert [i.shape for i in session.get_inputs()] == [["4*merged", 1176], ["4*merged", 16], ["4*merged", 16], layout, layout,
                                                       ["4*merged"], ["merged"]]
    assert session.get_outputs()[0].shape == [1, "merged", 64]
    decoder = _session(onnx_graphs["decoder"])
    assert decoder.get_inputs()[2].shape == [3, "batch", "sequence"] and decoder.get_inputs()[3].shape == ["batch", 2, "past", 16]


def test_onnx_vision_matches_hf_on_real_images(adapter: QwenExportAdapter, model_dir: Path, onnx_graphs) -> None:
    session = _session(onnx_graphs["vision"])
    # P = 256, 216 (exported with 96), and both ends of the declared range: 4 and 113 merged tokens
    images = [_image("astronaut.jpg"), _image("chelsea.jpg"), _noise(20, 20, 1), _noise(20, 4000, 2)]
    counts = []
    for image in images:
        ours = session.run(None, _host_feeds(adapter, model_dir, image))[0]
        ref = _hf_tokens(adapter, image, model_dir).numpy()
        counts.append(ref.shape[0])
        assert ours.shape == (1, *ref.shape) and np.abs(ours[0] - ref).max() <= 1e-4
    assert counts == [64, 54, 4, 113]


def test_onnx_vision_matches_hf_at_every_window_count(adapter: QwenExportAdapter, onnx_graphs) -> None:
    """The graph exported from 6 full windows runs any layout of the range: windows cut at the right / bottom edge,
    1 to 57 windows, window_len 8 and 16 (merged grids rows x cols, 2 x 2-token windows)."""
    session = _session(onnx_graphs["vision"])
    for rows, cols in [(1, 4), (2, 2), (3, 5), (5, 3), (7, 7), (1, 113), (9, 12), (2, 16)]:
        grid = np.array([[1, 2 * rows, 2 * cols]])
        pixels = np.random.default_rng(rows * cols).standard_normal((4 * rows * cols, adapter.patch_dim)).astype(np.float32)
        feeds = qwen_export.graph_vision_inputs(pixels, grid, adapter.family_config())
        ours = session.run(None, feeds)[0][0]
        with torch.no_grad():
            ref = adapter.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()  # HF, per window
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-4, (rows, cols)


def test_onnx_window_layers_attend_per_window(onnx_graphs) -> None:
    """Softmax inputs (ONNX shape inference): the two window layers' scores are [windows, heads, window_len, window_len];
    the two full-attention layers run head after head, [1, 1, P, P] each (before: all four were [1, heads, P, P])."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_graphs["vision"]), load_external_data=False))
    shapes = {info.name: [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim] for info in model.graph.value_info}
    scores = sorted(str(shapes.get(node.input[0])) for node in model.graph.node if node.op_type == "Softmax")
    assert scores == sorted([str([1, 1, "4*merged", "4*merged"])] * 8 + [str(["windows", 4, "window_len", "window_len"])] * 2), scores


def test_onnx_decoder_matches_hf_generate(adapter: QwenExportAdapter, model_dir: Path, hf_run, onnx_graphs) -> None:
    _, (ref_prefill, ref_steps, tokens) = hf_run
    vision, decoder = _session(onnx_graphs["vision"]), _session(onnx_graphs["decoder"])

    def ort_tokens(image):  # the spliced tokens come from the ONNX vision graph on host inputs too
        return vision.run(None, _host_feeds(adapter, model_dir, image))[0][0]

    batch = _batch(adapter, model_dir, ort_tokens)
    names = [i.name for i in decoder.get_inputs()]

    def run(embeds, mask, positions, past):
        logits, *present = decoder.run(None, dict(zip(names, [embeds, mask, positions, *past])))
        return logits, present

    prefill, steps = _our_steps(run, batch, tokens, decoder_dims(adapter))
    _assert_logits(prefill, steps, ref_prefill, ref_steps, batch["mask"], 1e-3)
    # batch 1 (the shorter, padded row alone, unpadded): the batch dim was not specialised
    row = batch["mask"][1].astype(bool)
    dims = decoder_dims(adapter)
    empty = [np.zeros((1, dims["num_kv_heads"], 0, dims["head_dim"]), np.float32)] * (2 * dims["num_layers"])
    single, _ = run(batch["embeds"][1:, row], batch["mask"][1:, row], np.ascontiguousarray(batch["positions"][:, 1:, row]), empty)
    assert np.abs(single[0] - ref_prefill[1, row]).max() <= 1e-3
