"""Malformed and hostile requests against the real server (raw httpx): each an OpenAI-shaped 4xx that names what was
wrong, never a 500, and the server answers normally afterwards. Bounded in count and time, loopback only."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from prunert.runtime.image import MAX_IMAGE_PIXELS
from prunert.serving.config import EngineConfig, HttpConfig

TIMEOUT = 60
CLIENTS = 100  # the 1,000-request test's clients at once
TESTS = Path(__file__).resolve().parents[1]
PHOTO = TESTS.parent / "examples" / "images" / "astronaut.jpg"  # chat_body's row 0


def post(server, body, **kwargs) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, dict) else body  # bytes, or an iterator of them (chunked)
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"}, **kwargs)


def refused(response: httpx.Response, status: int, *needles: str) -> dict:
    """An OpenAI-shaped error with `status`, its message holding every needle."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    for needle in needles:
        assert needle in error["message"], error
    return error


def still_answers(server, chat_body) -> None:
    response = post(server, chat_body(row=0, max_tokens=2))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def png_bomb(load_module):
    return load_module("prunert_tests_runtime_image", TESTS / "runtime" / "test_image.py").png_bomb


# ---- request shape ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, needle",
    [(b"{not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"), (b"[1, 2]", "expected an object"), (b"", "not valid JSON")],
    ids=["malformed", "not-utf8", "array", "empty"],
)
def test_malformed_bodies(server, chat_body, raw, needle) -> None:
    refused(post(server, raw), 400, needle)
    still_answers(server, chat_body)


def test_stream_given_as_a_string(server, chat_body) -> None:
    error = refused(post(server, chat_body(stream="true")), 400, "stream", "expected true or false")
    assert error["param"] == "stream"


@pytest.mark.parametrize(
    "fields, needle, param",
    [
        ({"temperature": "hot"}, "expected a number", "temperature"),
        ({"temperature": -1}, "temperature", "temperature"),
        ({"top_p": 0}, "top_p", "top_p"),
        ({"max_tokens": 0}, "max_tokens: got 0", "max_tokens"),
        ({"max_completion_tokens": 2.5}, "expected an integer", "max_completion_tokens"),
        ({"seed": -3}, "seed", "seed"),
        ({"seed": True}, "expected an integer", "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4", "stop"),
        ({"stream_options": {"include_usage": "yes"}}, "include_usage", "stream_options.include_usage"),
        ({"messages": []}, "non-empty array", "messages"),
        ({"messages": "hi"}, "non-empty array", "messages"),
    ],
    ids=["temperature-type", "temperature-range", "top-p", "max-tokens", "max-completion-float", "seed-negative", "seed-bool",
         "stop-count", "stream-options", "no-messages", "messages-string"],
)
def test_bad_fields(server, chat_body, fields, needle, param) -> None:
    assert refused(post(server, chat_body(**fields)), 400, needle)["param"] == param


@pytest.mark.parametrize(
    "fields, named",
    [({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"logprobs": True}, "logprobs"),
     ({"response_format": {"type": "json_object"}}, "response_format"), ({"presence_penalty": 0.5, "n": 3}, "n, presence_penalty")],
    ids=["n", "tools", "logprobs", "response-format", "two"],
)
def test_known_unsupported_fields_are_named(server, chat_body, fields, named) -> None:
    refused(post(server, chat_body(**fields)), 400, f": {named} (")


def test_unknown_fields_and_no_op_values_are_accepted(server, chat_body) -> None:
    body = chat_body(max_tokens=2, n=1, logprobs=False, tools=[], presence_penalty=0.0, user="someone", metadata={"a": 1},
                     some_future_field=[1, 2])
    assert post(server, body).status_code == 200


def test_roles_parts_and_prompt_length(server, chat_body, data_uri) -> None:
    body = chat_body()
    body["messages"][0]["role"] = "tool"
    refused(post(server, body), 400, "role 'tool'")
    body = chat_body()
    body["messages"][0]["content"].append({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})
    assert refused(post(server, body), 400, '"input_audio" is not supported')["param"] == "messages[0].content[2]"
    body = chat_body()
    body["messages"][0]["content"][1]["text"] = "word " * 200  # the tiny artifact takes 48 prompt tokens
    refused(post(server, body), 400, "expected at most 48")


def test_no_image_and_two_images(server, chat_body) -> None:
    body = chat_body()
    body["messages"][0]["content"] = "just text"
    assert refused(post(server, body), 400, "0 images, expected exactly one")["code"] == "image_count"
    body = chat_body()
    body["messages"][0]["content"].append(body["messages"][0]["content"][0])
    refused(post(server, body), 400, "2 images, expected exactly one")


