"""The model worker on the stub backend: continuous batching, streaming, cancellation, admission, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from erllama.errors import DecodeError, InvalidInputError, RequestFailedError, WorkerStoppedError
from erllama.model import (
    AdmittedEvent,
    BatchingConfig,
    DecodeItem,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    Phase,
    SamplerConfig,
    StubBackend,
    TokenEvent,
)
from erllama.model.config import WorkerConfig
from erllama.model.request import GenerateRequest
from erllama.model.worker import ModelWorker


def reference(prompt: list[int], n: int, **stub_kw: object) -> list[int]:
    """Greedy continuation computed directly on a fresh stub, the way the worker does it."""
    b = StubBackend(**stub_kw)  # type: ignore[arg-type]
    (row,) = b.decode([DecodeItem(0, prompt)])
    out: list[int] = []
    while len(out) < n:
        assert row is not None
        token = b.sample(0, row)
        if token in b.info.eog_tokens:
            break
        out.append(token)
        (row,) = b.decode([DecodeItem(0, [token])])
    return out


@pytest.fixture
def worker() -> Iterator[ModelWorker]:
    w = ModelWorker(lambda: StubBackend(n_seq_max=3, n_batch=64, eos_bias=-50.0), name="stub")
    w.start()
    yield w
    w.stop()


def test_streams_tokens_and_finishes_at_max_tokens(worker: ModelWorker) -> None:
    prompt = StubBackend().tokenize("hello there")
    handle = worker.submit(GenerateRequest(prompt, max_tokens=20))
    events = list(handle.events(timeout_s=10))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.finish_reason is FinishReason.LENGTH
    assert [t.token for t in tokens] == list(done.tokens) == reference(prompt, 20, eos_bias=-50.0)
    assert "".join(t.text for t in tokens) == done.text
    assert done.prompt_tokens == len(prompt)


def test_parallel_requests_match_sequential_ones(worker: ModelWorker) -> None:
    prompts = [StubBackend().tokenize(f"request number {i} " * (i + 1)) for i in range(7)]
    handles = [worker.submit(GenerateRequest(p, max_tokens=15)) for p in prompts]
    results = [h.result(timeout_s=20) for h in handles]
    for p, r in zip(prompts, results, strict=True):
        assert list(r.tokens) == reference(p, 15, eos_bias=-50.0)


def test_a_long_prefill_does_not_freeze_other_streams() -> None:
    batches: list[list[tuple[int, int]]] = []

    class Recording(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            batches.append([(i.seq_id, len(i.tokens)) for i in items])
            return super().decode(items)

    w = ModelWorker(lambda: Recording(n_seq_max=2, n_batch=32, n_ctx_seq=8192, eos_bias=-50.0), name="s")
    w.start()
    try:
        short = w.submit(GenerateRequest(StubBackend().tokenize("hi"), max_tokens=40))
        long = w.submit(
            GenerateRequest(StubBackend().tokenize("x" * 3000), max_tokens=1)
        )  # ~94 chunks of at most 32 tokens
        assert short.result(timeout_s=10).finish_reason is FinishReason.LENGTH
        assert long.result(timeout_s=20).finish_reason is FinishReason.LENGTH
    finally:
        w.stop()
    assert all(sum(n for _, n in b) <= 32 for b in batches), "no batch exceeds n_batch"
    mixed = [b for b in batches if len(b) == 2]
    assert len(mixed) >= 30, "decode rows of the short stream rode along with the long prefill's chunks"
    last_short = max(i for i, b in enumerate(batches) if any(n == 1 and s != 1 for s, n in b))
    long_chunks = [i for i, b in enumerate(batches) if any(n > 1 for _, n in b)]
    assert last_short < long_chunks[-1], "the short stream finished while the long prompt was still prefilling"


def test_requests_take_the_lowest_free_sequences() -> None:
    # With a KV stream per sequence llama.cpp cuts a micro-batch at every gap in the ids, so a request must take
    # the lowest free sequence (a FIFO of freed ids would hand out 1, 2, 3, 0 after one request on 0 finished).
    batches: list[list[int]] = []

    class Recording(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            batches.append([i.seq_id for i in items])
            return super().decode(items)

    w = ModelWorker(lambda: Recording(n_seq_max=4, eos_bias=-50.0), name="low")
    w.start()
    try:
        w.submit(GenerateRequest(StubBackend().tokenize("first"), max_tokens=2)).result(timeout_s=10)
        handles = [w.submit(GenerateRequest(StubBackend().tokenize(f"then {i}"), max_tokens=8)) for i in range(3)]
        for h in handles:
            h.result(timeout_s=10)
    finally:
        w.stop()
    assert {s for b in batches for s in b} == {0, 1, 2}
    assert max(len(b) for b in batches) == 3, "the three ran together"


def test_no_scrap_of_a_prompt_rides_along_with_another_prefill() -> None:
    # llama.cpp splits a batch into micro-batches of equal tokens per sequence: a 20-token cut of a second prompt
    # next to a 100-token chunk would cost a pass over the weights of its own. It waits for the next tick instead.
    batches: list[list[tuple[int, int]]] = []

    class Recording(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            batches.append([(i.seq_id, len(i.tokens)) for i in items])
            return super().decode(items)

    prompts = [StubBackend().tokenize(f"prompt {i} " + "x" * 100) for i in range(3)]
    n = len(prompts[0])
    w = ModelWorker(lambda: Recording(n_seq_max=4, n_batch=128, eos_bias=-50.0), name="scrap")
    w.start()
    try:
        handles = [w.submit(GenerateRequest(p, max_tokens=4)) for p in prompts]
        for h in handles:
            assert h.result(timeout_s=10).finish_reason is FinishReason.LENGTH
    finally:
        w.stop()
    fed: dict[int, int] = {}
    for batch in batches:
        chunks = [(s, k) for s, k in batch if k > 1]
        for s, k in chunks[1:]:  # the first prompt of a batch takes what it can; the others are whole or >= 64
            assert k >= 64 or fed.get(s, 0) + k >= n - 1, batch
        for s, k in batch:
            fed[s] = fed.get(s, 0) + k
    assert all(sum(k for _, k in b) <= 128 for b in batches)


def test_a_closed_consumer_loop_cancels_its_request() -> None:
    w = ModelWorker(
        lambda: StubBackend(n_seq_max=1, n_ctx_seq=8192, step_delay_s=0.0005, eos_bias=-50.0), name="closed"
    )
    w.start()
    try:
        loop = asyncio.new_event_loop()
        orphan = w.submit(GenerateRequest(StubBackend().tokenize("nobody listens"), max_tokens=5000))
        orphan.async_queue(loop)
        loop.close()
        deadline = time.monotonic() + 10
        while not orphan.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert orphan.cancelled, "a post to the closed loop cancels the request"
        nxt = w.submit(GenerateRequest(StubBackend().tokenize("next"), max_tokens=3))  # the only sequence was freed
        assert nxt.result(timeout_s=10).finish_reason is FinishReason.LENGTH
    finally:
        w.stop()


def _consume(w: ModelWorker, prompt: str, max_tokens: int) -> list[object]:
    """Run one request to its end through an asyncio consumer (the server's path), with a timeout per event."""

    async def go() -> list[object]:
        handle = w.submit(GenerateRequest(StubBackend().tokenize(prompt), max_tokens=max_tokens))
        aq = handle.async_queue(asyncio.get_running_loop())
        events: list[object] = []
        while not events or not isinstance(events[-1], DoneEvent | ErrorEvent):
            events.append(await asyncio.wait_for(aq.get(), 10))
        return events

    return asyncio.run(go())


def test_a_decode_that_fails_still_wakes_the_loop_for_the_step_before_it() -> None:
    # A decode fails mid-stream (while the last token's wake-up is held for it): the consumer still gets every
    # token sampled before it, then the error, instead of waiting forever.
    sampled_from: list[int] = []

    class Failing(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            if len(sampled_from) == 5:
                raise DecodeError("injected failure", -3)
            rows = super().decode(items)
            sampled_from.extend(r for r in rows if r is not None)
            return rows

    w = ModelWorker(lambda: Failing(n_seq_max=1, eos_bias=-50.0), name="failing")
    w.start()
    try:
        events = _consume(w, "hello", 50)
    finally:
        w.stop()
    assert [type(e) for e in events] == [AdmittedEvent] + [TokenEvent] * 5 + [ErrorEvent]


def test_cancel_during_prefill_and_generation_frees_the_sequence() -> None:
    w = ModelWorker(
        lambda: StubBackend(n_seq_max=1, n_batch=16, n_ctx_seq=8192, step_delay_s=0.0005, eos_bias=-50.0), name="c"
    )
    w.start()
    try:
        slow = w.submit(GenerateRequest(StubBackend().tokenize("y" * 2000), max_tokens=5))
        time.sleep(0.05)
        slow.cancel()
        done = slow.result(timeout_s=10)
        assert done.finish_reason is FinishReason.CANCELLED
        assert done.tokens == ()

        gen = w.submit(GenerateRequest(StubBackend().tokenize("go"), max_tokens=5000))
        seen = 0
        for event in gen.events(timeout_s=10):
            if isinstance(event, TokenEvent):
                seen += 1
                if seen == 3:
                    gen.cancel()
            elif not isinstance(event, AdmittedEvent):
                assert isinstance(event, DoneEvent)
                assert event.finish_reason is FinishReason.CANCELLED
                assert seen <= 4, "observed within one token"
                assert len(event.tokens) == seen
        # the only sequence was freed: the next request runs normally
        after = w.submit(GenerateRequest(StubBackend().tokenize("again"), max_tokens=3)).result(timeout_s=10)
        assert after.finish_reason is FinishReason.LENGTH
        assert w.in_flight == 0
    finally:
        w.stop()


def test_admission_waits_for_a_free_sequence(worker: ModelWorker) -> None:
    handles = [worker.submit(GenerateRequest(StubBackend().tokenize(f"q{i}"), max_tokens=5)) for i in range(10)]
    assert all(h.result(timeout_s=20).finish_reason is FinishReason.LENGTH for h in handles)


def test_seeded_sampling_is_reproducible_through_the_worker(worker: ModelWorker) -> None:
    cfg = SamplerConfig(temperature=1.0, top_k=40, seed=5)
    prompt = StubBackend().tokenize("sample me")
    a = worker.submit(GenerateRequest(prompt, max_tokens=12, sampling=cfg)).result(timeout_s=10)
    b = worker.submit(GenerateRequest(prompt, max_tokens=12, sampling=cfg)).result(timeout_s=10)
    assert a.tokens == b.tokens


def test_bad_requests(worker: ModelWorker) -> None:
    with pytest.raises(InvalidInputError):
        worker.submit(GenerateRequest([], max_tokens=1))
    too_long = worker.submit(GenerateRequest([5] * 5000, max_tokens=10))
    event = next(too_long.events(timeout_s=10))
    assert isinstance(event, ErrorEvent)
    assert isinstance(event.error, InvalidInputError)
    assert (
        worker.submit(GenerateRequest([5, 6], max_tokens=2)).result(timeout_s=10).finish_reason is FinishReason.LENGTH
    )


def test_a_crashing_backend_fails_requests_instead_of_hanging() -> None:
    class Exploding(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            raise RuntimeError("kaboom")

    w = ModelWorker(Exploding, name="boom")
    w.start()
    handle = w.submit(GenerateRequest([5, 6, 7], max_tokens=3))
    events = list(handle.events(timeout_s=10))
    assert isinstance(events[-1], ErrorEvent)
    assert isinstance(events[-1].error, WorkerStoppedError)
    assert "kaboom" in str(events[-1].error.__cause__)
    late = w.submit(GenerateRequest([5], max_tokens=1))
    assert isinstance(next(late.events(timeout_s=10)), ErrorEvent)
    w.stop()


def test_a_failing_load_is_raised_by_start() -> None:
    def factory() -> StubBackend:
        raise OSError("no such model")

    w = ModelWorker(factory, name="x")
    with pytest.raises(OSError, match="no such model"):
        w.start()


def test_backend_lives_and_dies_on_the_worker_thread() -> None:
    threads: list[int] = []

    class Recording(StubBackend):
        def __init__(self) -> None:
            threads.append(threading.get_ident())
            super().__init__()

        def close(self) -> None:
            threads.append(threading.get_ident())
            super().close()

    w = ModelWorker(Recording, name="r")
    w.start()
    w.submit(GenerateRequest([5, 6], max_tokens=1)).result(timeout_s=10)
    w.stop()
    assert len(threads) == 2
    assert threads[0] == threads[1] != threading.get_ident()


def test_phase_and_counters_are_published() -> None:
    w = ModelWorker(lambda: StubBackend(n_seq_max=1, n_batch=8, n_ctx_seq=8192, step_delay_s=0.001), name="p")
    w.start()
    try:
        handle = w.submit(GenerateRequest(StubBackend().tokenize("z" * 400), max_tokens=200))
        seen = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Phase.GENERATING not in seen:
            seen.add(w.phase)
            time.sleep(0.001)
        assert {Phase.PREFILLING, Phase.GENERATING} <= seen
        assert w.in_flight == 1
        handle.cancel()
        handle.result(timeout_s=10)
        deadline = time.monotonic() + 5
        while w.phase is not Phase.IDLE and time.monotonic() < deadline:
            time.sleep(0.001)
        assert w.phase is Phase.IDLE
        assert w.in_flight == 0
        assert w.queue_depth == 0
    finally:
        w.stop()


def test_stop_sequences_end_and_trim_the_reply(worker: ModelWorker) -> None:
    prompt = StubBackend().tokenize("stop test")
    free = worker.submit(GenerateRequest(prompt, max_tokens=60)).result(timeout_s=10)
    assert len(free.text) > 20
    stop = free.text[10:13]  # a stop string that really occurs, across token boundaries or not
    stopped = worker.submit(GenerateRequest(prompt, max_tokens=60, stop=[stop, "never-happens"])).result(timeout_s=10)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.stop_sequence == stop
    assert stopped.text == free.text[: free.text.find(stop)]
    assert len(stopped.tokens) < len(free.tokens)
    with pytest.raises(InvalidInputError):
        worker.submit(GenerateRequest(prompt, stop=[""]))


@pytest.mark.parametrize("batch_wait_s", [1.0, 0.0])
def test_requests_arriving_together_share_the_first_prefill_tick(batch_wait_s: float) -> None:
    # a 200 ms prefill waits up to 100 ms (the default share, 1%, would be 2 ms: too short to test against)
    rules = BatchingConfig(batch_wait_s=batch_wait_s, gather_share=0.5)
    batches: list[list[tuple[int, int]]] = []

    class Recording(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            batches.append([(i.seq_id, len(i.tokens)) for i in items])
            return super().decode(items)

    stub = {"n_seq_max": 3, "n_batch": 512, "eos_bias": -50.0, "step_delay_s": 0.002}
    w = ModelWorker(lambda: Recording(**stub), WorkerConfig(batching=rules), name="g")  # type: ignore[arg-type]
    w.start()
    try:
        w.submit(GenerateRequest(StubBackend().tokenize("w" * 100), max_tokens=0)).result(
            timeout_s=10
        )  # the per-token estimate
        batches.clear()
        first = w.submit(GenerateRequest(StubBackend().tokenize("a" * 100), max_tokens=2))
        time.sleep(0.03)
        second = w.submit(GenerateRequest(StubBackend().tokenize("b" * 100), max_tokens=2))
        assert first.result(timeout_s=10).finish_reason is FinishReason.LENGTH
        assert second.result(timeout_s=10).finish_reason is FinishReason.LENGTH
    finally:
        w.stop()
    together = {seq for seq, _ in batches[0]} == {0, 1}
    assert together is (batch_wait_s > 0), batches[0]


def test_a_worker_fault_during_admission_crashes_the_worker_and_answers_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decode that fails while a request is being admitted (closing another reply) is the worker's fault: the
    worker crashes (its supervisor restarts it) and the request being admitted is answered, not lost."""
    from erllama.model.admission import Admitter
    from erllama.model.apply import WorkerFault

    w = ModelWorker(StubBackend, name="fault")
    w.start()

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            raise RuntimeError("decode failed")
        except RuntimeError as exc:
            raise WorkerFault from exc

    monkeypatch.setattr(Admitter, "admit", failing)
    handle = w.submit(GenerateRequest([5, 6, 7], max_tokens=2))
    events = list(handle.events(timeout_s=10))
    assert isinstance(events[-1], ErrorEvent)
    assert isinstance(events[-1].error, WorkerStoppedError)
    assert isinstance(w.crash, RuntimeError)
    w.stop()


def test_a_request_whose_admission_fails_is_answered_and_frees_its_sequence() -> None:
    class BadSampler(StubBackend):
        def set_sampler(self, seq_id, config):  # type: ignore[no-untyped-def]
            if config.seed == 13:
                raise ValueError("a sampler this request's parameters broke")
            super().set_sampler(seq_id, config)

    w = ModelWorker(lambda: BadSampler(n_seq_max=1), name="bad")
    w.start()
    try:
        for _ in range(5):  # more than any restart budget, and than the one sequence
            bad = w.submit(GenerateRequest([5, 6, 7], max_tokens=2, sampling=SamplerConfig(seed=13)))
            with pytest.raises(RequestFailedError, match="ValueError"):
                bad.result(timeout_s=10)
        assert w.alive
        assert w.crash is None
        assert w.request_failures == 5
        assert (
            w.submit(GenerateRequest([5, 6, 7], max_tokens=2)).result(timeout_s=10).finish_reason is FinishReason.LENGTH
        )
    finally:
        w.stop()


def test_the_stub_is_bound_to_its_thread_like_a_llama_context() -> None:
    """A context call from another thread fails on the stub as on llama.cpp's context, so worker tests catch it."""
    import threading

    from erllama.errors import ThreadAffinityError

    b = StubBackend()
    (row,) = b.decode([DecodeItem(0, b.tokenize("hi"))])
    assert row is not None
    errors: list[BaseException] = []

    def elsewhere() -> None:
        for call in (lambda: b.sample(0, row), lambda: b.decode([DecodeItem(1, [5])]), lambda: b.state_get(0)):
            try:
                call()
            except ThreadAffinityError as exc:
                errors.append(exc)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert len(errors) == 3
    assert b.tokenize("hi") == b.tokenize("hi")  # the vocabulary is not thread-bound (llama.cpp's model is not)
    assert b.sample(0, row) >= 0  # the owner still can
