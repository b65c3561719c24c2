"""`prunert serve ARTIFACT --triton`: the engine (prunert.serving.engine: continuous batching over one VLMPipeline)
bound as two Triton models through PyTriton, spoken to over KServe v2 by any Triton client (tritonclient HTTP/gRPC).

PyTriton runs a real tritonserver (HTTP, gRPC, metrics, health) that hands each execute to this process over a local
socket; the inference callables below run on PyTriton's handler threads' event loops and only submit to the engine and
wait for its events, so every request, from either model, decodes in the engine's one running batch.

Models (KServe v2 tensors; `[1]` is one value per row):
  prunert          Triton's dynamic batching (requests arriving within max_queue_delay_us become one execute, up to
                   the engine's max_batch rows); one response per request. HTTP and gRPC. TritonConfig.instances
                   executes are in flight at once, so a new batch joins the running decode instead of waiting.
  prunert_stream   decoupled (one response per text piece, the last with finish_reason and kept_indices), unbatched
                   at Triton's level: each request is its own execute, which returns at once, and its row joins the
                   engine's batch. gRPC streaming only: Triton refuses decoupled models on HTTP /infer and gRPC
                   ModelInfer, so tritonclient.grpc's start_stream / async_stream_infer.

  inputs   image          BYTES [1]   the encoded image (prunert.runtime.image.BYTES_FORMATS; bombs refused)
           prompt         BYTES [1]   UTF-8: the image placeholder where the image goes, or none (VLMPipeline.tokenize)
           max_tokens     INT32 [1]   optional: as many as fit (the artifact's max_sequence caps each row)
           temperature    FP32  [1]   optional: 0 (greedy)
           top_p          FP32  [1]   optional: 1
           seed           INT64 [1]   optional: 0 when greedy, a fresh one when sampling
  outputs  text           BYTES [1]   the answer (prunert_stream: this response's piece)
           kept_indices   INT64 [-1]  the visual tokens the artifact kept (indices into the image's N); -1 is padding:
                                      a row of a batch with fewer, a refused row, a stream's pieces before its last
                                      are [-1] (PyTriton cannot send an empty [B, 0])
           finish_reason  BYTES [1]   "stop", "length", "cancelled" or "error" ("" before a stream's last response)
           error          BYTES [1]   what was wrong when finish_reason is "error" ("" otherwise)

A request's own failure (an undecodable image, a prompt the artifact cannot take, a full queue) is its response's
`error`, not a Triton error: PyTriton answers an execute with one list of outputs or one exception, so an exception
would fail every request batched with the bad one, and would carry the Python traceback as its message.

Not passed on: Triton's request cancellation. PyTriton 0.7 does not tell the callable that a client cancelled its
gRPC stream or timed out, so that row decodes to its end (at most max_tokens) before its place is free.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import sysconfig
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import numpy as np

from prunert.config import GenerationConfig, seed_for
from prunert.errors import BackendUnavailableError, ConfigError, PromptError, PrunertError
from prunert.runtime.image import decode_image_bytes
from prunert.serving.config import TritonConfig
from prunert.serving.engine import Engine, Event, Request

LOG = logging.getLogger("prunert.serve")
MODEL = "prunert"
STREAM_MODEL = "prunert_stream"
START_ATTEMPTS = 2  # a failed start of the Triton server is made once more (_start)
INSTALL = ('PyTriton is not installed here; it pins numpy < 2, so give it its own environment: python -m venv '
           '.venv-triton && .venv-triton/bin/pip install "prunert[triton]" (docs/serving.md)')


def add_triton_flags(parser: argparse.ArgumentParser) -> None:
    """--triton and its ports, on `prunert serve`'s parser (which has --host)."""
    d = TritonConfig()
    group = parser.add_argument_group("Triton (KServe v2 through PyTriton: the [triton] extra, docs/serving.md)")
    group.add_argument("--triton", action="store_true",
                       help=f"serve the artifact as the Triton models {MODEL!r} (dynamic batching, HTTP and gRPC) and "
                            f"{STREAM_MODEL!r} (gRPC streaming) instead of the OpenAI-compatible server")
    group.add_argument("--http-port", type=int, default=d.http_port, help="with --triton: Triton's HTTP port (default: %(default)s)")
    group.add_argument("--grpc-port", type=int, default=d.grpc_port, help="with --triton: Triton's gRPC port (default: %(default)s)")
    group.add_argument("--metrics-port", type=int, default=d.metrics_port,
                       help="with --triton: Triton's Prometheus metrics port (default: %(default)s)")


