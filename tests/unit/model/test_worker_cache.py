"""The worker with a cache, on the stub backend: admission (exact, longest prefix, parent_key), saves per policy."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from erllama.cache import CacheStore, FileTier, RamTier, SavePolicy
from erllama.cache.kvc import RowMeta, SaveReason
from erllama.cache.report import parse_header
from erllama.cache.tier import Payload
from erllama.errors import InvalidInputError, StateError
from erllama.model import BatchingConfig, DecodeItem, DoneEvent, FinishReason, StubBackend, TokenEvent
from erllama.model.config import WorkerConfig
from erllama.model.request import GenerateRequest
from erllama.model.worker import ModelWorker

from .test_worker import reference

POLICY = SavePolicy(min_tokens=8, cold_min_tokens=8, continued_interval=0)
STUB = {"n_seq_max": 3, "n_batch": 64, "eos_bias": -50.0}


def text(s: str) -> list[int]:
    return StubBackend().tokenize(s)


def more(s: str) -> list[int]:
    return StubBackend().tokenize(s, add_special=False)


class Recording(StubBackend):
    """A stub that records each batch as (seq_id, n_tokens, logits) triples."""

    batches: list[list[tuple[int, int, bool]]]

    def decode(self, items):  # type: ignore[no-untyped-def]
        self.batches.append([(i.seq_id, len(i.tokens), i.logits) for i in items])
        return super().decode(items)


class SlowRam(RamTier):
    """A RAM tier whose every publish first calls ``before`` (waits on a gate, sleeps)."""

    def __init__(self, before: Callable[[], object]) -> None:
        super().__init__(1 << 22)
        self._before = before

    def publish(self, meta: RowMeta, payload: Payload) -> bool:
        self._before()
        return super().publish(meta, payload)


def closes(backend: StubBackend, items: Sequence[DecodeItem], n_prompt: int) -> bool:
    """Whether a decode commits a finished reply's last token (one token, no logits, past the prompt)."""
    return any(not i.logits and len(i.tokens) == 1 and backend.seq_len(i.seq_id) > n_prompt for i in items)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CacheStore]:
    s = CacheStore([RamTier(1 << 22), FileTier([tmp_path], 1 << 24)])
    yield s
    s.close()


def make_worker(store: CacheStore, policy: SavePolicy = POLICY, **stub: object) -> ModelWorker:
    kw = {**STUB, **stub}
    w = ModelWorker(lambda: StubBackend(**kw), WorkerConfig(cache=store, policy=policy), name="stub")  # type: ignore[arg-type]
    w.start()
    return w


def settle(store: CacheStore) -> None:
    """Wait until every queued save is published."""
    assert store.drain(10)


def run(w: ModelWorker, prompt: list[int], n: int = 12, **kw: object) -> DoneEvent:
    return w.submit(GenerateRequest(prompt, max_tokens=n, **kw)).result(timeout_s=20)  # type: ignore[arg-type]


