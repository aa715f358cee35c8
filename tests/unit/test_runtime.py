"""The public API (Runtime and the module-level functions) over the stub backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import erllama
from erllama import Completion, Runtime, TextDelta, ThinkingDelta
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.errors import InvalidInputError, ModelExistsError, NoGpuError, UnknownModelError
from erllama.model import StubBackend, ThinkSplitter
from erllama.runtime import Failed, Finished

from .model.test_worker import reference

POLICY = SavePolicy(min_tokens=8, cold_min_tokens=8)


def stub(**kw: object) -> StubBackend:
    return StubBackend(n_seq_max=2, n_batch=64, eos_bias=-50.0, **kw)  # type: ignore[arg-type]


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime(CacheStore([RamTier(1 << 24)]), policy=POLICY)
    yield runtime
    runtime.close()
    assert runtime.cache is not None
    runtime.cache.close()


@pytest.fixture
def model(rt: Runtime) -> str:
    return rt.load_model(backend=stub, model_id="stub")


def test_complete_returns_the_reply_and_its_cache_story(rt: Runtime, model: str) -> None:
    prompt = "the first request of the day"
    first = rt.complete(model, prompt, max_tokens=10)
    assert isinstance(first, Completion)
    assert first.generated == tuple(reference(StubBackend().tokenize(prompt), 10, eos_bias=-50.0))
    assert first.reply == bytes(t - 3 for t in first.generated).decode("utf-8", "replace")
    assert (first.cache_hit_kind, first.finish_reason) == ("cold", "length")
    assert first.stats.prompt_tokens == len(prompt) + 1
    assert first.stats.generated_tokens == 10
    assert first.context_tokens[: first.stats.prompt_tokens] == tuple(StubBackend().tokenize(prompt))
    assert rt.cache is not None
    rt.cache.drain()
    again = rt.complete(model, prompt, max_tokens=10)
    assert again.cache_hit_kind == "exact"
    assert again.generated == first.generated
    assert rt.last_cache_hit(model) == {"kind": "exact", "prefix_len": len(prompt)}
    assert rt.counters()["hits_exact"] == 1


def test_parent_key_and_prefill_only(rt: Runtime, model: str) -> None:
    pre = rt.prefill_only(model, "a long shared system prompt")
    assert pre.generated == ()
    assert pre.finish_key is not None
    turn = rt.complete(model, " then a question", parent_key=pre.finish_key, max_tokens=5)
    assert turn.stats.restored_tokens == len(pre.context_tokens)
    assert turn.context_tokens[: len(pre.context_tokens)] == pre.context_tokens
    assert rt.counters()["hits_resume"] == 1


def test_stop_sequences_and_sampling_parameters(rt: Runtime, model: str) -> None:
    free = rt.complete(model, "say something", max_tokens=30)
    stop = free.reply[5:8]
    assert stop
    stopped = rt.complete(model, "say something", max_tokens=30, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.stop_sequence == stop
    assert stopped.reply == free.reply[: free.reply.index(stop)]
    a = rt.complete(model, "sample me", max_tokens=12, temperature=0.9, seed=7)
    b = rt.complete(model, "sample me", max_tokens=12, temperature=0.9, seed=7)
    c = rt.complete(model, "sample me", max_tokens=12, temperature=0.9, seed=8)
    assert a.generated == b.generated
    assert a.generated != c.generated


def test_infer_streams_sync_and_async(rt: Runtime, model: str) -> None:
    events = list(rt.infer(model, "stream it", max_tokens=8))
    assert isinstance(events[-1], Finished)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == events[-1].completion.reply
    assert len(deltas) == 8

    async def consume() -> list[object]:
        return [e async for e in rt.infer(model, "stream it", max_tokens=8)]

    async_events = asyncio.run(consume())
    assert [e for e in async_events if isinstance(e, TextDelta)] == deltas


def test_async_consumer_that_leaves_cancels_the_request(rt: Runtime) -> None:
    slow = rt.load_model(backend=lambda: stub(step_delay_s=0.002), model_id="slow")

    async def leave_early() -> tuple[Completion | None, int]:
        stream = rt.infer(slow, "go on for a long time", max_tokens=3000)
        events = aiter(stream)
        async for event in events:
            if isinstance(event, TextDelta):
                break  # a client that disconnects: the server closes the iterator, the loop runs on
        await events.aclose()  # type: ignore[attr-defined]
        # cancelled, not left running: 3000 tokens at 2 ms would hold the sequence for 6 s
        for _ in range(400):
            if not rt.in_flight(slow):
                break
            await asyncio.sleep(0.005)
        return stream.completion, rt.in_flight(slow)

    assert asyncio.run(leave_early()) == (None, 0)
    # and its sequence was freed: two more requests (n_seq_max=2) are served together
    streams = [rt.infer(slow, "next", max_tokens=3) for _ in range(2)]
    assert [s.result(timeout_s=10).finish_reason for s in streams] == ["length", "length"]


def test_cancel_ends_with_cancelled(rt: Runtime) -> None:
    slow = rt.load_model(backend=lambda: stub(step_delay_s=0.002), model_id="slow")
    stream = rt.infer(slow, "long", max_tokens=3000)
    seen = 0
    final = None
    for event in stream:
        if isinstance(event, TextDelta):
            seen += 1
            if seen == 3:
                rt.cancel(stream)
                rt.cancel(stream)  # idempotent
        elif isinstance(event, Finished):
            final = event.completion
    assert final is not None
    assert final.finish_reason == "cancelled"
    assert len(final.generated) <= 5


def test_vocabulary_template_and_embeddings(rt: Runtime, model: str) -> None:
    tokens = rt.tokenize(model, "héllo 世界")
    assert rt.detokenize(model, tokens[1:]) == "héllo 世界"
    text = rt.apply_chat_template(model, [{"role": "user", "content": "hi"}])
    assert text == "<user>hi\n<assistant>"
    e1 = np.array(rt.embed(model, "embed this"))
    e2 = np.array(rt.embed(model, "embed this"))
    e3 = np.array(rt.embed(model, "something else entirely"))
    assert np.isclose(np.linalg.norm(e1), 1.0)
    assert np.array_equal(e1, e2)
    assert not np.allclose(e1, e3)


def test_draft_and_verify(rt: Runtime, model: str) -> None:
    prefix = rt.tokenize(model, "speculate about this")
    draft = rt.draft_tokens(model, prefix, 6)
    truth = reference(prefix, 7, eos_bias=-50.0)
    assert draft == truth[:6]
    assert rt.verify(model, prefix, draft) == (6, truth[6])
    wrong = [*draft[:2], (draft[2] + 1) % 200 + 3, *draft[3:]]
    assert rt.verify(model, prefix, wrong) == (2, truth[2])
    assert rt.verify(model, prefix, draft, k=3) == (3, truth[3])


def test_evict_and_shutdown_save_live_sequences(rt: Runtime) -> None:
    slow = rt.load_model(backend=lambda: stub(step_delay_s=0.002), model_id="slow")
    stream = rt.infer(slow, "a long running request that is still going", max_tokens=3000)
    events = iter(stream)
    for _ in range(20):
        next(events)
    assert rt.evict(slow) == 1
    assert rt.shutdown(slow) == 1, "more tokens were committed since the evict save"
    stream.cancel()
    list(events)
    snap = rt.counters()
    assert (snap["saves_evict"], snap["saves_shutdown"]) == (1, 1)


def test_adapters_split_the_namespace(rt: Runtime, model: str, tmp_path: Path) -> None:
    adapter = tmp_path / "style.gguf"
    adapter.write_bytes(b"not really an adapter, the stub does not read it")
    prompt = "the same prompt under different adapters"
    rt.complete(model, prompt, max_tokens=3)
    assert rt.cache is not None
    rt.cache.drain()
    tokens = rt.tokenize(model, prompt)
    assert rt.list_cached_prefixes(model, tokens) == len(tokens) - 1
    name = rt.load_adapter(model, adapter, scale=0.5)
    assert [(a.name, a.scale) for a in rt.list_adapters(model)] == [("style", 0.5)]
    assert rt.list_cached_prefixes(model, tokens) == 0
    assert rt.complete(model, prompt, max_tokens=3).cache_hit_kind == "cold"
    rt.set_adapter_scale(model, name, 1.0)
    assert rt.list_cached_prefixes(model, tokens) == 0
    rt.unload_adapter(model, name)
    assert rt.list_cached_prefixes(model, tokens) == len(tokens) - 1
    with pytest.raises(InvalidInputError):
        rt.unload_adapter(model, name)
    with pytest.raises(InvalidInputError):
        rt.load_adapter(model, tmp_path / "missing.gguf")


def test_models_listing_and_live_state(rt: Runtime, model: str) -> None:
    other = rt.load_model(backend=lambda: stub(seed=3))
    assert rt.models() == sorted([model, other])
    assert [m.model_id for m in rt.list_models()] == sorted([model, other])
    info = rt.model_info(model)
    assert (info["status"], info["n_seq_max"], info["n_batch"]) == ("running", 2, 64)
    assert (rt.status(model), rt.phase(model), rt.pending_len(model), rt.queue_depth(model)) == (
        "running",
        "idle",
        0,
        0,
    )
    with pytest.raises(ModelExistsError):
        rt.load_model(backend=stub, model_id=model)
    rt.unload(other)
    with pytest.raises(UnknownModelError):
        rt.complete(other, "gone")
    with pytest.raises(InvalidInputError):
        rt.load_model()
    with pytest.raises(InvalidInputError):
        rt.load_model("/no/such/model.gguf")


def test_bad_requests_fail_clearly_and_the_model_keeps_serving(rt: Runtime, model: str) -> None:
    with pytest.raises(InvalidInputError, match="exceeds"):
        rt.complete(model, "x" * 5000, max_tokens=10)
    with pytest.raises(InvalidInputError):
        rt.complete(model, [999999], max_tokens=1)
    with pytest.raises(InvalidInputError):
        rt.complete(model, "ok", max_tokens=-1)
    with pytest.raises(InvalidInputError, match="parent_key"):
        rt.complete(model, "x", parent_key=b"\1" * 32)
    stream = rt.infer(model, [999999])
    assert isinstance(list(stream)[-1], Failed)
    assert rt.complete(model, "still fine", max_tokens=2).finish_reason == "length"


def test_vram_info_on_this_build() -> None:
    from erllama._native import library

    if library().gpu_devices():
        info = Runtime.vram_info()
        assert info.total_b >= info.free_b >= 0
    else:
        with pytest.raises(NoGpuError, match="no GPU"):
            Runtime.vram_info()


def test_module_level_api_uses_one_default_runtime() -> None:
    model = erllama.load_model(backend=stub, model_id="module-level")
    try:
        assert erllama.default_runtime() is erllama.default_runtime()
        assert "module-level" in erllama.models()
        assert erllama.complete(model, "hi there", max_tokens=4).stats.generated_tokens == 4
        assert erllama.phase(model) == "idle"
    finally:
        erllama.unload(model)


def test_thinking_is_split_out_of_the_stream() -> None:
    class Thinker(StubBackend):
        """Replies '<think>plan</think>answer', one byte per token, then ends."""

        script = b"<think>plan</think>answer"

        def set_sampler(self, seq_id, config):  # type: ignore[no-untyped-def]
            super().set_sampler(seq_id, config)
            self.sampled = 0

        def sample(self, seq_id: int, row: int) -> int:
            n, self.sampled = self.sampled, self.sampled + 1
            return 3 + self.script[n] if n < len(self.script) else 2

    runtime = Runtime(None)
    try:
        m = runtime.load_model(backend=lambda: Thinker(n_seq_max=1))
        events = list(runtime.infer(m, "q", max_tokens=50, thinking=True))
        done = events[-1]
        assert isinstance(done, Finished)
        assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "plan"
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "answer"
        assert (done.completion.reply, done.completion.thinking) == ("answer", "plan")
        plain = runtime.complete(m, "q", max_tokens=50)
        assert plain.reply == "<think>plan</think>answer"
    finally:
        runtime.close()


@given(st.lists(st.sampled_from(["<think>", "</think>", "<", "th", "ink>", "</", "a", "b c", ">"]), max_size=20))
def test_think_splitter_streams_like_a_whole_text_split(pieces: list[str]) -> None:
    whole = ThinkSplitter().feed_all("".join(pieces))
    split = ThinkSplitter()
    streamed = [part for piece in pieces for part in split.feed(piece)] + split.flush()

    def merge(parts: list[tuple[bool, str]]) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        for inside, text in parts:
            if out and out[-1][0] == inside:
                out[-1] = (inside, out[-1][1] + text)
            else:
                out.append((inside, text))
        return out

    assert merge(streamed) == merge(whole)


def test_result_after_reading_the_stream_returns_at_once(rt: Runtime, model: str) -> None:
    stream = rt.infer(model, "read me first", max_tokens=3)
    events = list(stream)
    assert isinstance(events[-1], Finished)
    assert stream.result(timeout_s=1) is events[-1].completion
    failed = rt.infer(model, [999999])
    list(failed)
    with pytest.raises(InvalidInputError):
        failed.result(timeout_s=1)


def test_models_register_an_evict_hook_with_the_pressure_scheduler() -> None:
    from erllama.pressure import CallableSampler, PressureScheduler

    store = CacheStore([RamTier(1 << 24)])
    used = [0]
    scheduler = PressureScheduler([CallableSampler("system", lambda: (used[0], 1000))])
    runtime = Runtime(store, policy=POLICY, scheduler=scheduler)
    try:
        m = runtime.load_model(backend=stub)
        runtime.complete(m, "fill the cache with a row or two", max_tokens=4)
        store.drain()
        before = store.tiers[0].used_bytes
        assert before > 0
        used[0] = 950  # above the high watermark: the model's hook frees cache bytes
        (report,) = scheduler.poll_once()
        assert store.tiers[0].used_bytes < before
        assert report.evicted_bytes > 0
        runtime.unload(m)
        used[0] = 990
        (report,) = scheduler.poll_once()
        assert report.evicted_bytes == 0, "the unloaded model's hook is gone"
    finally:
        runtime.close()
        store.close()


def test_kv_usage_is_the_share_of_cells_running_requests_hold(rt: Runtime) -> None:
    slow = rt.load_model(backend=lambda: stub(step_delay_s=0.002), model_id="slow")
    assert rt.kv_usage(slow) == 0.0
    stream = rt.infer(slow, "go on for a long time", max_tokens=3000)
    for event in stream:
        if isinstance(event, TextDelta):
            break
    info = rt.model_info(slow)
    seen = rt.kv_usage(slow)
    assert 0.0 < seen <= 1.0
    assert seen * info["n_ctx_seq"] * info["n_seq_max"] >= len(rt.tokenize(slow, "go on for a long time"))
    stream.cancel()
    for _ in range(400):
        if not rt.in_flight(slow):
            break
        time.sleep(0.005)
    assert rt.kv_usage(slow) == 0.0, "a finished request holds no cells"
