"""The scheduler every server shares (the OpenAI-compatible HTTP server and the Triton model): continuous batching
over one VLMPipeline, on one worker thread.

submit() checks a request (its prompt tokenizes within the artifact's limits) and queues it; the worker admits
queued requests between decode steps, each after its own vision call and prefill (batch 1), into the running
DecodeBatch (prunert.runtime.decode), runs one decoder call over every row held, and hands each row's new text to
its request's `deliver` callback. A row leaves at EOS, a stop string, its token budget or a cancel (a client gone),
at the next step. So a long answer never holds a new request's first token back for more than one step plus the
new request's own prefill.

Threads: `deliver` runs on the worker thread and must not block (an asyncio server passes call_soon_threadsafe;
Triton a queue put). Everything else may be called from any thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prunert.config import GenerationConfig
from prunert.errors import PrunertError
from prunert.runtime.decode import DecodeBatch, RowEvent, table_embedder
from prunert.runtime.pipeline import VLMPipeline, prompt_images
from prunert.serving.config import EngineConfig
from prunert.serving.metrics import EngineMetrics

LOG = logging.getLogger("prunert.serve")


class QueueFullError(PrunertError):
    """The request queue is at --max-queue (HTTP 429, with Retry-After)."""

    retry_after_s = 1


class EngineClosedError(PrunertError):
    """The server is shutting down and takes no new requests (HTTP 503, with Retry-After)."""

    retry_after_s = 5


@dataclass(frozen=True)
class Request:
    image: Any  # a decoded RGB image (PIL.Image or [H, W, 3] uint8) or a path; or a tuple of them (several images, in order)
    prompt: str  # one image placeholder per image, or none (a rendered chat template, or the user's own; pipeline.tokenize)
    config: GenerationConfig = GenerationConfig()
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # text tokens + the kept visual tokens, as the decoder saw them
    completion_tokens: int
    visual_kept: int  # summed over the request's images
    visual_total: int  # the images' own N before pruning, summed
    ttft_s: float  # submit -> first token (queue + vision + prefill)
    kept_indices: tuple[int, ...] = ()  # the kept tokens' indices, image after image


@dataclass(frozen=True)
class Event:
    """One delivery to a request, in order: text pieces, then one final event with `finish` set."""

    text: str  # new text since the previous event ("" is allowed)
    finish: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled", "error"; None: more follows
    usage: Usage | None = None  # on the final event
    error: str | None = None  # finish "error": what failed (a server fault, logged)


Deliver = Callable[[Event], None]


@dataclass
class _Job:
    ticket: int
    request: Request
    sequence: list[int]
    deliver: Deliver
    submitted: float
    ids: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    sent: int = 0  # characters of the answer's text delivered so far
    text: str = ""
    first: float = 0.0
    kept: tuple[int, ...] = ()
    visual_total: int = 0
    images: int = 1  # the request's images (each placeholder of `sequence` becomes one image's kept tokens)


class Engine:
    def __init__(self, pipeline: VLMPipeline, config: EngineConfig = EngineConfig()):
        limit = pipeline.manifest.text.max_batch
        self.pipeline, self.config = pipeline, config
        self.max_batch = min(config.max_batch or limit, limit)
        self.metrics = EngineMetrics()
        text = pipeline.manifest.text
        self._eos = frozenset(text.eos_token_ids)
        self._batch = DecodeBatch(table_embedder(pipeline.artifact.embeddings, pipeline.embeds_dtype), self._eos)
        self._jobs: dict[int, _Job] = {}  # admitted, by ticket
        self._pending: collections.deque[_Job] = collections.deque()
        self._cancelled: set[int] = set()
        self._admitting: set[int] = set()  # taken from the queue, in vision or prefill (in neither _pending nor _jobs)
        self._lock = threading.Condition()
        self._next_ticket = 0
        self._closing = False  # no new requests
        self._stopped = False  # the worker ends once nothing is left
        self._thread = threading.Thread(target=self._run, name="prunert-engine", daemon=True)

    # ---- any thread ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, request: Request, deliver: Deliver) -> int:
        """Queue a request -> its ticket. PromptError for a prompt the artifact cannot take (before anything is queued),
        QueueFullError at max_queue waiting, EngineClosedError while shutting down."""
        images = len(prompt_images(request.image))
        sequence = self.pipeline.tokenize([request.prompt], [images])[0]
        with self._lock:
            self._refuse_if_full()
            ticket = self._next_ticket
            self._next_ticket += 1
            self._pending.append(_Job(ticket, request, sequence, deliver, time.perf_counter(), images=images))
            self.metrics.queue_depth.set(len(self._pending))
            self._lock.notify()
        return ticket

    def check_room(self) -> None:
        """Raise what submit() would for a full queue or a closing engine, now: a server refuses an overload before it
        spends time decoding the request's image (submit checks again)."""
        with self._lock:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:  # under self._lock
        if self._closing:
            raise EngineClosedError("the server is shutting down; retry on another replica")
        if len(self._pending) >= self.config.max_queue:
            self.metrics.rejected.inc()
            raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting); retry later")

    def cancel(self, ticket: int) -> None:
        """The request's client is gone: its row (or queue place) is freed before the next step."""
        with self._lock:
            self._cancelled.add(ticket)
            self._lock.notify()

    def shutdown(self, drain_s: float | None = None) -> bool:
        """Stop taking requests, let in-flight ones finish for up to drain_s (default: the config's), then cancel the
        rest and stop the worker. True if everything finished in time."""
        deadline = time.monotonic() + (self.config.drain_s if drain_s is None else drain_s)
        with self._lock:
            self._closing = True
            self._lock.notify()
            while self._in_flight() and time.monotonic() < deadline and self._thread.is_alive():
                self._lock.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0.0)))
            drained = not self._in_flight()
            self._cancelled.update(job.ticket for job in self._pending)
            self._cancelled.update(self._jobs)
            self._cancelled.update(self._admitting)  # in _admit now: in _jobs by the worker's next look at _cancelled
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)
        return drained

    def _in_flight(self) -> bool:  # under self._lock
        return bool(self._pending or self._jobs or self._admitting)

    @property
    def active(self) -> int:
        return len(self._jobs)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # ---- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._pending or self._jobs or self._cancelled or self._stopped):
                    self._lock.wait()
                cancelled, self._cancelled = self._cancelled, set()
                for job in [j for j in self._pending if j.ticket in cancelled]:
                    self._pending.remove(job)
                    self._finish(job, "cancelled")
                admit = []
                while self._pending and len(self._jobs) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
                self._admitting = {job.ticket for job in admit}
                self.metrics.queue_depth.set(len(self._pending))
                stop_now = self._stopped and not self._pending and not admit
            for ticket in cancelled & set(self._jobs):
                self._batch.cancel(ticket)
                self._finish(self._jobs.pop(ticket), "cancelled")
            for job in admit:
                self._admit(job)
            with self._lock:
                self._admitting = set()
            self.metrics.active.set(len(self._jobs))
            if self._jobs:
                self._step()
            with self._lock:
                self._lock.notify_all()  # shutdown() waits on the queues emptying
            if stop_now and not self._jobs:
                return

    def _admit(self, job: _Job) -> None:
        """Vision and prefill of one request (batch 1), then its row joins the running batch with its first token."""
        pipe = self.pipeline
        try:
            vision = pipe.encode_images([job.request.image], [job.request.prompt])
            state = pipe.prefill([job.sequence], vision)
            mask, positions, _, choosers, budgets, _, _ = pipe.decode_inputs(state, job.request.config)
        except Exception as exc:  # noqa: BLE001 - a fault in one request must not stop the server
            LOG.exception("request %d: vision or prefill failed", job.ticket)
            self.metrics.errors.inc()
            _send(job, Event("", "error", error=f"{type(exc).__name__}: {exc}"))
            return
        kept, totals = vision.prompt_kept(0)  # per image of the request
        job.kept, job.visual_total = tuple(int(i) for indices in kept for i in indices), sum(totals)
        self._jobs[job.ticket] = job
        (event,) = self._batch.admit(state.session, state.logits[:, -1], mask, positions, choosers, budgets, [job.ticket])
        job.first = time.perf_counter()
        self.metrics.ttft.observe(job.first - job.submitted)
        self._on_event(job, event)

    def _step(self) -> None:
        self.metrics.batch_size.observe(len(self._jobs))
        try:
            events = self._batch.step()
        except Exception as exc:  # noqa: BLE001 - a decoder fault ends the batch's requests, not the server
            LOG.exception("decode step failed")
            self.metrics.errors.inc()
            for ticket in list(self._jobs):
                self._batch.cancel(ticket)
                _send(self._jobs.pop(ticket), Event("", "error", error=f"{type(exc).__name__}: {exc}"))
            return
        for event in events:
            self._on_event(self._jobs[event.handle], event)

    def _on_event(self, job: _Job, event: RowEvent) -> None:
        """A row's token: its new text (held back while it may be the start of a stop string), and its end."""
        if event.token not in self._eos:
            job.ids.append(event.token)
        finish = "stop" if event.finish == "eos" else event.finish
        job.text = self.pipeline.text_of(job.ids)
        end, stopped = _stop_cut(job.text, job.request.stop)
        if stopped:
            finish = "stop"
            if event.finish is None:
                self._batch.cancel(job.ticket)
        if finish is None:
            end = min(end, len(job.text.rstrip("\ufffd")))  # a character split over byte tokens waits for the rest
        piece, job.sent = job.text[job.sent : end], max(job.sent, end)
        if finish is None:
            if piece:
                _send(job, Event(piece))
            return
        job.text = job.text[:end]
        self._jobs.pop(job.ticket, None)
        self._finish(job, finish, piece)

    def _finish(self, job: _Job, finish: str, piece: str = "") -> None:
        now = time.perf_counter()
        decode_s = now - job.first if job.first else 0.0
        if finish in ("stop", "length") and decode_s > 0 and len(job.ids) > 1:
            self.metrics.decode_rate.observe((len(job.ids) - 1) / decode_s)
        self.metrics.requests.inc(finish)
        usage = Usage(len(job.sequence) - job.images + len(job.kept), len(job.ids), len(job.kept), job.visual_total,
                      (job.first or now) - job.submitted, job.kept)
        _send(job, Event(piece, finish, usage))


def _send(job: _Job, event: Event) -> None:
    """deliver() of one request; its failure (a consumer gone wrong) is logged and ends only that request's events."""
    try:
        job.deliver(event)
    except Exception:  # noqa: BLE001
        LOG.exception("request %d: deliver failed", job.ticket)


def _stop_cut(text: str, stops: tuple[str, ...]) -> tuple[int, bool]:
    """-> (how much of `text` may be sent, whether a stop string occurred). With a stop string: the text before its
    first occurrence. Without: all but a tail that could still become a stop string."""
    found = [text.find(s) for s in stops if s and s in text]
    if found:
        return min(found), True
    hold = max((len(s) - 1 for s in stops if s), default=0)
    for size in range(min(hold, len(text)), 0, -1):
        if any(s.startswith(text[-size:]) for s in stops):
            return len(text) - size, False
    return len(text), False