def test_repeated_prompt_is_an_exact_hit_with_the_same_reply(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        prompt = text("the quick brown fox jumps over the lazy dog")
        cold = run(w, prompt)
        settle(store)
        warm = run(w, prompt)
    finally:
        w.stop()
    assert (cold.cache_hit, cold.restored_tokens, cold.prefilled_tokens) == ("cold", 0, len(prompt))
    assert (warm.cache_hit, warm.restored_tokens, warm.prefilled_tokens) == ("exact", len(prompt) - 1, 1)
    assert warm.tokens == cold.tokens == tuple(reference(prompt, 12, eos_bias=-50.0))
    snap = store.counters.snapshot()
    assert snap["saves_cold"] == 1, "the prompt minus its last token, while prefilling"
    assert snap["saves_finish"] == 1, "the second finish row is the same context: already cached"
    assert snap["saves_already_cached"] == 1
    assert snap["hits_exact"] == 1
    assert snap["misses"] == 1
    assert w.last_hit is not None
    assert w.last_hit.kind == "exact"


def test_longer_prompt_restores_the_longest_prefix(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        base = text("a system prompt that every request shares")
        run(w, base, n=4)
        settle(store)
        longer = [*base, *text(" and a question")[1:]]
        warm = run(w, longer)
    finally:
        w.stop()
    assert warm.cache_hit == "partial"
    # its cold row holds all of base but its last token; its finish row (base + 4 generated) is not a prefix of the
    # longer prompt but shares all of base with it: restored, then cut back to base
    assert warm.restored_tokens == len(base)
    assert warm.prefilled_tokens == len(longer) - len(base)
    assert list(warm.tokens) == reference(longer, 12, eos_bias=-50.0)
    assert store.counters.snapshot()["hits_longest_prefix"] == 1


def test_parent_key_continues_the_previous_context(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        first = run(w, text("turn one of a conversation"), n=10)
        assert first.finish_key is not None
        assert first.committed_tokens == len(first.context_tokens), "the last sampled token was committed"
        follow = text(" turn two")[1:]
        second = run(w, follow, parent_key=first.finish_key)
    finally:
        w.stop()
    context = [*first.context_tokens, *follow]
    assert second.context_tokens[: len(context)] == tuple(context)
    assert second.cache_hit == "partial"
    assert second.restored_tokens == len(first.context_tokens)
    assert list(second.tokens) == reference(context, 12, eos_bias=-50.0)
    assert store.counters.snapshot()["hits_resume"] == 1


def test_parent_key_waits_for_an_in_flight_finish_save_and_is_woken_by_it(tmp_path: Path) -> None:
    release = threading.Event()
    store = CacheStore([SlowRam(lambda: release.wait(5))])
    w = make_worker(store, SavePolicy(min_tokens=8, cold_min_tokens=8, session_resume_wait_ms=5000))
    try:
        first = run(w, text("a first turn that is long enough"), n=6)
        assert first.finish_key is not None
        assert store.pending(first.finish_key)
        # it may wait a minute, and idles a minute between looks at its inbox: only the save's completion wakes it
        # in time for the 10 s result below (no polling)
        patient = dataclasses.replace(w.config.policy, session_resume_wait_ms=60_000)
        other = ModelWorker(
            lambda: StubBackend(**STUB),  # type: ignore[arg-type]
            WorkerConfig(cache=store, policy=patient, idle_wait_s=60.0),
            name="other",
        )
        other.start()
        try:
            # another worker does not remember the key: it must wait for the save to learn the context
            handle = other.submit(GenerateRequest(text(" ?!")[1:], max_tokens=3, parent_key=first.finish_key))
            time.sleep(0.2)
            assert other.in_flight == 0, "parked while the parent's save is in flight"
            release.set()
            second = handle.result(timeout_s=10)
        finally:
            other.stop()
    finally:
        release.set()
        w.stop()
        store.close()
    assert second.context_tokens[: len(first.context_tokens)] == first.context_tokens
    assert second.cache_hit == "partial"
    assert second.restored_tokens == len(first.context_tokens)


def test_unknown_parent_key_is_a_clear_error(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        handle = w.submit(GenerateRequest(text("x"), max_tokens=2, parent_key=b"\0" * 32))  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="unknown parent_key"):
            handle.result(timeout_s=5)
        assert run(w, text("still serving"), n=2).finish_reason is FinishReason.LENGTH
    finally:
        w.stop()


def test_prefill_only_saves_the_whole_prompt(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        prompt = text("prefill me and keep the state warm")
        done = run(w, prompt, n=0)
        assert done.tokens == ()
        assert done.finish_key is not None
        assert done.committed_tokens == len(prompt)
        settle(store)
        assert done.finish_key in store
        follow = text(" go on")[1:]
        cont = run(w, follow, parent_key=done.finish_key)
    finally:
        w.stop()
    assert cont.restored_tokens == len(prompt)
    assert list(cont.tokens) == reference([*prompt, *follow], 12, eos_bias=-50.0)


def test_cold_save_point_and_last_token_in_its_own_step(store: CacheStore) -> None:
    Recording.batches = []
    policy = SavePolicy(min_tokens=8, cold_min_tokens=8, boundary_align_tokens=16, continued_interval=0)
    w = ModelWorker(lambda: Recording(**STUB), WorkerConfig(cache=store, policy=policy), name="rec")  # type: ignore[arg-type]
    w.start()
    try:
        prompt = text("y" * 100)  # 101 tokens: cold point 96, chunks of at most 64
        run(w, prompt, n=2)
    finally:
        w.stop()
    sizes = [b[0][1] for b in Recording.batches]
    logits = [b[0][2] for b in Recording.batches]
    assert sizes[:4] == [64, 32, 4, 1], "chunks stop at the cold save point and before the last token"
    assert logits[:4] == [False, False, False, True]
    settle(store)
    assert store.counters.snapshot()["saves_cold"] == 1
    assert store.index.longest_prefix(w.link.namespace, prompt) is not None  # type: ignore[union-attr]


def test_continued_saves_during_long_generations(store: CacheStore) -> None:
    w = make_worker(store, SavePolicy(min_tokens=8, cold_min_tokens=8, continued_interval=10))
    try:
        run(w, text("generate a while"), n=35)
    finally:
        w.stop()
    settle(store)
    assert store.counters.snapshot()["saves_continued"] == 3


def test_stop_saves_live_sequences_and_a_fresh_worker_hits(store: CacheStore) -> None:
    w = make_worker(store, step_delay_s=0.005)
    prompt = text("a long running generation")
    handle = w.submit(GenerateRequest(prompt, max_tokens=2000))
    events = handle.events(timeout_s=10)
    for _ in range(20):
        next(events)
    w.stop()
    settle(store)
    assert store.counters.snapshot()["saves_shutdown"] == 1
    w2 = make_worker(store)
    try:
        # a prompt that extends what the first worker had committed when it stopped
        rows = [m for tier in store.tiers for m in tier.metas() if m.save_reason.name == "SHUTDOWN"]
        assert rows
        saved = list(rows[0].tokens)
        assert saved[: len(prompt)] == prompt
        assert len(saved) > len(prompt) + 10
        done = run(w2, [*saved, *text("!")[1:]], n=3)
    finally:
        w2.stop()
    assert (done.cache_hit, done.restored_tokens) == ("exact", len(saved))


def test_a_corrupt_row_falls_back_to_cold_and_is_dropped(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        prompt = text("this row will be damaged")
        cold = run(w, prompt, n=5)
        settle(store)
        hit = store.index.longest_prefix(w.link.namespace, prompt, max_tokens=len(prompt) - 1)  # type: ignore[union-attr]
        assert hit is not None
        meta, _ = store.load(hit.key)  # type: ignore[misc]
        for tier in store.tiers:
            tier.remove(hit.key)
        store.tiers[0].publish(meta, b"garbage!" * 3)
        store.index.add(meta.namespace, meta.tokens)
        again = run(w, prompt, n=5)
        settle(store)
        row = store.load(hit.key)
    finally:
        w.stop()
    assert again.cache_hit == "cold"
    assert again.tokens == cold.tokens
    assert store.counters.snapshot()["restore_failures"] == 1
    assert row is not None
    assert bytes(row[1]) != b"garbage!" * 3, "the bad row was dropped, then saved afresh"


def test_models_sharing_a_store_are_kept_apart(store: CacheStore) -> None:
    a = make_worker(store, seed=1)
    b = make_worker(store, seed=2)
    try:
        prompt = text("same prompt, different models")
        run(a, prompt)
        settle(store)
        assert run(b, prompt).cache_hit == "cold"
        assert run(a, prompt).cache_hit == "exact"
    finally:
        a.stop()
        b.stop()


def test_use_cache_false_neither_restores_nor_saves(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        prompt = text("do not cache this request at all")
        run(w, prompt)
        settle(store)
        done = run(w, prompt, use_cache=False)
        assert done.cache_hit == "cold"
        assert done.finish_key is None
        saves = sum(v for k, v in store.counters.snapshot().items() if k.startswith("saves_") and "refused" not in k)
    finally:
        w.stop()
    assert saves == 2, "only the first request saved (cold + finish)"


def test_saves_are_published_off_the_worker_thread(tmp_path: Path) -> None:
    threads: set[str] = set()

    class Watching(RamTier):
        def publish(self, meta: RowMeta, payload: Payload) -> bool:
            threads.add(threading.current_thread().name)
            return super().publish(meta, payload)

    store = CacheStore([Watching(1 << 22)])
    w = make_worker(store)
    try:
        run(w, text("who writes the rows?"))
        settle(store)
    finally:
        w.stop()
        store.close()
    assert threads
    assert not any(name.startswith("erllama-worker") for name in threads)


def test_stub_reference_agrees_with_single_token_steps() -> None:
    """The reference helper decodes the prompt in one batch; the worker splits off the last token. Same model."""
    b = StubBackend()
    prompt = text("split or not")
    (r1,) = b.decode([DecodeItem(0, prompt)])
    assert r1 is not None
    whole = b.sample(0, r1)
    b.decode([DecodeItem(1, prompt[:-1], logits=False)])
    (r2,) = b.decode([DecodeItem(1, prompt[-1:])])
    assert r2 is not None
    assert whole == b.sample(1, r2)


def test_same_document_with_another_question_restores_the_common_prefix(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        doc = text("a long document that several questions are asked about, " * 3)
        first = run(w, [*doc, *text("what is it about?")[1:]], n=4)
        settle(store)
        second_prompt = [*doc, *text("who wrote it?")[1:]]
        second = run(w, second_prompt)
    finally:
        w.stop()
    assert first.cache_hit == "cold"
    common = len(doc) + 2  # the document and "wh", shared by both questions
    assert (second.cache_hit, second.restored_tokens) == ("partial", common)
    assert list(second.tokens) == reference(second_prompt, 12, eos_bias=-50.0)


def test_a_cache_that_cannot_drop_positions_falls_back_to_prefix_rows(store: CacheStore) -> None:
    """Like a sliding-window KV cache: a restored longer row cannot be cut back, so a prefix row (or cold) serves."""

    class NoCut(StubBackend):
        def seq_truncate(self, seq_id: int, n_tokens: int) -> None:
            if 0 < n_tokens < self.seq_len(seq_id):
                raise StateError("this cache keeps only the last window; it cannot drop positions")
            super().seq_truncate(seq_id, n_tokens)

    w = ModelWorker(lambda: NoCut(**STUB), WorkerConfig(cache=store, policy=POLICY), name="swa")  # type: ignore[arg-type]
    w.start()
    try:
        doc = text("a document read under a sliding window, " * 3)
        run(w, [*doc, *text("first question?")[1:]], n=4)
        settle(store)
        other = [*doc, *text("second one?")[1:]]
        cut = run(w, other)  # the only rows are longer than what they share: refused, so cold
        assert cut.cache_hit == "cold"
        assert list(cut.tokens) == reference(other, 12, eos_bias=-50.0)
        assert store.counters.snapshot()["restore_cut_refused"] >= 1
        settle(store)
        again = run(w, other)  # its own cold row is a prefix: no cut needed
    finally:
        w.stop()
    assert (again.cache_hit, again.restored_tokens) == ("exact", len(other) - 1)
    assert again.tokens == cut.tokens


class _Foldable(StubBackend):
    """Batch-invariant (as the stub is by construction) and able to cut rows back."""

    @property
    def info(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(super().info, last_token_foldable=True)


def test_a_foldable_backend_prefills_the_last_token_in_the_chunk_and_saves_after_the_first_token(
    store: CacheStore,
) -> None:
    events: list[str] = []

    class Foldable(_Foldable):
        def decode(self, items):  # type: ignore[no-untyped-def]
            events.append("decode " + ",".join(f"{len(i.tokens)}{'*' if i.logits else ''}" for i in items))
            return super().decode(items)

        def state_get(self, seq_id: int) -> memoryview:
            events.append(f"save {self.seq_len(seq_id)}")
            return super().state_get(seq_id)

        def sample(self, seq_id: int, row: int) -> int:
            events.append("sample")
            return super().sample(seq_id, row)

    w = ModelWorker(lambda: Foldable(**STUB), WorkerConfig(cache=store, policy=POLICY), name="fold")  # type: ignore[arg-type]
    w.start()
    try:
        prompt = text("z" * 100)  # 101 tokens
        cold = run(w, prompt, n=2)
        settle(store)
        cold_events = list(events)
        events.clear()
        warm = run(w, prompt, n=2)
    finally:
        w.stop()
    assert cold_events[:4] == ["decode 64", "decode 37*", "sample", "save 101"], "no separate last-token step"
    assert (warm.cache_hit, warm.restored_tokens) == ("exact", 100), "the 101-token row, cut back"
    assert events[0] == "decode 1*"
    assert warm.tokens == cold.tokens == tuple(reference(prompt, 2, eos_bias=-50.0))


def test_a_folded_prompts_first_token_reaches_an_asyncio_consumer_before_its_row_is_copied(store: CacheStore) -> None:
    # The copy waits (up to 5 s) for the consumer to hold the first token: it only gets there if the worker woke the
    # consumer's loop before copying, as it must for the save to stay off the time to first token.
    first_token = threading.Event()
    seen_before_copy: list[bool] = []

    class Foldable(_Foldable):
        def state_get(self, seq_id: int) -> memoryview:
            seen_before_copy.append(first_token.wait(5))
            return super().state_get(seq_id)

    async def consume(w: ModelWorker, prompt: list[int]) -> DoneEvent:
        aq = w.submit(GenerateRequest(prompt, max_tokens=3)).async_queue(asyncio.get_running_loop())
        while True:
            event = await asyncio.wait_for(aq.get(), 20)
            if isinstance(event, TokenEvent):
                first_token.set()
            elif isinstance(event, DoneEvent):
                return event

    w = ModelWorker(lambda: Foldable(**STUB), WorkerConfig(cache=store, policy=POLICY), name="fold")  # type: ignore[arg-type]
    w.start()
    try:
        done = asyncio.run(consume(w, text("z" * 100)))
    finally:
        w.stop()
    assert done.finish_reason is FinishReason.LENGTH
    assert seen_before_copy[0] is True, "the prompt's row (the first copy) was taken before the token went out"


def test_a_replys_end_goes_out_before_its_last_token_is_committed(store: CacheStore) -> None:
    gate = threading.Event()
    prompt = text("a reply that ends before its sequence closes")

    class HeldClose(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            if closes(self, items, len(prompt)):  # held until the test lets go
                gate.wait(10)
            return super().decode(items)

    w = ModelWorker(lambda: HeldClose(**STUB), WorkerConfig(cache=store, policy=POLICY), name="held")  # type: ignore[arg-type]
    w.start()
    try:
        done = w.submit(GenerateRequest(prompt, max_tokens=6)).result(
            timeout_s=5
        )  # times out if the end waits for that decode
        assert done.finish_key is not None
        assert done.committed_tokens == len(done.context_tokens), "the row will hold the whole context"
        assert store.pending(done.finish_key), "reserved"
        assert done.finish_key not in store, "not written yet"
        assert not store.drain(0.1), "a drain after the end covers the row still to be written"
        gate.set()
        settle(store)
        row = store.load(done.finish_key)
        assert row is not None
        assert row[0].tokens == done.context_tokens
    finally:
        gate.set()
        w.stop()


def test_the_next_turn_sent_the_moment_a_reply_ends_restores_the_whole_reply(tmp_path: Path) -> None:
    store = CacheStore([SlowRam(lambda: time.sleep(0.1))])
    w = make_worker(store, SavePolicy(min_tokens=8, cold_min_tokens=8, continued_interval=0))
    try:
        first = run(w, text("the first turn of a chat"), n=8)
        follow = [*first.context_tokens, *text(" and the second")[1:]]
        second = run(w, follow)  # no settle: its row is still closing or being written
    finally:
        w.stop()
        store.close()
    assert (second.cache_hit, second.restored_tokens) == ("partial", len(first.context_tokens))
    assert list(second.tokens) == reference(follow, 12, eos_bias=-50.0)


def test_a_worker_that_dies_while_a_reply_closes_releases_its_reserved_row(store: CacheStore) -> None:
    from erllama.errors import DecodeError

    prompt = text("a reply whose sequence never closes")
    gate = threading.Event()

    class CrashOnClose(StubBackend):
        def decode(self, items):  # type: ignore[no-untyped-def]
            if closes(self, items, len(prompt)):
                gate.wait(10)
                raise DecodeError("the device fell over", -3)
            return super().decode(items)

    w = ModelWorker(lambda: CrashOnClose(**STUB), WorkerConfig(cache=store, policy=POLICY), name="crash")  # type: ignore[arg-type]
    w.start()
    try:
        done = w.submit(GenerateRequest(prompt, max_tokens=4)).result(timeout_s=5)
        assert done.finish_key is not None
        assert store.pending(done.finish_key)
        gate.set()
        deadline = time.monotonic() + 5
        while w.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.crash is not None
        assert store.drain(1), "nothing left waiting on a row that will never be written"
        assert not store.pending(done.finish_key)
        assert done.finish_key not in store
    finally:
        gate.set()
        w.stop()


def test_a_request_sent_as_a_reply_ends_goes_before_the_replys_closing(store: CacheStore) -> None:
    Recording.batches = []
    w = ModelWorker(lambda: Recording(**STUB), WorkerConfig(cache=store, policy=POLICY), name="rec")  # type: ignore[arg-type]
    w.start()
    try:
        first = w.submit(GenerateRequest(text("the first request, about one thing"), max_tokens=4)).result(timeout_s=10)
        n_before = len(Recording.batches)
        other = text("another request about something else entirely")
        second = w.submit(GenerateRequest(other, max_tokens=4)).result(
            timeout_s=10
        )  # sent the moment the first one ended
    finally:
        w.stop()
    assert first.finish_reason is second.finish_reason is FinishReason.LENGTH
    after = Recording.batches[n_before:]
    closing = [i for i, b in enumerate(after) if any(n == 1 and not logits and seq == 0 for seq, n, logits in b)]
    prefill = [i for i, b in enumerate(after) if any(seq == 1 and n > 1 for seq, n, _ in b)]
    assert closing, "the first reply's last token was committed"
    assert prefill, "the second prompt was prefilled on the next free sequence"
    assert closing[0] > prefill[-1], f"the closing row waited for the new prompt's prefill: {after}"
    assert all(len(after[i]) > 1 for i in closing), "and rode along with its generation"
    settle(store)
    assert first.finish_key is not None
    assert first.finish_key in store


def test_a_closing_row_that_holds_the_last_free_sequence_rides_the_next_prefill_tick(store: CacheStore) -> None:
    # Two sequences: the first reply is closing on one when two new requests arrive. The first of them takes the
    # other sequence; the closing row then goes with its prefill (not after it), so the sequence is free for the
    # second request when that tick ends, instead of after the next one.
    rules = BatchingConfig(close_grace_s=10.0)  # the closing waits for the new requests
    Recording.batches = []
    stub = {**STUB, "n_seq_max": 2}
    w = ModelWorker(lambda: Recording(**stub), WorkerConfig(cache=store, policy=POLICY, batching=rules), name="rec")  # type: ignore[arg-type]
    w.start()
    try:
        first = w.submit(GenerateRequest(text("the first request, about one thing"), max_tokens=4)).result(timeout_s=10)
        n_before = len(Recording.batches)
        second = w.submit(GenerateRequest(text("the second request, about another thing"), max_tokens=4))
        third = w.submit(GenerateRequest(text("a third request that needs a sequence"), max_tokens=4))
        done = [second.result(timeout_s=10), third.result(timeout_s=10)]
    finally:
        w.stop()
    assert all(d.finish_reason is FinishReason.LENGTH for d in done)
    after = Recording.batches[n_before:]
    assert any(seq == 1 and n > 1 for seq, n, _ in after[0]), f"the second prompt's prefill comes first: {after[0]}"
    assert (0, 1, False) in after[0], f"with the first reply's closing row: {after[0]}"
    assert any(seq == 0 and n > 1 for b in after[1:] for seq, n, _ in b), f"the third prompt got it: {after}"
    settle(store)
    assert first.finish_key is not None
    assert first.finish_key in store, "the closed reply's row was written"


def test_the_last_tokens_go_out_before_finish_rows_are_copied_when_no_one_is_left_generating(
    store: CacheStore,
) -> None:
    # Two replies of 3 and 4 tokens: the longer one's last token is sampled in the tick that closes the shorter one.
    # Nobody waits for another decode then, so its end reaches the consumer before the closed row is copied (the copy
    # waits up to 5 s for it: it only arrives if the worker woke the consumer's loop first).
    a_prompt, b_prompt = text("a" * 30), text("b" * 30)
    b_done = threading.Event()
    seen_before_copy: list[bool] = []

    class Watched(StubBackend):
        def state_get(self, seq_id: int) -> memoryview:
            if seq_id == 0 and self.seq_len(0) == len(a_prompt) + 3:  # the shorter reply's finish row
                seen_before_copy.append(b_done.wait(5))
            return super().state_get(seq_id)

    async def consume(w: ModelWorker) -> list[DoneEvent]:
        loop = asyncio.get_running_loop()
        queues = [
            w.submit(GenerateRequest(p, max_tokens=n)).async_queue(loop) for p, n in ((a_prompt, 3), (b_prompt, 4))
        ]

        async def end(i: int) -> DoneEvent:
            while not isinstance(event := await asyncio.wait_for(queues[i].get(), 20), DoneEvent):
                pass
            if i == 1:
                b_done.set()
            return event

        return list(await asyncio.gather(end(0), end(1)))

    w = ModelWorker(lambda: Watched(**STUB), WorkerConfig(cache=store, policy=POLICY), name="watched")  # type: ignore[arg-type]
    w.start()
    try:
        a, b = asyncio.run(consume(w))
    finally:
        w.stop()
    assert (a.finish_reason, b.finish_reason) == (FinishReason.LENGTH, FinishReason.LENGTH)
    assert seen_before_copy == [True], "the longer reply's end was held until the shorter one's row was copied"


def test_the_report_says_where_a_prompt_left_the_nearest_row(store: CacheStore) -> None:
    """Each request's CacheReport: cold with no row near; exact; a prompt that goes on past a row (no divergence);
    a prompt that left a row after a shared block, and one that left it inside its first block (found by the scan
    of recent rows): the position of the first differing token, and the tokens on both sides of it."""
    w = make_worker(store)
    try:
        base = text("The quick brown fox jumps over the lazy dog, again and again, every day.")
        first = run(w, base, n=4).cache
        assert first is not None
        assert first.kind == "cold"
        assert first.row_tokens == 0
        assert first.diverged_at is None
        settle(store)
        done = run(w, base, n=4)
        again = done.cache
        assert again is not None
        assert again.kind == "exact"
        assert again.tier == "ram"
        assert again.diverged_at is None
        assert again.restored_tokens == len(base) - 1
        settle(store)

        longer = [*done.context_tokens[: done.committed_tokens], *more(" And then some more words follow.")]
        grown = run(w, longer, n=4).cache  # the next turn: the reply's row, and more after it
        assert grown is not None
        assert grown.kind == "partial"
        assert grown.diverged_at is None
        assert grown.restored_tokens == grown.row_tokens == done.committed_tokens
        settle(store)

        at = 40
        changed = [*base[:at], *more("a different ending entirely, with more words.")]
        assert changed[at] != base[at]
        left = run(w, changed, n=4).cache
        assert left is not None
        assert left.kind == "partial"
        assert left.restored_tokens == at
        assert left.diverged_at == at
        assert left.row_tokens >= len(base) - 1
        assert left.prompt_next == tuple(changed[at : at + 6])
        assert left.before == tuple(base[at - 6 : at])
        assert left.row_next[0] == base[at]
        header = parse_header(left.header())
        assert header == {"kind": "partial", "prompt": str(len(changed)), "restored": str(at), "tier": "ram",
                          "row": str(left.row_tokens), "diverged_at": str(at)}  # fmt: skip

        early = [*base[:5], *more("!! something else, long enough to be saved and explained.")]
        volatile = run(w, early, n=4).cache
        assert volatile is not None
        assert volatile.kind == "cold"
        assert volatile.diverged_at == 5

        def piece(ids: Sequence[int]) -> str:
            return b"".join(StubBackend().token_to_piece(t) for t in ids).decode()

        line = volatile.explain(piece)
        assert "at token 5" in line
        assert repr(piece(base[5:11])) in line
        assert repr(piece(early[5:11])) in line
    finally:
        w.stop()


def test_the_cache_counts_what_it_served_in_tokens(store: CacheStore) -> None:
    w = make_worker(store)
    try:
        base = text("Counting tokens looked up, and those the cache served, per tier.")
        run(w, base, n=2)
        settle(store)
        run(w, base, n=2)
        snap = store.counters.snapshot()
        assert snap["query_tokens"] == 2 * len(base)
        assert snap["restored_tokens"] == snap["ram_restored_tokens"] == len(base) - 1
        rows = store.rows()
        assert rows
        assert sum(r.hits for r in rows) == 1
        assert store.tier_tokens()["ram"] == sum(r.meta.n_tokens for r in rows if "ram" in r.tiers)
    finally:
        w.stop()


def test_save_at_saves_a_row_at_each_breakpoint_while_prefilling(store: CacheStore) -> None:
    """A text prompt's save_at offsets become token positions; a row is saved at each (reason MANUAL) besides the
    policy's cold row, so a prompt that keeps only the head up to a breakpoint restores all of it exactly."""
    w = make_worker(store)
    try:
        head = "System: you are an agent with a long and stable set of instructions. "
        middle = "Tool catalogue: read, write, bash, grep, and more tools besides. "
        prompt = (
            head + middle + "User: the first question, which changes every turn, and is long enough not to be merged."
        )
        done = w.submit(GenerateRequest(prompt, max_tokens=2, save_at=(len(head), len(head + middle)))).result(20)
        assert done.finish_reason is not None
        settle(store)
        rows = {r.meta.n_tokens: r.meta.save_reason for r in store.rows()}
        n_head, n_mid = len(text(head)), len(text(head + middle))
        assert rows[n_head] == rows[n_mid] == SaveReason.MANUAL
        assert SaveReason.COLD in rows.values()

        other = text(head + middle + "User: something else entirely, of about the same length.")
        hit = run(w, other, n=2).cache
        assert hit is not None
        assert hit.restored_tokens >= n_mid  # the head up to the last breakpoint, at least
        with pytest.raises(InvalidInputError):
            GenerateRequest(prompt, save_at=(len(prompt) + 1,))
    finally:
        w.stop()


def test_save_points_split_the_prefill_where_they_fall(store: CacheStore) -> None:
    """The planner ends a prefill chunk at every save point, so each row holds exactly its tokens; a point just
    short of a later one (here 280, 20 tokens before the prompt's cold row at 300) is left to that one."""
    w = make_worker(store, n_batch=256)
    try:
        tokens = text("word " * 60)
        assert len(tokens) == 301
        run(w, tokens, n=1, save_at=(20, 100, 200, 280))
        settle(store)
        saved = sorted(r.meta.n_tokens for r in store.rows() if r.meta.save_reason == SaveReason.MANUAL)
        assert saved == [20, 100, 200]
        assert 300 in {r.meta.n_tokens for r in store.rows() if r.meta.save_reason == SaveReason.COLD}
    finally:
        w.stop()
