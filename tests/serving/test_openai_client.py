"""`prunert serve`'s HTTP server with the official `openai` client: chat completions streamed and not, an image as a
data URI, the answers equal to the same request run alone through VLMPipeline; /v1/models, /health, /metrics."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

TIMEOUT = 60


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as made:
        yield made


def test_non_streaming_answer_equals_the_pipeline(client, chat_body, alone, tiny_artifact) -> None:
    body = chat_body(row=1)
    response = client.chat.completions.create(model=body["model"], messages=body["messages"], max_tokens=9)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == alone(1, 9)
    assert choice.finish_reason in ("stop", "length") and choice.index == 0
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == tiny_artifact.name
    usage = response.usage
    assert 1 <= usage.completion_tokens <= 9 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["visual_tokens"] == {"kept": 16, "total": 100}  # K of N, counted in prompt_tokens
    assert usage.prompt_tokens > 16


def test_streaming_answer_equals_the_pipeline(client, chat_body, alone) -> None:
    body = chat_body(row=2)
    stream = client.chat.completions.create(model="tiny", messages=body["messages"], max_completion_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone(2, 12)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1  # include_usage: the last chunk
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_has_no_usage_unless_asked(server, chat_body) -> None:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat_body(row=0, max_tokens=4, stream=True),
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(lines)


def test_sampling_seed_reproduces_and_a_fresh_seed_is_drawn(server, chat_body, alone) -> None:
    """temperature > 0: a given seed answers as the pipeline does with it; without one, each request draws its own."""
    post = lambda **fields: httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(row=3, max_tokens=10, **fields),
                                       timeout=TIMEOUT)
    seeded = post(temperature=1.5, seed=1234)
    assert seeded.status_code == 200 and seeded.headers["x-prunert-seed"] == "1234"
    assert seeded.json()["choices"][0]["message"]["content"] == alone(3, 10, temperature=1.5, seed=1234)
    drawn = {post(temperature=1.5).headers["x-prunert-seed"] for _ in range(3)}
    assert len(drawn) == 3, drawn
    assert post().headers["x-prunert-seed"] == "0"  # greedy: no seed needed


def test_stop_strings_end_the_answer_before_them(client, chat_body, alone) -> None:
    full = alone(0, 16)
    stop = full[len(full) // 2 :][:3]
    assert stop.strip() and full.index(stop) > 0, f"the tiny model's answer {full!r} has no text to stop on"
    response = client.chat.completions.create(model="tiny", messages=chat_body(row=0)["messages"], max_tokens=16, stop=[stop])
    assert response.choices[0].message.content == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(client, server, chat_body) -> None:
    (model,) = client.models.list().data
    extra = model.model_extra
    assert (extra["family"], extra["method"], extra["K"], extra["N"], extra["precision"]) == ("llava", "resprune", 16, 100, "fp32")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["status"] == "ok"
    httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "nope"}, timeout=TIMEOUT)  # one 400
    metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT)
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    for name in ("prunert_requests_total", "prunert_queue_depth", "prunert_batch_size_bucket", "prunert_time_to_first_token_seconds_bucket",
                 "prunert_decode_tokens_per_second_bucket", 'prunert_http_errors_total{code="400"}'):
        assert name in text, name