def serve_triton(args: argparse.Namespace, engine: Engine) -> int:
    """Serve the started `engine` as Triton models on args.host until SIGTERM (-> 0; Triton finishes in-flight
    requests for up to the engine's drain_s, at most PyTriton's 30 s) or Ctrl-C (-> KeyboardInterrupt: 130)."""
    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    _check_free(args.host, {"--http-port": config.http_port, "--grpc-port": config.grpc_port,
                            "--metrics-port": config.metrics_port})
    pytriton, model = _pytriton(), TritonModel(engine)
    _own_libpython_first()
    stop = threading.Event()
    received: list[int] = []
    server = None

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = _start(pytriton, args.host, config, engine, model)
        print(f"prunert: Triton models {MODEL!r} and {STREAM_MODEL!r} (KServe v2) on http://{args.host}:{config.http_port}"
              f" and grpc {args.host}:{config.grpc_port}; metrics http://{args.host}:{config.metrics_port}/metrics",
              flush=True)
        while not stop.wait(1.0) and server.is_alive():
            pass
    finally:
        if server is not None:
            server.stop()  # tritonserver stops taking requests and waits for those in flight (exit_timeout_secs)
        engine.shutdown(0.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    if not received:
        print("prunert: error: the Triton server exited unexpectedly", file=sys.stderr)
        return 1
    return 0


def _start(pytriton: Any, host: str, config: TritonConfig, engine: Engine, model: "TritonModel") -> Any:
    """A running pytriton.triton.Triton with both models bound. A start that fails is stopped and made again on a
    fresh server, START_ATTEMPTS times in all: PyTriton's model instances after the first read the first one's config
    over a local socket within 1 s of starting, and on a loaded machine the first may not listen yet (the load fails
    with ConnectionRefusedError or a timeout). What still fails is one ConfigError line."""
    attempt = 1
    while True:
        server = pytriton.Triton(config=pytriton.TritonConfig(
            http_address=host, http_port=config.http_port, grpc_address=host, grpc_port=config.grpc_port,
            metrics_address=host, metrics_port=config.metrics_port, exit_timeout_secs=int(min(engine.config.drain_s, 30)),
            allow_gpu_metrics=False))
        bind_models(pytriton, server, model, engine.max_batch, config)
        try:
            server.run()
            return server
        except Exception as exc:  # noqa: BLE001 - PyTriton's start-up failures (a model that did not load, ...)
            server.stop()
            first = (str(exc).split("Traceback")[0].strip().splitlines()[:1] or [""])[0][:300]
            if attempt == START_ATTEMPTS:
                raise ConfigError(f"--triton: the Triton server did not start on {host} (ports {config.http_port}, "
                                  f"{config.grpc_port}, {config.metrics_port}): {type(exc).__name__}: {first}") from None
            attempt += 1
            LOG.warning("the Triton server did not start (%s: %s); starting a fresh one (attempt %d of %d)",
                        type(exc).__name__, first, attempt, START_ATTEMPTS)


def bind_models(pytriton: Any, server: Any, model: "TritonModel", max_batch: int, config: TritonConfig) -> None:
    """Bind the batched model and its decoupled streaming twin on a pytriton.triton.Triton (pytriton: _pytriton())."""
    inputs = [pytriton.Tensor(name=name, dtype=dtype, shape=(1,), optional=optional) for name, dtype, optional in INPUTS]
    outputs = [pytriton.Tensor(name=name, dtype=dtype, shape=shape) for name, dtype, shape in OUTPUTS]
    batcher = pytriton.DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us)
    server.bind(MODEL, [model.infer] * config.instances, inputs, outputs, strict=True,
                config=pytriton.ModelConfig(batching=True, max_batch_size=max_batch, batcher=batcher))
    server.bind(STREAM_MODEL, model.stream, inputs, outputs, strict=True,
                config=pytriton.ModelConfig(batching=False, decoupled=True))


