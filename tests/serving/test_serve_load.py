"""Load on a real `prunert serve` subprocess (the tiny artifact, loopback): 64 concurrent streaming clients send 500
requests. 0 errors; every answer equals the same request run alone through VLMPipeline (greedy, and sampled with the
same seed): batching does not change tokens; after the first WARMUP, the server's RSS (sampled every 50 ms) trends up
by less than 10% over the rest of the run (a fitted line: one idle sample swings +-10% with Python's GC and malloc's
arenas, a leak is a slope). TTFT p50/p99 and throughput go to
bench/results/serve_load.json."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "serve_load.json"
CLIENTS, REQUESTS, WARMUP = 64, 500, 150
BUDGETS = (6, 11, 16)
SAMPLED = {"temperature": 0.9}
TIMEOUT = 120


def request_of(i: int) -> tuple[int, int, dict]:
    """Request i -> (chat_body row, max_tokens, sampling fields): 12 image/question pairs x 3 budgets, every 5th sampled."""
    if i % 5 == 0:
        return i % 12, 16, {**SAMPLED, "seed": 1 + (i // 5) % 2}
    return i % 12, BUDGETS[(i // 12) % 3], {}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    ttft, pieces, finish, usage = None, [], None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            choice = (data.get("choices") or [{}])[0]
            piece = choice.get("delta", {}).get("content")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces.append(piece)
            finish = choice.get("finish_reason") or finish
    return {"status": 200, "text": "".join(pieces), "finish": finish, "ttft": ttft, "tokens": (usage or {}).get("completion_tokens", 0)}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc")
def test_64_clients_500_requests(serve_subprocess, chat_body, alone) -> None:
    server = serve_subprocess("--max-queue", str(CLIENTS), "--drain-s", "5")
    bodies = []
    for i in range(REQUESTS):
        row, budget, fields = request_of(i)
        bodies.append(chat_body(row=row, max_tokens=budget, stream=True, stream_options={"include_usage": True}, **fields))
    results: list[dict] = [{}] * REQUESTS
    samples: list[tuple[int, int]] = []  # (requests finished, the server's RSS), every 50 ms

    async def main() -> float:
        todo = list(reversed(range(REQUESTS)))

        async def client() -> None:  # a connection each
            async with httpx.AsyncClient(timeout=TIMEOUT) as connection:
                while todo:
                    i = todo.pop()
                    results[i] = await _stream(connection, server.url, bodies[i])

        async def sample() -> None:
            while True:
                samples.append((sum(1 for r in results if r), rss_bytes(server.process.pid)))
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        wall = time.perf_counter() - start
        sampler.cancel()
        return wall

    wall = asyncio.run(asyncio.wait_for(main(), 4 * TIMEOUT))
    code, stderr = server.stop(signal.SIGTERM)
    assert code == 0, stderr

    errors: dict[str, int] = {}
    for result in results:
        if result.get("status") != 200 or result["finish"] not in ("stop", "length"):
            key = str(result.get("status") if result.get("status") != 200 else result["finish"])
            errors[key] = errors.get(key, 0) + 1
    mismatched = [i for i, result in enumerate(results) if result.get("status") == 200
                  and result["text"] != alone(request_of(i)[0], request_of(i)[1], **_sampling(request_of(i)[2]))]
    ttfts = np.asarray([r["ttft"] for r in results if r.get("status") == 200 and r["ttft"] is not None])
    tokens = sum(r.get("tokens", 0) for r in results)
    counts, sizes = np.asarray([c for c, _ in samples if c >= WARMUP]), np.asarray([b for c, b in samples if c >= WARMUP], float)
    growth = float(np.polyfit(counts, sizes, 1)[0]) * (REQUESTS - WARMUP)  # the fitted trend over the rest of the run
    level = float(np.median(sizes))
    record = {
        "what": "prunert serve, synthetic:llava-tiny (K=16 of N=100), onnxruntime CPU fp32, default --max-batch (8); "
                "64 streaming clients on loopback, a connection each; tests/serving/test_serve_load.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "clients": CLIENTS, "requests": REQUESTS, "max_tokens": list(BUDGETS), "sampled_every": 5,
        "errors_by_code": errors, "answers_equal_to_alone": REQUESTS - len(mismatched) - sum(errors.values()),
        "ttft_s": {"p50": round(float(np.percentile(ttfts, 50)), 4), "p99": round(float(np.percentile(ttfts, 99)), 4)},
        "wall_s": round(wall, 2), "requests_per_s": round(REQUESTS / wall, 1),
        "completion_tokens": tokens, "completion_tokens_per_s": round(tokens / wall, 1),
        "rss_mb": {"median_after_warmup": round(level / 2**20, 1), "fitted_growth_after_warmup": round(growth / 2**20, 1),
                   "peak": round(max(b for _, b in samples) / 2**20, 1), "samples_after_warmup": len(sizes),
                   "warmup_requests": WARMUP},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    assert not errors, errors
    assert not mismatched, [(i, results[i]["text"]) for i in mismatched[:5]]
    assert len(sizes) >= 10 and growth <= 0.10 * level, record["rss_mb"]


def _sampling(fields: dict) -> dict:
    return {"temperature": fields["temperature"], "seed": fields["seed"]} if fields else {}
