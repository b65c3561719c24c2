"""Servers for the serving tests, started for real on 127.0.0.1 (a free port): `prunert serve`'s HTTP server in a thread
of this process over the tiny artifact (`start_server`, `server`), and request helpers (`chat_body`, `data_uri`).
The answers they are compared with come from `tiny_pipeline` (the root conftest), a pipeline of its own."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PHOTOS = [REPO / "examples" / "images" / name for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")]
QUESTIONS = ["What is in the picture?", "Is there a cat?", "Describe the large object on the left.", "What colour is it?"]
START_S = 60  # bound on a server's start and stop


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    engine: Any  # prunert.serving.engine.Engine
    http: Any  # prunert.serving.http_server.HttpServer
    uvicorn: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(START_S)
        assert not self.thread.is_alive(), "the server did not stop"

    def finished(self) -> dict[str, float]:
        """The engine's finished requests by finish reason."""
        return dict(self.engine.metrics.requests.values)


@pytest.fixture(scope="session")
def serving_pipeline(tiny_artifact: Path):
    """The servers' own pipeline (one engine at a time uses it), apart from `tiny_pipeline`, the tests' reference."""
    from prunert.runtime import VLMPipeline

    return VLMPipeline(tiny_artifact)


def _start(pipeline, engine_config, http_config) -> RunningServer:
    from prunert.serving.config import EngineConfig, HttpConfig
    from prunert.serving.engine import Engine
    from prunert.serving.http_server import HttpServer, bind, make_server

    http_config = http_config or HttpConfig(port=0)
    engine = Engine(pipeline, engine_config or EngineConfig()).start()
    http = HttpServer(engine, http_config)
    sock = bind(http_config)
    server = make_server(http)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, http, server, thread)


@pytest.fixture
def start_server(serving_pipeline):
    """start_server(EngineConfig | None, HttpConfig | None) -> a RunningServer (stopped after the test)."""
    running: list[RunningServer] = []

    def start(engine_config=None, http_config=None) -> RunningServer:
        running.append(_start(serving_pipeline, engine_config, http_config))
        return running[-1]

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def start_server_over():
    """start_server_over(pipeline, EngineConfig | None, HttpConfig | None) -> a RunningServer over another artifact's
    pipeline (stopped after the test)."""
    running: list[RunningServer] = []

    def start(pipeline, engine_config=None, http_config=None) -> RunningServer:
        running.append(_start(pipeline, engine_config, http_config))
        return running[-1]

    yield start
    for server in running:
        server.stop()


@pytest.fixture(scope="module")
def server(serving_pipeline):
    """A server with the default settings, shared by a module's tests (none of them changes it)."""
    running = _start(serving_pipeline, None, None)
    yield running
    running.stop()


def encode_data_uri(data: bytes | Path, media: str = "image/jpeg") -> str:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


@pytest.fixture(scope="session")
def data_uri():
    """data_uri(bytes | path, media="image/jpeg") -> a data:...;base64, URI."""
    return encode_data_uri


def chat_messages(url: str, question: str = QUESTIONS[0]) -> list[dict[str, Any]]:
    """One user turn: an image_url part, then the question (OpenAI's shape)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="session")
def chat_body():
    """chat_body(row=0, url=None, **fields) -> a /v1/chat/completions JSON body about PHOTOS[row % 3] (or `url`)."""

    def body(row: int = 0, url: str | None = None, **fields: Any) -> dict[str, Any]:
        url = url or encode_data_uri(PHOTOS[row % len(PHOTOS)])
        return {"model": "tiny", "messages": chat_messages(url, QUESTIONS[row % len(QUESTIONS)]), **fields}

    return body


@pytest.fixture(scope="session")
def alone(tiny_pipeline):
    """alone(row, max_tokens, temperature=0, seed=0) -> the text the request chat_body(row) gets run alone through
    VLMPipeline (cached)."""
    from prunert.config import GenerationConfig

    cache: dict[tuple, str] = {}

    def answer(row: int, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
        key = (row % len(PHOTOS), row % len(QUESTIONS), max_tokens, temperature, seed)
        if key not in cache:
            messages = chat_messages("", QUESTIONS[row % len(QUESTIONS)])
            messages[0]["content"][0] = {"type": "image"}
            prompt = tiny_pipeline.chat_prompt(messages)
            config = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
            cache[key] = tiny_pipeline.generate([PHOTOS[row % len(PHOTOS)]], [prompt], config)[0].text
        return cache[key]

    return answer


@dataclass
class ServeProcess:
    """A `prunert serve` subprocess on a free port; its stdout and stderr go to files."""

    process: Any  # subprocess.Popen
    url: str
    stderr_file: Path

    def stop(self, sig: int, timeout: float = START_S) -> tuple[int, str]:
        """Send `sig`, wait for the exit -> (exit code, stderr)."""
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code, self.stderr_file.read_text()


@pytest.fixture
def serve_subprocess(tiny_artifact: Path, tmp_path: Path):
    """serve_subprocess(*flags) -> a ServeProcess of `prunert serve TINY --port 0 FLAGS`, once it listens (killed after)."""
    started: list[Any] = []

    def start(*flags: str) -> ServeProcess:
        out, err = tmp_path / f"serve{len(started)}.out", tmp_path / f"serve{len(started)}.err"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "prunert.cli", "serve", str(tiny_artifact), "--port", "0", *flags],
                                       stdout=stdout, stderr=stderr, cwd=REPO, env=env)
        started.append(process)
        deadline = time.monotonic() + START_S
        while not (match := re.search(r"http://127\.0\.0\.1:(\d+)/v1", out.read_text())):
            assert process.poll() is None, f"prunert serve exited {process.returncode}: {err.read_text()}"
            assert time.monotonic() < deadline, "prunert serve did not start"
            time.sleep(0.05)
        return ServeProcess(process, f"http://127.0.0.1:{match.group(1)}", err)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(START_S)