def _check_free(host: str, ports: dict[str, int]) -> None:
    """ConfigError naming the flag of a port something already listens on (tritonserver would exit, and PyTriton
    wait for it in vain, or talk to the other listener)."""
    for flag, port in ports.items():
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds: TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror}), expected a free port")


def _own_libpython_first() -> None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH, for tritonserver's Python-backend stubs. A stub links
    libpython3.X by name; beside a pyenv or conda Python the distribution's libpython3.X of another patch release
    would load instead, and run this interpreter's standard library on its own C core (multiprocessing fails there)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        paths = [libdir, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(paths))  # read by the children only


INPUTS = (("image", np.bytes_, False), ("prompt", np.bytes_, False), ("max_tokens", np.int32, True),
          ("temperature", np.float32, True), ("top_p", np.float32, True), ("seed", np.int64, True))
OUTPUTS = (("text", np.bytes_, (1,)), ("kept_indices", np.int64, (-1,)), ("finish_reason", np.bytes_, (1,)),
           ("error", np.bytes_, (1,)))


@dataclass(frozen=True)
class Answer:
    """One row's whole answer (the batched model's response row)."""

    text: str
    kept: tuple[int, ...]
    finish: str
    error: str = ""


class TritonModel:
    """The inference callables PyTriton runs, over one Engine. Each runs on a PyTriton handler thread's event loop
    (one per model instance); the engine's deliver() puts its events on that loop's queues."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.default_max_tokens = engine.pipeline.manifest.text.max_sequence  # as the OpenAI server: what fits

    async def infer(self, requests: list) -> list[dict[str, np.ndarray]]:
        """The batched model: Triton's batch of requests -> one response each (its rows' answers, [B, ...])."""
        return list(await asyncio.gather(*(self._respond(request.data) for request in requests)))

    async def stream(self, requests: list) -> AsyncIterator[list[dict[str, np.ndarray]]]:
        """The decoupled model (one request per execute, tensors without a batch axis): a response per text piece,
        the last with finish_reason and kept_indices."""
        (request,) = requests
        (row,) = await self._rows(_batch_of_one(request.data))
        async for event in self._events(row):
            if event.finish is None and not event.text:
                continue
            yield [{name: value[0] for name, value in _outputs([_answer_of([event])]).items()}]  # [1], kept [k]
        # the generator's end is the stream's final flag (PyTriton sends it)

    async def _respond(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = await self._rows(data)
        return _outputs(list(await asyncio.gather(*(self._whole(row) for row in rows))))

    async def _rows(self, data: Mapping[str, np.ndarray]) -> list[Request | PrunertError]:
        """engine_requests in a worker thread (image decoding must not hold the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(None, engine_requests, data, self.default_max_tokens)

    async def _whole(self, row: Request | PrunertError) -> Answer:
        return _answer_of([event async for event in self._events(row)])

    async def _events(self, row: Request | PrunertError) -> AsyncIterator[Event]:
        """A row's events from the engine, in order, the last with `finish`; a refused row: one final "error" event.
        A consumer gone before the end (a cancelled stream) cancels the row in the engine."""
        if isinstance(row, PrunertError):
            yield Event("", "error", error=str(row))
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            ticket = self.engine.submit(row, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except PrunertError as exc:  # a prompt the artifact cannot take, a full queue, a server shutting down
            yield Event("", "error", error=str(exc))
            return
        finish = None
        try:
            while finish is None:
                event = await queue.get()
                finish = event.finish
                if finish == "error":  # the engine's own fault, logged there
                    event = Event(event.text, finish, event.usage, f"server error (logged): {event.error}")
                yield event
        finally:
            if finish is None:
                self.engine.cancel(ticket)


def engine_requests(data: Mapping[str, np.ndarray], default_max_tokens: int) -> list[Request | PrunertError]:
    """One KServe v2 request's tensors ([B, 1] each: a request may carry B rows) -> B engine Requests; a row's bad
    input is that row's PrunertError (it names the input and what was expected)."""
    rows: list[Request | PrunertError] = []
    for b in range(len(data["prompt"])):
        try:
            rows.append(_request({name: value[b] for name, value in data.items()}, default_max_tokens))
        except PrunertError as exc:
            rows.append(exc)
    return rows


def _request(row: Mapping[str, np.ndarray], default_max_tokens: int) -> Request:
    """One row's tensors ([1] each) -> a Request."""
    try:
        prompt = _item(row, "prompt").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt: not UTF-8 ({exc.reason} at byte {exc.start}), expected UTF-8 text") from None
    image = decode_image_bytes(_item(row, "image"), name="image")
    default = GenerationConfig()
    max_tokens = int(_item(row, "max_tokens", default_max_tokens))
    if max_tokens < 1:
        raise ConfigError(f"max_tokens: got {max_tokens}, expected >= 1")
    temperature = float(_item(row, "temperature", default.temperature))
    given = _item(row, "seed")
    seed = seed_for(None if given is None else int(given), temperature)  # sampling without a seed: a new one
    config = GenerationConfig(max_tokens, temperature, float(_item(row, "top_p", default.top_p)), seed)
    return Request(image, prompt, config)


def _item(row: Mapping[str, np.ndarray], name: str, default: Any = None) -> Any:
    """The one value of input `name` (a [1] tensor), or `default` where the request left the optional input out."""
    value = row.get(name)
    return default if value is None else value.reshape(-1)[0]


def _batch_of_one(data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An unbatched model's tensors ([1]) as a batch of one row ([1, 1])."""
    return {name: value[None] for name, value in data.items()}


def _answer_of(events: list[Event]) -> Answer:
    """A row's events -> its text so far and, from a final event, its finish, kept indices and error."""
    final = events[-1]
    kept = final.usage.kept_indices if final.usage is not None else ()
    return Answer("".join(event.text for event in events), kept, final.finish or "", final.error or "")


def _outputs(answers: list[Answer]) -> dict[str, np.ndarray]:
    """Rows' answers -> the response's tensors, [B, 1] and kept_indices [B, k] (-1 after a row's own kept; k >= 1)."""
    kept = np.full((len(answers), max(1, *(len(a.kept) for a in answers))), -1, np.int64)  # PyTriton sends no [B, 0]
    for b, answer in enumerate(answers):
        kept[b, : len(answer.kept)] = answer.kept

    def column(values: list[str]) -> np.ndarray:
        return np.array([[value.encode("utf-8")] for value in values], dtype=np.object_)  # [B, 1] BYTES

    return {"text": column([a.text for a in answers]), "kept_indices": kept,
            "finish_reason": column([a.finish for a in answers]), "error": column([a.error for a in answers])}


def _pytriton() -> Any:
    """pytriton's API in one namespace (imported on use: the default install has no PyTriton)."""
    try:
        from pytriton import model_config, triton
    except ImportError:
        raise BackendUnavailableError(f"--triton: {INSTALL}") from None
    return argparse.Namespace(Triton=triton.Triton, TritonConfig=triton.TritonConfig, Tensor=model_config.Tensor,
                              ModelConfig=model_config.ModelConfig, DynamicBatcher=model_config.DynamicBatcher)
