"""The OpenAI-compatible HTTP server of `prunert serve` (Starlette on uvicorn: the optional extra prunert[serve]).

POST /v1/chat/completions (prunert.serving.openai_api parses and shapes; the Engine schedules), GET /v1/models,
GET /health (liveness), GET /metrics (Prometheus: the engine's metrics and HTTP errors by code).

Each request: its body read up to --max-body-mb (413 past it), parsed, its image decoded and its prompt rendered
and submitted in a worker thread; then its events come back from the engine thread through call_soon_threadsafe.
A client that disconnects (mid-stream or while waiting) cancels its row: freed at the engine's next step.
Shutdown (SIGTERM, Ctrl-C): uvicorn stops accepting, in-flight requests run for up to --drain-s, the rest are cut,
then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any, AsyncIterator, Callable

from prunert.errors import BackendUnavailableError, ConfigError, PromptError
from prunert.serving.config import HttpConfig
from prunert.serving.engine import EngineClosedError, Event, QueueFullError, Request
from prunert.serving.metrics import CONTENT_TYPE, Counter
from prunert.serving.openai_api import (ApiError, ImageSource, chunk, completion, completion_id, error_body, model_card,
                                        parse_chat, sse)

try:
    import anyio
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request as HttpRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - the [serve] extra is missing
    raise BackendUnavailableError(f"prunert serve needs the [serve] extra ({exc.name} is not installed): "
                                  "pip install 'prunert[serve]' (starlette, uvicorn)") from None

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SHUT_DOWN = "the server shut down before this answer finished; retry"
CLIENT_GONE = 499  # nginx's "client closed request": the metrics' code for answers nobody waited for


class HttpServer:
    """The ASGI app over one started Engine. `asgi` is what uvicorn runs; make_server() wraps it in a uvicorn.Server."""

    def __init__(self, engine: Any, config: HttpConfig = HttpConfig()):
        self.engine, self.config = engine, config
        self.card = model_card(engine.pipeline)
        self.images = ImageSource(config.allow_image_dir, config.max_body_bytes, engine.pipeline.artifact.host.max_images_per_prompt)
        self.default_max_tokens = engine.pipeline.manifest.text.max_sequence  # each row is capped to what fits
        self.responses = Counter("prunert_http_responses_total", "HTTP responses, by status code.", "code")
        self.errors = Counter("prunert_http_errors_total", "HTTP error responses (4xx, 5xx), by status code.", "code")
        self.cut = 0  # requests still running when the drain timed out
        self.decode_threads = max(2, min(8, os.cpu_count() or 2))
        self._limiter: anyio.CapacityLimiter | None = None  # made on the server's event loop (_decoders)
        self.uvicorn: uvicorn.Server | None = None  # make_server's: its should_exit tells a cut request from a client gone
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]), Route("/v1/models", self.models),
                  Route("/health", self.health), Route("/metrics", self.metrics)]
        handlers = {ApiError: self._api_error, HTTPException: self._http_error, Exception: self._fault}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    async def asgi(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The app, counting each response's status (uvicorn runs this)."""
        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                code = str(message["status"])
                self.responses.inc(code)
                if message["status"] >= 400:
                    self.errors.inc(code)
            await send(message)

        await self.app(scope, receive, counted if scope["type"] == "http" else send)

    # ---- endpoints -------------------------------------------------------------------------------------------------
    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.card]})

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.card["id"], "active": self.engine.active, "waiting": self.engine.waiting})

    async def metrics(self, request: HttpRequest) -> Response:
        return Response(self.engine.metrics.render(self.responses, self.errors), media_type=CONTENT_TYPE)

    async def chat(self, request: HttpRequest) -> Response:
        """POST /v1/chat/completions. A request the drain cuts before its answer started gets 503 with Retry-After."""
        try:
            return await self._chat(request)
        except asyncio.CancelledError:
            if not (self.uvicorn and self.uvicorn.should_exit):
                raise
            self.cut += 1
            return JSONResponse(ApiError(503, SHUT_DOWN, kind="server_error", code="shutting_down").body(), status_code=503,
                                headers={"Retry-After": str(EngineClosedError.retry_after_s)})

    async def _chat(self, request: HttpRequest) -> Response:
        try:
            body = await self._body(request)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer
            return Response(status_code=CLIENT_GONE)
        _refusal(self.engine.check_room)  # an overload is refused at once: no worker thread, no image decoded
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        deliver = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731 - on the engine thread
        call, ticket = await anyio.to_thread.run_sync(self._submit, body, deliver, limiter=self._decoders())
        cid, headers = completion_id(), {"X-Prunert-Seed": str(call.seed)}
        if call.stream:
            state = {"finished": False, "sent": False}  # the engine's final event came; [DONE] went out
            return _EngineStream(self._stream(queue, cid, call.include_usage, state), lambda: self._release(ticket, state),
                                 headers={**SSE_HEADERS, **headers}, media_type="text/event-stream")
        answer = await self._answer(queue, request, ticket)
        if answer is None:
            return Response(status_code=CLIENT_GONE)  # sent nowhere; counted
        text, final = answer
        if final.finish == "error":
            raise ApiError(500, f"the server failed on this request (logged): {final.error}", kind="server_error", code="internal_error")
        if final.finish == "cancelled":
            raise ApiError(503, SHUT_DOWN, kind="server_error", code="shutting_down", retry_after_s=EngineClosedError.retry_after_s)
        return JSONResponse(completion(cid, self.card["id"], text, final.finish, final.usage), headers=headers)

    # ---- a request's steps -----------------------------------------------------------------------------------------
    def _decoders(self) -> "anyio.CapacityLimiter":
        """Worker threads that parse requests and decode their images: a few (decode_threads), not anyio's 40. They bound
        the images being decoded at once, and each thread that decodes grows a malloc arena of its own (with 40, idle
        RSS wandered 150-195 MB over 1,200 requests of the tiny artifact)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.decode_threads)
        return self._limiter
    async def _body(self, request: HttpRequest) -> bytes:
        """The body, up to max_body_bytes; past it a 413 (the rest is read and dropped, so the client sees the answer)."""
        limit, declared = self.config.max_body_bytes, request.headers.get("content-length", "")
        chunks: list[bytes] | None = [] if not (declared.isdigit() and int(declared) > limit) else None
        size = 0
        async for piece in request.stream():
            size += len(piece)
            if chunks is not None and size <= limit:
                chunks.append(piece)
            else:
                chunks = None  # dropped as it arrives: a large body costs no memory
        if chunks is None:
            raise ApiError(413, f"the request body is {size:,} bytes, over this server's --max-body-mb "
                           f"{self.config.max_body_mb:g} ({limit:,} bytes)", code="request_too_large")
        return b"".join(chunks)

    def _submit(self, body: bytes, deliver: Callable[[Event], None]) -> tuple[Any, int]:
        """(worker thread) parse, decode the image, render the chat prompt, queue it -> (the ChatCall, its ticket)."""
        call = parse_chat(body, self.default_max_tokens, self.images)
        try:
            prompt = self.engine.pipeline.chat_prompt(list(call.messages))
        except PromptError as exc:  # roles, parts
            raise ApiError(400, str(exc), "messages", "invalid_prompt") from None
        return call, _refusal(lambda: self.engine.submit(Request(call.images, prompt, call.config, call.stop), deliver))

    async def _answer(self, queue: asyncio.Queue, request: HttpRequest, ticket: int) -> tuple[str, Event] | None:
        """Collect a non-streamed answer; a client that disconnects meanwhile cancels it (-> None)."""
        async def collect() -> tuple[str, Event]:
            pieces = []
            while True:
                event = await queue.get()
                pieces.append(event.text)
                if event.finish is not None:
                    return "".join(pieces), event

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        answer, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                self.engine.cancel(ticket)
        if not answer.done() or answer.cancelled():
            return None  # the client is gone: nothing to send
        return answer.result()

    async def _stream(self, queue: asyncio.Queue, cid: str, include_usage: bool, state: dict) -> AsyncIterator[bytes]:
        """OpenAI's chunks: the role, content deltas, the finish reason (and usage), then `data: [DONE]`."""
        model = self.card["id"]
        yield sse(chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            event: Event = await queue.get()
            if event.text:
                yield sse(chunk(cid, model, {"content": event.text}))
            if event.finish is None:
                continue
            state["finished"] = True
            if event.finish in ("stop", "length"):
                yield sse(chunk(cid, model, {}, event.finish))
                if include_usage:
                    yield sse(chunk(cid, model, {}, usage=event.usage))
            else:  # a server fault (logged by the engine), or the server shutting down
                message = f"the server failed on this request (logged): {event.error}" if event.finish == "error" else SHUT_DOWN
                yield sse(error_body(message, "server_error", code="internal_error" if event.finish == "error" else "shutting_down"))
            yield sse("[DONE]")
            state["sent"] = True
            return

    def _release(self, ticket: int, state: dict) -> bool:
        """A stream is over: if its answer is not, the client is gone (or the drain timed out): free its row. -> whether
        the server is stopping."""
        stopping = bool(self.uvicorn and self.uvicorn.should_exit)
        if not state["finished"]:
            self.engine.cancel(ticket)
        if not state["sent"]:
            self.cut += stopping
        return stopping

    # ---- errors and lifespan ---------------------------------------------------------------------------------------
    async def _api_error(self, request: HttpRequest, exc: ApiError) -> Response:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def _http_error(self, request: HttpRequest, exc: HTTPException) -> Response:
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, code="not_found" if exc.status_code == 404 else "method_not_allowed"),
                            status_code=exc.status_code, headers=exc.headers)

    async def _fault(self, request: HttpRequest, exc: Exception) -> Response:
        """A server fault: 500 (Starlette re-raises it afterwards, and uvicorn logs its traceback)."""
        return JSONResponse(error_body(f"internal server error (logged): {type(exc).__name__}", "server_error", code="internal_error"),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(self.engine.shutdown, 0.0)  # uvicorn has drained (or cut) the requests by now


def _refusal(submit: Callable[[], Any]) -> Any:
    """submit() with the engine's refusals as HTTP errors: a full queue 429, shutting down 503 (both with Retry-After),
    a prompt over the exported maximum 400."""
    try:
        return submit()
    except QueueFullError as exc:
        raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full", retry_after_s=exc.retry_after_s) from None
    except EngineClosedError as exc:
        raise ApiError(503, str(exc), kind="server_error", code="shutting_down", retry_after_s=exc.retry_after_s) from None
    except (PromptError, ConfigError) as exc:
        raise ApiError(400, str(exc), "messages", "invalid_prompt") from None


class _EngineStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` once it is over: finished, its client gone, or cut at shutdown (the
    drain's cancellation ends it quietly: on_close says the server is stopping)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], bool], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            if not self.on_close():
                raise
            return
        self.on_close()


def bind(config: HttpConfig) -> socket.socket:
    """The listening socket (port 0: a free one); a port in use or a bad host is one ConfigError line."""
    try:
        family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((config.host, config.port), family=family, backlog=2048)
        # Connections inherit it: without, a response's headers and body (two writes) wait on the client's delayed ACK
        # (40 ms a request on Linux); uvicorn's own sockets have it, a socket handed to it does not.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except OSError as exc:
        raise ConfigError(f"--host {config.host} --port {config.port}: cannot listen there ({exc.strerror or exc})") from None


def make_server(server: HttpServer) -> "uvicorn.Server":
    """uvicorn around the app: graceful shutdown waits --drain-s (the engine's drain_s) for in-flight requests."""
    config = uvicorn.Config(server.asgi, interface="asgi3", lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=server.engine.config.drain_s)
    server.uvicorn = uvicorn.Server(config)
    return server.uvicorn


def serve_http(engine: Any, config: HttpConfig, sock: socket.socket, announce: Callable[[str], None] = print) -> int:
    """Serve until SIGTERM / Ctrl-C (main thread): -> 0 after a graceful stop (KeyboardInterrupt for Ctrl-C: exit 130)."""
    server = HttpServer(engine, config)
    host, port = sock.getsockname()[:2]
    card = server.card
    announce(f"prunert serve: http://{host}:{port}/v1 - model {card['id']} ({card['family']}, K={card['K']} of N={card['N']}, "
             f"{card['method']}; {card['backend']} {card['precision']}; max batch {engine.max_batch}, queue {engine.config.max_queue})")
    sys.stdout.flush()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # uvicorn re-raises SIGTERM once it has stopped
    try:
        make_server(server).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"prunert serve: stopped; {server.cut} requests were cut at --drain-s {engine.config.drain_s:g}" if server.cut
          else "prunert serve: stopped; every in-flight request finished", file=sys.stderr)
    return 0