# ---- images ------------------------------------------------------------------------------------------------------------
def test_network_urls_are_never_fetched(server, chat_body) -> None:
    for url in ("http://127.0.0.1:9/cat.jpg", "https://example.com/cat.png"):
        error = refused(post(server, chat_body(url=url)), 400, "no network fetches")
        assert error["code"] == "network_url_refused" and error["param"] == "messages[0].content[0].image_url"


def test_png_decompression_bomb(server, chat_body, data_uri, png_bomb) -> None:
    bomb = png_bomb(8193, 8193)  # 67 M pixels in ~70 KB
    refused(post(server, chat_body(url=data_uri(bomb, "image/png"))), 400, f"at most {MAX_IMAGE_PIXELS:,} pixels")
    huge = png_bomb(100_000, 100_000, complete=False)  # Pillow's own bomb check fires first
    refused(post(server, chat_body(url=data_uri(huge, "image/png"))), 400, "decompression bomb")
    still_answers(server, chat_body)


def test_truncated_base64(server, chat_body, data_uri) -> None:
    noise = Image.frombytes("RGB", (64, 64), np.random.default_rng(0).integers(0, 256, 64 * 64 * 3, np.uint8).tobytes())
    uri = data_uri(_png(noise), "image/png")  # ~12 KB: incompressible
    refused(post(server, chat_body(url=uri[:-3])), 400, "base64 is invalid or truncated")
    cut = uri[: len("data:image/png;base64,") + 400]  # whole base64 quanta: the PNG's header, then its data cut
    refused(post(server, chat_body(url=cut)), 400, "could not be read")


def test_non_image_data_uris(server, chat_body) -> None:
    text = base64.b64encode(b"hello, not a picture").decode()
    refused(post(server, chat_body(url=f"data:text/plain;base64,{text}")), 400, "expected data:image/...;base64")
    refused(post(server, chat_body(url=f"data:image/png;base64,{text}")), 400, "not a recognised image")
    refused(post(server, chat_body(url="data:image/png,rawbytes")), 400, "not base64")


def test_grayscale_and_transparent_images_are_answered(server, chat_body, data_uri) -> None:
    for image in (Image.new("L", (64, 64), 90), Image.new("RGBA", (64, 64), (10, 200, 30, 100))):
        assert post(server, chat_body(url=data_uri(_png(image), "image/png"), max_tokens=2)).status_code == 200


def test_local_paths_only_under_allow_image_dir(server, start_server, chat_body, alone, tmp_path) -> None:
    allowed, outside = tmp_path / "images", tmp_path / "private"
    allowed.mkdir(), outside.mkdir()
    (allowed / "photo.jpg").write_bytes(PHOTO.read_bytes())
    (outside / "secret.jpg").write_bytes(PHOTO.read_bytes())
    (allowed / "link.jpg").symlink_to(outside / "secret.jpg")
    refused(post(server, chat_body(url=str(allowed / "photo.jpg"))), 400, "without --allow-image-dir")
    local = start_server(http_config=HttpConfig(port=0, allow_image_dir=allowed))
    for url in (str(allowed / "photo.jpg"), (allowed / "photo.jpg").as_uri(), "photo.jpg"):
        answer = post(local, chat_body(row=0, url=url, max_tokens=5))
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == alone(0, 5)
    for url in (str(outside / "secret.jpg"), "../private/secret.jpg", "link.jpg", (outside / "secret.jpg").as_uri()):
        refused(post(local, chat_body(url=url)), 400, "outside --allow-image-dir")
    refused(post(local, chat_body(url="missing.jpg")), 400, "no such image file")


# ---- size, routes ------------------------------------------------------------------------------------------------------
def test_a_50_mb_body_is_413(server, chat_body) -> None:
    body = json.dumps(chat_body(padding="x" * (50 << 20))).encode()
    assert len(body) > 50 << 20
    error = refused(post(server, body), 413, "over this server's --max-body-mb 20")
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    refused(post(server, chunks()), 413, "--max-body-mb")
    still_answers(server, chat_body)


def test_unknown_routes_and_methods(server) -> None:
    assert refused(httpx.get(f"{server.url}/v1/completions", timeout=TIMEOUT), 404, "no route GET /v1/completions")["code"] == "not_found"
    refused(httpx.get(f"{server.url}/v1/chat/completions", timeout=TIMEOUT), 405)


