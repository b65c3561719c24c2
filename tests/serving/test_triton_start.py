"""prunert.serving.triton._start: a Triton server whose start fails is stopped and made again once, then the failure is
one ConfigError line. PyTriton itself is not needed: its API is replaced by a recording stand-in (the real server is
tests/serving/test_triton.py's)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from prunert.errors import ConfigError
from prunert.serving import triton
from prunert.serving.config import TritonConfig

LOAD_FAILURE = "Model prunert load failed: ConnectionRefusedError: [Errno 111]\nTraceback (most recent call last):\n  ..."


def fake_pytriton(failures: int) -> tuple[argparse.Namespace, list]:
    """PyTriton's namespace as prunert.serving.triton._pytriton returns it; the first `failures` servers' run() raise."""
    made: list = []

    class Triton:
        def __init__(self, config: dict):
            self.config, self.bound, self.ran, self.stopped = config, [], False, False
            made.append(self)

        def bind(self, name, infer, inputs, outputs, strict, config) -> None:
            self.bound.append((name, len(infer) if isinstance(infer, list) else 1))

        def run(self) -> None:
            self.ran = True
            if len(made) <= failures:
                raise RuntimeError(LOAD_FAILURE)

        def stop(self) -> None:
            self.stopped = True

    def record(**kwargs) -> dict:
        return kwargs

    return argparse.Namespace(Triton=Triton, TritonConfig=record, Tensor=record, ModelConfig=record, DynamicBatcher=record), made


def start(failures: int):
    pytriton, made = fake_pytriton(failures)
    engine = SimpleNamespace(config=SimpleNamespace(drain_s=5.0), max_batch=2)
    model = SimpleNamespace(infer=lambda requests: None, stream=lambda requests: None)
    return (lambda: triton._start(pytriton, "127.0.0.1", TritonConfig(), engine, model)), made


def test_a_start_that_fails_once_runs_on_a_fresh_server(caplog) -> None:
    run, made = start(failures=1)
    with caplog.at_level("WARNING", logger="prunert.serve"):
        server = run()
    assert server is made[1] and len(made) == triton.START_ATTEMPTS == 2
    assert made[0].stopped and not made[1].stopped  # the failed one is stopped, the running one is the caller's
    instances = TritonConfig().instances
    assert made[0].bound == made[1].bound == [(triton.MODEL, instances), (triton.STREAM_MODEL, 1)]
    assert made[1].config["http_address"] == "127.0.0.1" and made[1].config["exit_timeout_secs"] == 5
    assert "starting a fresh one (attempt 2 of 2)" in caplog.text and "Traceback" not in caplog.text


def test_a_start_that_keeps_failing_is_one_config_error_line() -> None:
    run, made = start(failures=2)
    with pytest.raises(ConfigError) as error:
        run()
    message = str(error.value)
    assert message.startswith("--triton: the Triton server did not start on 127.0.0.1")
    assert message.endswith("RuntimeError: Model prunert load failed: ConnectionRefusedError: [Errno 111]")
    assert "\n" not in message and len(made) == 2 and all(server.stopped for server in made)


def test_a_first_start_that_works_makes_one_server() -> None:
    run, made = start(failures=0)
    assert run() is made[0] and len(made) == 1 and made[0].ran and not made[0].stopped
