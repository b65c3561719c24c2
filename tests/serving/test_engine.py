"""The serving scheduler (prunert.serving.engine.Engine): continuous batching over the tiny artifact, with answers equal
to the same requests run alone, stop strings, cancellation, queue limits, faults and a drained shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from prunert.config import GenerationConfig
from prunert.errors import PromptError
from prunert.serving.config import EngineConfig
from prunert.serving.engine import Engine, EngineClosedError, Event, QueueFullError, Request, _stop_cut

REPO = Path(__file__).resolve().parents[2]
IMAGES = [REPO / "examples" / "images" / name for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")]
PROMPTS = ["<image>\nWhat is in the picture?", "<image> a cat?", "<image>\nDescribe the large object on the left."]


class Collector:
    """deliver() for one request: its events, and a flag set by the final one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def final(self) -> Event:
        assert self.done.wait(60), "no final event within 60 s"
        return self.events[-1]


@pytest.fixture
def engine(tiny_pipeline):
    running = Engine(tiny_pipeline, EngineConfig(max_batch=4, max_queue=16)).start()
    yield running
    running.shutdown(drain_s=0)


def _request(row: int, tokens: int, **config) -> Request:
    return Request(IMAGES[row % 3], PROMPTS[row % 3], GenerationConfig(max_new_tokens=tokens, **config))


def test_concurrent_requests_get_their_answers_alone(engine, tiny_pipeline) -> None:
    budgets = [7, 3, 11, 5, 9, 2]  # six requests, four rows: two wait in the queue and join as rows free
    collectors = [Collector() for _ in budgets]
    for row, (tokens, collect) in enumerate(zip(budgets, collectors)):
        engine.submit(_request(row, tokens), collect)
    for row, (tokens, collect) in enumerate(zip(budgets, collectors)):
        alone = tiny_pipeline.generate([IMAGES[row % 3]], [PROMPTS[row % 3]], GenerationConfig(max_new_tokens=tokens))[0]
        final = collect.final
        assert collect.text == alone.text and final.finish == "length"
        usage = final.usage
        assert usage.completion_tokens == len(alone.token_ids) == tokens
        assert usage.visual_kept == len(alone.kept_indices) and usage.visual_total == alone.num_visual_tokens
        sequence = tiny_pipeline.tokenize([PROMPTS[row % 3]])[0]
        assert usage.prompt_tokens == len(sequence) - 1 + usage.visual_kept  # the placeholder became K visual tokens
        assert list(usage.kept_indices) == alone.kept_indices.tolist()
    assert engine.active == 0 and engine.waiting == 0


def test_a_long_answer_does_not_hold_back_a_new_request(engine) -> None:
    long, short = Collector(), Collector()

    def long_then_short(event: Event) -> None:  # on the long answer's 3rd piece (engine thread), a new request arrives
        long(event)
        if len(long.events) == 3:
            engine.submit(_request(1, 2), short)

    engine.submit(_request(2, 40), long_then_short)
    assert short.final.finish == "length"
    assert not long.done.is_set()  # the short request joined the running batch and finished first
    assert long.final.usage.completion_tokens == 40


def test_a_stop_string_ends_the_answer_before_it(engine, tiny_pipeline) -> None:
    alone = tiny_pipeline.generate([IMAGES[0]], [PROMPTS[0]], GenerationConfig(max_new_tokens=12))[0].text
    assert len(alone) >= 6, alone
    stop = alone[len(alone) // 2 : len(alone) // 2 + 3]
    collect = Collector()
    engine.submit(Request(IMAGES[0], PROMPTS[0], GenerationConfig(max_new_tokens=12), (stop,)), collect)
    assert collect.final.finish == "stop" and collect.text == alone[: alone.find(stop)]


def test_stop_cut_holds_back_what_may_become_a_stop_string() -> None:
    assert _stop_cut("hello wor", ("world",)) == (6, False)  # "wor" may start "world"
    assert _stop_cut("hello world!", ("world",)) == (6, True)
    assert _stop_cut("abc", ()) == (3, False) and _stop_cut("abc", ("x", "c")) == (2, True)


def test_cancel_frees_the_row_and_the_engine_serves_on(engine, tiny_pipeline) -> None:
    gone, after = Collector(), Collector()
    ticket = []

    def cancel_on_first(event: Event) -> None:  # the client goes away after its first piece
        gone(event)
        if len(gone.events) == 1:
            engine.cancel(ticket[0])

    ticket.append(engine.submit(_request(0, 40), cancel_on_first))
    assert gone.final.finish == "cancelled" and gone.final.usage.completion_tokens < 40
    engine.submit(_request(1, 4), after)
    alone = tiny_pipeline.generate([IMAGES[1]], [PROMPTS[1]], GenerationConfig(max_new_tokens=4))[0]
    assert after.final.finish == "length" and after.text == alone.text and engine.active == 0


def test_the_queue_limit_and_prompt_errors_refuse_before_queueing(tiny_pipeline) -> None:
    idle = Engine(tiny_pipeline, EngineConfig(max_batch=1, max_queue=2))  # not started: nothing leaves the queue
    idle.submit(_request(0, 2), Collector())
    idle.submit(_request(1, 2), Collector())
    with pytest.raises(QueueFullError, match=r"the queue is full \(2 requests waiting\)"):
        idle.submit(_request(2, 2), Collector())
    with pytest.raises(PromptError, match="image placeholder"):
        idle.submit(Request(IMAGES[0], "<image> <image> two?", GenerationConfig()), Collector())
    assert idle.waiting == 2 and "prunert_requests_rejected_total 1" in idle.metrics.render()


def test_a_fault_in_one_request_is_an_error_event_and_others_go_on(engine, tmp_path: Path) -> None:
    broken, fine = Collector(), Collector()
    engine.submit(Request(tmp_path / "missing.jpg", PROMPTS[0], GenerationConfig(max_new_tokens=3)), broken)
    engine.submit(_request(1, 3), fine)
    assert broken.final.finish == "error" and "missing.jpg" in broken.final.error
    assert fine.final.finish == "length"
    assert "prunert_engine_errors_total 1" in engine.metrics.render()


def test_shutdown_drains_in_flight_requests_then_refuses(tiny_pipeline) -> None:
    running = Engine(tiny_pipeline, EngineConfig(max_batch=2)).start()
    collectors = [Collector() for _ in range(3)]
    for row, collect in enumerate(collectors):
        running.submit(_request(row, 6), collect)
    assert running.shutdown(drain_s=60)
    assert [c.final.finish for c in collectors] == ["length"] * 3
    with pytest.raises(EngineClosedError, match="shutting down"):
        running.submit(_request(0, 2), Collector())
    text = running.metrics.render()
    assert 'prunert_requests_total{finish="length"} 3' in text and "prunert_time_to_first_token_seconds_count 3" in text


def test_shutdown_past_its_drain_time_cancels_the_rest(tiny_pipeline) -> None:
    running = Engine(tiny_pipeline, EngineConfig(max_batch=1)).start()
    gate, step = threading.Event(), running._batch.step

    def gated_step():  # decode waits until shutdown has given up draining
        assert gate.wait(30)
        return step()

    running._batch.step = gated_step
    first, queued = Collector(), Collector()
    running.submit(_request(0, 40), first)
    running.submit(_request(1, 40), queued)
    drained: list[bool] = []
    stopper = threading.Thread(target=lambda: drained.append(running.shutdown(drain_s=0)))
    stopper.start()
    while not running._stopped:
        time.sleep(0.001)
    gate.set()
    stopper.join(30)
    assert drained == [False]
    assert first.final.finish == queued.final.finish == "cancelled"