# ---- many clients ------------------------------------------------------------------------------------------------------
async def _stream_then_vanish(client: httpx.AsyncClient, url: str, body: dict) -> bool:
    """Open a stream, read until its first content delta, hang up -> whether a content delta came."""
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                return True
    return False


def test_100_clients_disconnect_mid_stream(start_server, chat_body) -> None:
    running = start_server(EngineConfig(max_queue=128))
    before = sum(running.finished().values())
    body = chat_body(row=1, max_tokens=16, stream=True)

    async def main() -> list[bool]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(_stream_then_vanish(client, f"{running.url}/v1/chat/completions", body) for _ in range(100)))

    got_content = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert all(got_content)
    _wait_idle(running)
    finished = running.finished()
    print(f"100 clients gone mid-stream: finished {finished}")  # the report's fault table (pytest -s)
    assert sum(finished.values()) - before == 100  # every one accounted for: finished or cancelled, none stuck
    assert finished.get("cancelled", 0) >= 1  # rows freed at the next step, not run to their end
    assert running.engine.active == 0 and running.engine.waiting == 0
    still_answers(running, chat_body)


def _wait_idle(running, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while running.engine.active or running.engine.waiting:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.02)


def test_1000_requests_against_a_queue_of_8(start_server, chat_body, data_uri, tiny_pipeline) -> None:
    """The surplus is refused with 429 + Retry-After at once; none is lost; the server answers afterwards."""
    from prunert.config import GenerationConfig
    from prunert.runtime.image import decode_image_bytes

    running = start_server(EngineConfig(max_queue=8))
    with Image.open(PHOTO) as photo:
        small = _png(photo.convert("RGB").resize((64, 48)))  # a small body: the server's time goes to the queue, not to parsing
    body = chat_body(row=0, url=data_uri(small, "image/png"), max_tokens=3)
    messages = [{"role": "user", "content": [{"type": "image"}, body["messages"][0]["content"][1]]}]
    expected = tiny_pipeline.generate([decode_image_bytes(small)], [tiny_pipeline.chat_prompt(messages)],
                                      GenerationConfig(max_new_tokens=3))[0].text

    async def one(client: httpx.AsyncClient) -> tuple[int, str]:
        response = await client.post(f"{running.url}/v1/chat/completions", json=body)
        if response.status_code == 200:
            return 200, response.json()["choices"][0]["message"]["content"]
        assert response.headers.get("retry-after", "").isdigit(), response.headers
        return response.status_code, response.json()["error"]["code"]

    async def client(todo: list[int], results: list) -> None:  # a client of its own each: one pool of hundreds is slow
        async with httpx.AsyncClient(timeout=TIMEOUT) as connection:
            while todo:
                todo.pop()
                results.append(await one(connection))

    async def main() -> list[tuple[int, str]]:
        todo, results = list(range(1000)), []
        await asyncio.gather(*(client(todo, results) for _ in range(CLIENTS)))
        return results

    results = asyncio.run(asyncio.wait_for(main(), 3 * TIMEOUT))
    codes = {code: sum(1 for c, _ in results if c == code) for code, _ in results}
    assert sum(codes.values()) == 1000 and set(codes) <= {200, 429, 503}, codes
    print(f"1,000 requests, --max-queue 8: {codes}")  # the report's fault table (pytest -s)
    assert codes.get(429, 0) >= 1 and codes[200] >= 8, codes
    assert all(text == expected for code, text in results if code == 200)
    assert all(text == "queue_full" for code, text in results if code == 429)
    assert running.engine.metrics.rejected.values[""] == codes.get(429, 0)
    still_answers(running, chat_body)


def test_a_client_gone_while_waiting_cancels_its_request(start_server, chat_body) -> None:
    """Not streamed: the server notices the disconnect while the answer is pending and frees the row."""
    import threading

    running = start_server(EngineConfig(max_batch=1))
    gate, step = threading.Event(), running.engine._batch.step

    def gated_step():  # decoding waits until the client has given up
        assert gate.wait(TIMEOUT)
        return step()

    running.engine._batch.step = gated_step
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{running.url}/v1/chat/completions", json=chat_body(row=0, max_tokens=8), timeout=0.5)
    deadline = time.monotonic() + TIMEOUT
    while running.http.responses.values.get("499") is None:  # the handler saw the disconnect and cancelled
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.01)
    gate.set()
    _wait_idle(running)
    assert running.finished() == {"cancelled": 1.0}
    still_answers(running, chat_body)
