"""bench/bench_peers.py (prunert's decoder vs ONNX Runtime GenAI, issue 12): the Llama extraction, the floor's byte
count, the int4 settings handed to ORT-genai, and one end-to-end run on llava-tiny with ORT-genai really built by its
model builder and really generating (fp32, one round, contexts 8 and 16, 4 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peers(load_module):
    return load_module("prunert_bench_peers", REPO / "bench" / "bench_peers.py")


def test_extract_llama_keeps_the_decoder_under_llama_names(peers, tiny_artifact: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from prunert.adapters import resolve_source

    checkpoint = resolve_source("synthetic:llava-tiny").path
    out = peers.extract_llama(checkpoint, tmp_path / "llama")
    config = json.loads((out / "config.json").read_text())
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == text["hidden_size"]
    with safe_open(out / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
    assert len(names) == 3 + 9 * text["num_hidden_layers"]  # 2 norms + 7 projections per layer; no vision, no projector
    assert not any("vision" in n or "projector" in n or n.startswith("language_model.") for n in names)
    assert (out / "tokenizer.json").is_file()
    assert peers.extract_llama(checkpoint, out) == out and not (tmp_path / "llama.partial").exists()  # reused


def test_bytes_per_step_counts_weights_without_the_embedding_table_and_the_kv_cache(peers) -> None:
    from peers_genai import Int4Settings

    config = {"hidden_size": 1024, "num_hidden_layers": 24, "vocab_size": 32064, "num_attention_heads": 16,
              "num_key_value_heads": 16, "intermediate_size": 4096, "head_dim": 64}
    params = 24 * (4 * 1024 * 1024 + 3 * 1024 * 4096) + 32064 * 1024  # llava-1.5-shaped: 0.44B read per token
    fp32 = peers.bytes_per_step(config, "fp32", Int4Settings(), 104)
    assert fp32["weights"] == 4 * params + 49 * 1024 * 4  # + the norms
    assert fp32["kv_cache"] == 2 * 24 * 16 * 64 * 104 * 4
    int4 = peers.bytes_per_step(config, "int4", Int4Settings(block_size=32), 104)
    assert int4["weights"] == params / 2 + params / 32 * 4 + 49 * 1024 * 4  # nibbles + one fp32 scale per 32
    head_fp32 = peers.bytes_per_step(config, "int4", Int4Settings(quantize_lm_head=False), 104)
    assert head_fp32["weights"] - int4["weights"] == pytest.approx(32064 * 1024 * (4 - 0.5 - 4 / 32))


def test_ort_genai_gets_prunert_int4_settings(peers) -> None:
    from peers_genai import Int4Settings

    assert peers.int4_settings({}, 64) == Int4Settings(block_size=64)
    # what `prunert quantize --weights int4` records in its variant's settings (prunert.calibration.weight_only_command)
    got = peers.int4_settings({"tool": "x", "block_size": 128, "accuracy_level": 0, "lm_head": "fp32"}, 32)
    assert (got.block_size, got.accuracy_level, got.symmetric, got.quantize_lm_head) == (128, 0, True, False)
    assert got.extra_options() == ["block_size=128", "is_symmetric=true", "accuracy_level=0", "nodes_to_exclude=/lm_head/MatMul"]
    assert peers.int4_settings({"block_size": 32, "accuracy_level": 4, "lm_head": "int4"}, 64).extra_options() == [
        "block_size=32", "is_symmetric=true", "accuracy_level=4"]


def test_blocks_split_a_decoding_into_interleavable_blocks(peers) -> None:
    assert peers.blocks(32, 4) == [5, 4, 4, 4, 4, 4, 4, 4]  # step 0 rides in the first block: 33 steps in all
    assert peers.blocks(32, 5) == [6, 5, 5, 5, 5, 5, 2]
    assert peers.blocks(4, 2) == [3, 2]
    assert peers.blocks(4, 0) == peers.blocks(4, 4) == [5]  # one block


def test_step_ops_times_each_op_type_per_decode_step(peers) -> None:
    import peers_ops

    def run(ts: int, dur: int) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts: int, op: str, dur: int) -> dict:
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    # two contexts of 1 prefill + 4 steps; warm-up (2 steps) left out: steps 3 and 4 of each count
    starts = [0, 100, 200, 300, 400, 1000, 1100, 1200, 1300, 1400]
    events = [run(t, 50 if i % 5 else 90) for i, t in enumerate(starts)]
    for i, t in enumerate(starts):
        events += [node(t + 1, "MatMul", 20 if t < 1000 else 22), node(t + 30, "GroupQueryAttention", i * 1000 if i % 5 in (1, 2) else 10 + t // 1000 * 10)]
    events.append(node(2000, "MatMul", 5))  # outside every run
    got = peers_ops.step_ops(events, [8, 16], 4)
    assert got == {"8": {"step_ms": 0.05, "ops_ms": {"MatMul": 0.02, "GroupQueryAttention": 0.01}},
                   "16": {"step_ms": 0.05, "ops_ms": {"MatMul": 0.022, "GroupQueryAttention": 0.02}}}
    with pytest.raises(ValueError, match="9 model runs, expected 2 x"):
        peers_ops.step_ops(events[1:], [8, 16], 4)
    table = peers_ops.ops_table({"fp32": {"prunert": got, "ort-genai": got}}, [8, 16])
    assert "| GroupQueryAttention | 0.01 | 0.02 | 0.01 | 0.02 |" in table and "| whole step | 0.05 |" in table
    assert "MatMulNBits" not in table  # an op no column has is not a row


def test_bench_peers_runs_both_peers_end_to_end(peers, tiny_artifact: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e .[peers])")
    out = tmp_path / "peers.json"
    code = peers.main(["--preset", "llava-tiny", "--artifact", str(tiny_artifact), "--precisions", "fp32", "--contexts", "8,16",
                       "--steps", "4", "--block-steps", "2", "--rounds", "1", "--threads", "1", "--probe-gib", "0.05",
                       "--op-profile", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["threads"], report["spinning"], report["contexts"], report["precisions"]) == (1, False, [8, 16], ["fp32"])
    assert report["versions"]["onnxruntime-genai"] and report["machine"]["cores"]
    for peer in ("prunert", "ort-genai"):
        for context in ("8", "16"):
            cell = report["results"][peer]["fp32"][context]
            assert cell["decode_tok_s"]["median"] > 0 and cell["prefill_s"]["median"] > 0
            assert len(cell["tokens"]) == 5  # step 0 from the prefill's logits + 4 decoder calls
    assert report["graphs"]["prunert fp32"]["intra_op_num_threads"] == 1
    assert report["graphs"]["prunert fp32"]["allow_spinning"] == "0"
    assert report["graphs"]["ort-genai fp32"]["session_options"]["intra_op_num_threads"] == 1
    assert report["graphs"]["ort-genai fp32"]["session_options"]["session.intra_op.allow_spinning"] == "0"
    # the same weights, greedy, fp32: both peers choose the same tokens
    assert report["agreement"]["fp32"] == {"8": {"same_prefix": 5, "of": 5}, "16": {"same_prefix": 5, "of": 5}}
    assert set(report["done_when_decode"]["fp32"]) >= {"prunert_over_genai", "slowdown_first_to_last", "decode_at_least_genai"}
    assert report["floor"]["fp32"]["8"]["tok_s"] > 0 and report["bandwidth"]["gb_s"] > 0
    assert len(report["noise_probe"]["ms"]) == 2 and len(report["runs"]) == 4
    assert all(len(run["blocks_s"]) == 2 and sum(run["blocks_s"]) == pytest.approx(run["decode_s"]) for run in report["runs"])
    assert report["block_steps"] == 2 and set(report["done_when_decode"]["fp32"]["paired_median_ratio"]) == {"8", "16"}
    for peer, added in report["done_when_decode"]["fp32"]["added_ms_per_step"].items():  # median step at 16 - at 8, in ms
        tok_s = {c: report["results"][peer]["fp32"][c]["decode_tok_s"]["median"] for c in ("8", "16")}
        assert added == pytest.approx(1000 / tok_s["16"] - 1000 / tok_s["8"])
    for peer, contexts in report["op_profile"]["fp32"].items():  # ONNX Runtime's profile of each peer's own session
        assert set(contexts) == {"8", "16"}, peer
        for cell in contexts.values():
            assert cell["ops_ms"]["GroupQueryAttention"] > 0 and cell["ops_ms"]["MatMul"] > 0
            assert 0 < sum(cell["ops_ms"].values()) <= cell["step_ms"]
    printed = capsys.readouterr().out
    assert report["op_profile_markdown"] in printed and "| GroupQueryAttention |" in printed
    assert "| decode tok/s, context 16 |" in printed and "| prefill s, 8 tokens |" in printed
    assert report["table_markdown"] in printed
