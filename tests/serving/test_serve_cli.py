"""`prunert serve` as a command: its flags, bad settings as one error line (exit 2), and a real subprocess stopped by
SIGTERM: it stops accepting, finishes the requests in flight, or cuts them after --drain-s; exit 0 either way."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import httpx
import pytest

TIMEOUT = 60
STREAMS = 200  # in flight at SIGTERM, one row at a time: about a second of work left for the tiny artifact


def test_help_lists_every_flag(capsys) -> None:
    from prunert import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--backend", "--precision", "--threads", "--spin", "--max-batch", "--max-queue",
                 "--max-body-mb", "--drain-s", "--allow-image-dir", "--triton", "--http-port", "--grpc-port", "--metrics-port"):
        assert flag in text, flag
    assert "default: 127.0.0.1" in text and "default: 8000" in text and "default: 64" in text


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-queue", "0"], "--max-queue: got 0, expected >= 1"),
        (["--max-batch", "-1"], "--max-batch: got -1"),
        (["--drain-s", "-2"], "--drain-s: got -2.0"),
        (["--port", "70000"], "--port: got 70000"),
        (["--max-body-mb", "0"], "--max-body-mb: got 0.0"),
        (["--allow-image-dir", "/nonexistent/images"], "--allow-image-dir '/nonexistent/images': not a directory"),
        (["--threads", "-1"], "--threads: got -1"),
    ],
    ids=["queue", "batch", "drain", "port", "body", "image-dir", "threads"],
)
def test_bad_settings_are_one_error_line(prunert_main, error_line, tiny_artifact, flags, needle) -> None:
    code, out, err = prunert_main("serve", tiny_artifact, *flags)
    assert code == 2 and out == ""
    error_line(err, needle)


def test_port_in_use_and_missing_artifact(prunert_main, error_line, tiny_artifact, tmp_path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = prunert_main("serve", tiny_artifact, "--port", port)
    assert code == 2
    error_line(err, f"--host 127.0.0.1 --port {port}: cannot listen there")
    code, _, err = prunert_main("serve", tmp_path / "nope", "--port", "0")
    assert code == 2
    error_line(err, "nope")


def test_without_the_serve_extra(python_without, tiny_artifact) -> None:
    result = python_without(
        """
        from prunert import cli

        code = cli.main(["serve", sys.argv[1], "--port", "0"])
        print(f"CODE {code}")
        """,
        tiny_artifact,
        blocked=("torch", "transformers", "starlette", "uvicorn"),
    )
    assert "CODE 2" in result.stdout, result.stdout + result.stderr
    assert "prunert serve needs the [serve] extra" in result.stderr and "Traceback" not in result.stderr


# ---- SIGTERM ------------------------------------------------------------------------------------------------------------
async def _streams(url: str, body: dict, count: int, first: asyncio.Event) -> list[str]:
    """`count` concurrent streams -> each one's outcome: its finish reason when it ended with [DONE], "cut" when it
    ended before, "503" when the server refused it as it shut down."""
    async def one() -> str:
        finish, done = None, False
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code == 503:  # cut before its answer started
                    assert response.headers["retry-after"].isdigit() and b"shutting_down" in await response.aread()
                    return "503"
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                        first.set()
                    if '"finish_reason":"' in line.replace(" ", ""):
                        finish = line.replace(" ", "").split('"finish_reason":"')[1].split('"')[0]
                    done = done or line == "data: [DONE]"
        except httpx.TransportError:
            return "cut"
        return finish if done and finish else "cut"

    return await asyncio.gather(*(one() for _ in range(count)))  # a client each: one pool of hundreds is slow


def _sigterm_while_streaming(server, body: dict, count: int) -> tuple[list[str], bool]:
    """Start `count` streams, SIGTERM the server at the first content delta -> (outcomes, whether a new connection was
    refused while some stream was still open)."""
    async def main() -> tuple[list[str], bool]:
        first = asyncio.Event()
        streams = asyncio.ensure_future(_streams(server.url, body, count, first))
        await asyncio.wait_for(first.wait(), TIMEOUT)
        server.process.send_signal(signal.SIGTERM)
        refused_while_busy = False
        while not streams.done():
            try:
                async with httpx.AsyncClient(timeout=1) as probe:
                    await probe.get(f"{server.url}/health")
            except httpx.TransportError:  # refused, or reset unserved from the closed listener's backlog
                refused_while_busy = not streams.done()
                break
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(streams, TIMEOUT), refused_while_busy

    return asyncio.run(main())


def test_sigterm_finishes_in_flight_requests(serve_subprocess, chat_body) -> None:
    server = serve_subprocess("--max-batch", "1", "--max-queue", "256", "--drain-s", "30")
    outcomes, refused = _sigterm_while_streaming(server, chat_body(row=1, max_tokens=16, stream=True), STREAMS)
    assert all(outcome in ("stop", "length") for outcome in outcomes), outcomes  # queued ones too: they were accepted
    code = server.process.wait(TIMEOUT)
    stderr = server.stderr_file.read_text()
    assert code == 0, stderr
    assert "prunert serve: stopped; every in-flight request finished" in stderr and "Traceback" not in stderr
    assert refused, "a new connection was accepted after SIGTERM while requests were in flight"


def test_sigterm_cuts_requests_after_drain_s(serve_subprocess, chat_body) -> None:
    server = serve_subprocess("--max-batch", "1", "--max-queue", "256", "--drain-s", "0")
    outcomes, _ = _sigterm_while_streaming(server, chat_body(row=1, max_tokens=16, stream=True), STREAMS)
    code = server.process.wait(TIMEOUT)
    stderr = server.stderr_file.read_text()
    assert code == 0, stderr
    cut = outcomes.count("cut") + outcomes.count("503")
    assert cut >= 1 and set(outcomes) <= {"stop", "length", "cut", "503"}, outcomes
    assert f"prunert serve: stopped; {cut} requests were cut at --drain-s 0" in stderr and "Traceback" not in stderr, stderr


def test_ctrl_c_stops_with_130(serve_subprocess, chat_body) -> None:
    server = serve_subprocess()
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(max_tokens=2), timeout=TIMEOUT).status_code == 200
    code, stderr = server.stop(signal.SIGINT)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "prunert: interrupted" and "Traceback" not in stderr
