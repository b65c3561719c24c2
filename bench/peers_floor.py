"""The floor row of bench/bench_peers.py: the machine's read bandwidth and the bytes one decode step must read.

floor tok/s = bandwidth / bytes per step: no decoder that reads its weights and KV cache once per token can be faster.
"""

from __future__ import annotations

import time

import numpy as np

from peers_genai import Int4Settings


def bandwidth_probe(threads: int, gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth of a large float32 array (np.max over `threads` slices in parallel, best of `repeats`), GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    array = np.ones(int(gib * 2**30) // 4, np.float32)
    parts, times = np.array_split(array, threads), []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))  # fault the pages in
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            times.append(time.perf_counter() - start)
    return {"gb_s": array.nbytes / min(times) / 1e9, "bytes": array.nbytes, "threads": threads, "runs_s": times}


def bytes_per_step(text_config: dict, precision: str, int4: Int4Settings, context: int) -> dict:
    """Bytes one decode step must read: every decoder weight but the embedding table (one row is gathered), fp32 or
    int4 (packed nibbles + an fp32 scale per block, + a zero point per block when asymmetric), and the fp32 KV cache."""
    d, layers, vocab = text_config["hidden_size"], text_config["num_hidden_layers"], text_config["vocab_size"]
    heads, kv_heads, inter = text_config["num_attention_heads"], text_config["num_key_value_heads"], text_config["intermediate_size"]
    head_dim = text_config.get("head_dim") or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    body, head, norms = layers * per_layer, vocab * d, (2 * layers + 1) * d * 4

    def weight_bytes(n: int, quantized: bool) -> float:
        if not quantized:
            return 4.0 * n
        return n / 2 + n / int4.block_size * (4 + (0 if int4.symmetric else 0.5))

    weights = weight_bytes(body, precision == "int4") + weight_bytes(head, precision == "int4" and int4.quantize_lm_head) + norms
    kv = 2 * layers * kv_heads * head_dim * context * 4
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}
