"""Serving throughput: `prunert serve` (continuous batching) at 1, 4 and 16 concurrent streaming clients, against the
same requests run one by one through VLMPipeline.generate (what `prunert run` per request does) (issue 13).

Each round runs every mode once, in a rotated order: `sequential` (in this process, batch 1, no server) and `serve cN`
(N clients over HTTP to one server process, each client sending its share of the R requests back to back). The
server and this process never compute at the same time. Per mode: completion tokens / wall time, requests / s,
client-side TTFT (request sent -> first content chunk) p50 / p99, and the server's RSS after each mode. A fixed
matmul between rounds shows the machine's noise. Greedy decoding: every mode produces the same tokens (checked).
Weights are synthetic (seeded random): speed only.

    python bench/bench_serve.py --threads 2                       # llava-1.5-shaped K=64, R=16 requests, 32 tokens
    python bench/bench_serve.py --threads 2 --preset llava-tiny --requests 8 --max-tokens 8 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_peers import EXPORT_SOURCES, export_unchanged, git  # noqa: E402
from bench_vlm import artifact_matches, checkpoint_dir, export_record, log, machine, speed_probe, versions  # noqa: E402

STATEMENT = "weights are synthetic (seeded random): only speed is measured, not accuracy"
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))
QUESTIONS = ("What is in the picture?", "Describe the colours you see.", "What is on the left?", "Is it day or night?",
             "How many objects are there?", "What is the main subject doing?", "Describe the background.", "Any text?")
BUDGET, MAX_BATCH = 64, 16  # the exported artifact: K, and rows it may decode at once (the most clients measured)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-shaped", help="synthetic LLaVA preset (default: %(default)s)")
    p.add_argument("--artifact", type=Path, help="an exported artifact to serve (default: export the preset into --work)")
    p.add_argument("--precision", default="fp32", help="--precision of the server and the sequential pipeline (default: %(default)s)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per serve mode (default: %(default)s)")
    p.add_argument("--requests", type=int, default=16, help="requests per mode, R (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every mode (default: %(default)s)")
    p.add_argument("--threads", type=int, required=True, help="intra-op threads of the server's and the pipeline's sessions")
    p.add_argument("--work", type=Path, default=ROOT / "bench/results/serve", help="the exported artifact (cached)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/bench_serve.json", help="JSON report")
    args = p.parse_args(argv)
    args.clients = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    if not args.clients or args.clients[0] < 1 or min(args.requests, args.max_tokens, args.rounds, args.threads) < 1:
        p.error("--clients, --requests, --max-tokens, --rounds and --threads must be >= 1")
    return args


def exported(args: argparse.Namespace) -> Path:
    """--artifact, or the preset exported into --work with K=64 and max_batch 16 (reused while the checkpoint and the
    export code are unchanged)."""
    if args.artifact:
        return args.artifact
    directory, checkpoint = args.work / f"{args.preset}-k{BUDGET}-b{MAX_BATCH}", checkpoint_dir(args.preset).name
    record = export_record(directory)
    if artifact_matches(directory, args.preset, BUDGET, "resprune", checkpoint) and export_unchanged(
            json.loads(record.read_text()).get("git_commit")):
        log(f"prunert: reusing {directory}")
        return directory
    command = [sys.executable, "-m", "prunert", "export", "--model", f"synthetic:{args.preset}", "--budget", str(BUDGET),
               "--max-batch", str(MAX_BATCH), "--out", str(directory), "--overwrite"]
    log(f"prunert: exporting {directory}")
    clean = not git("status", "--porcelain", "--", *EXPORT_SOURCES).stdout.strip()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bench: error: prunert export failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    commit = git("rev-parse", "HEAD").stdout.strip() if clean else None
    record.write_text(json.dumps({"checkpoint": checkpoint, "git_commit": commit, "command": command[2:]}) + "\n")
    return directory


def requests(count: int) -> list[tuple[Path, str]]:
    return [(IMAGES[i % len(IMAGES)], QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]


def data_uri(image: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()


# ---- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, artifact: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "prunert", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port),
               "--precision", args.precision, "--threads", str(args.threads), "--max-batch", str(max_batch),
               "--max-queue", str(4 * args.requests)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"bench: error: prunert serve exited {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("bench: error: prunert serve did not answer /health within 300 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(client, base: str, image: Path, question: str, max_tokens: int) -> dict:
    """A streaming chat completion -> its text, TTFT (first content chunk) and completion tokens (usage)."""
    body = {"model": "prunert", "stream": True, "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                                      {"type": "text", "text": question}]}]}
    start, first, text, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise SystemExit(f"bench: error: HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    done = time.perf_counter()
    return {"text": "".join(text), "ttft_s": (first or done) - start, "tokens": (usage or {}).get("completion_tokens", 0)}


async def serve_mode(base: str, work: list[tuple[Path, str]], clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for index, item in enumerate(work):
        queue.put_nowait((index, item))
    results: list[dict | None] = [None] * len(work)

    async def client_loop(client) -> None:
        while not queue.empty():
            index, (image, question) = queue.get_nowait()
            results[index] = await one_request(client, base, image, question, max_tokens)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start, results  # type: ignore[return-value]


def sequential_mode(pipe, work: list[tuple[Path, str]], max_tokens: int) -> tuple[float, list[dict]]:
    from prunert.config import GenerationConfig

    config, results = GenerationConfig(max_new_tokens=max_tokens), []
    start = time.perf_counter()
    for image, question in work:
        begin, first = time.perf_counter(), []
        prompt = pipe.chat_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])
        (answer,) = pipe.generate([image], [prompt], config, on_token=lambda row, token, text: first or first.append(time.perf_counter()))
        results.append({"text": answer.text, "ttft_s": first[0] - begin, "tokens": len(answer.token_ids)})
    return time.perf_counter() - start, results


def summary(wall: float, results: list[dict]) -> dict:
    ttft = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]}


def measure(args: argparse.Namespace, artifact: Path) -> tuple[dict, list[float], dict]:
    from prunert.config import RuntimeConfig
    from prunert.runtime import VLMPipeline

    work = requests(args.requests)
    modes = ["sequential", *[f"serve c{c}" for c in args.clients]]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    probes, answers = [], {}
    server, base = start_server(args, artifact, max(args.clients))
    try:
        pipe = VLMPipeline(artifact, precision=args.precision, runtime=RuntimeConfig(threads=args.threads))
        for r in range(args.rounds):
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                if mode == "sequential":
                    wall, results = sequential_mode(pipe, work, args.max_tokens)
                else:
                    wall, results = asyncio.run(serve_mode(base, work, int(mode.split("c")[1]), args.max_tokens))
                runs[mode].append({**summary(wall, results), "server_rss_mb": rss_mb(server.pid)})
                answers.setdefault(mode, [x["text"] for x in results])
                log(f"round {r + 1}/{args.rounds} {mode:>10}: {runs[mode][-1]['tokens_per_s']:.1f} tok/s, "
                    f"TTFT p50 {runs[mode][-1]['ttft_p50_s']:.2f} s, server RSS {runs[mode][-1]['server_rss_mb']:.0f} MB")
            probes.append(speed_probe())
    finally:
        server.terminate()
        server.wait(timeout=60)
    same = {mode: answers[mode] == answers["sequential"] for mode in modes}
    return runs, probes, same


def report_rows(runs: dict) -> dict:
    base = statistics.median(r["tokens_per_s"] for r in runs["sequential"])
    rows = {}
    for mode, rounds in runs.items():
        tokens = [r["tokens_per_s"] for r in rounds]
        rows[mode] = {"tokens_per_s_median": statistics.median(tokens), "tokens_per_s_min": min(tokens), "tokens_per_s_max": max(tokens),
                      "vs_sequential": statistics.median(tokens) / base,
                      "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in rounds),
                      "ttft_p99_s": statistics.median(r["ttft_p99_s"] for r in rounds),
                      "server_rss_mb": [r["server_rss_mb"] for r in rounds]}
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    log(STATEMENT)
    artifact = exported(args)
    runs, probes, same = measure(args, artifact)
    rows = report_rows(runs)
    print("\n| mode | tok/s median (min–max) | × sequential | TTFT p50 / p99 s |\n|---|---|---|---|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['tokens_per_s_median']:.1f} ({row['tokens_per_s_min']:.1f}–{row['tokens_per_s_max']:.1f}) | "
              f"{row['vs_sequential']:.2f} | {row['ttft_p50_s']:.2f} / {row['ttft_p99_s']:.2f} |")
    print(f"noise probe {min(probes):.1f}–{max(probes):.1f} ms (max/min {max(probes) / min(probes):.2f}); same answers: {same}")
    report = {"statement": STATEMENT, "machine": machine(), "versions": versions(), "artifact": str(artifact),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "rounds": runs, "noise_probe_ms": probes, "same_answers": same,
              "load_average": os.getloadavg(), "elapsed_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
