"""Agent-shaped traffic on SmolLM2 through the official clients (``openai``, ``anthropic``, ``ollama``): how many
prompt tokens each request restores, read from the ``x-erllama-cache`` header every dialect sends and checked
against its ceiling (the longest prefix it shares with an earlier prompt of the session: erllama.testing.agents).

Cases (issue 23): a plain tool loop in each dialect; the Claude-Code-shaped session (a volatile billing header
first, ``cache_control`` breakpoints, parallel tool results replayed in another order), and the same without the
rewrites; tool definitions reordered; thinking dropped on replay; ``prompt_cache_key``."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier, SavePolicy, SaveReason
from erllama.cache.report import parse_header
from erllama.chat.stable import StableOptions
from erllama.model import LlamaBackend
from erllama.server import ServerConfig, create_app
from erllama.testing import serve_app
from erllama.testing.agents import ceiling, claude_code_session, prompt_tokens, tool_loop

pytestmark = [pytest.mark.native, pytest.mark.smollm2]

N_CTX_SEQ = 8192
M = "smollm2"
REPLY = 4  # max_tokens of every request: the most a reply's row adds to a prompt's ceiling


class Headers:
    """The ``x-erllama-cache`` header of each response an httpx client received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def hook(self, response: Any) -> None:
        if "x-erllama-cache" in response.headers:
            self.seen.append(parse_header(response.headers["x-erllama-cache"]))

    def restored(self) -> int:
        return int(self.seen[-1]["restored"])


@pytest.fixture(scope="module")
def rt(smollm2_path: Path, native: None) -> Iterator[Runtime]:
    runtime = Runtime(CacheStore([RamTier(2 << 30)]), policy=SavePolicy(min_tokens=8))
    cfg = ContextConfig(n_ctx=2 * N_CTX_SEQ, n_batch=512, n_seq_max=2, n_threads=os.cpu_count() or 2)
    runtime.load_model(backend=lambda: LlamaBackend(smollm2_path, context_config=cfg), model_id=M)
    yield runtime
    runtime.close()
    assert runtime.cache is not None
    runtime.cache.close()


@pytest.fixture(scope="module")
def base(rt: Runtime) -> Iterator[str]:
    with serve_app(create_app(rt, {M: M})) as url:
        yield url


def _settle(rt: Runtime) -> None:
    """An agent runs its tools between turns: by the next request the reply's row is written."""
    assert rt.cache is not None
    assert rt.cache.drain(30)


def _send(base: str, headers: Headers, dialect: str, body: dict[str, Any]) -> None:
    if dialect == "openai":
        http = openai.DefaultHttpxClient(event_hooks={"response": [headers.hook]}, timeout=600)
        with openai.OpenAI(base_url=f"{base}/v1", api_key="-", http_client=http, max_retries=0) as c:
            reply = c.chat.completions.create(**body)
            assert reply.usage is not None
            assert reply.usage.prompt_tokens_details is not None
            assert reply.usage.prompt_tokens_details.cached_tokens == int(headers.seen[-1]["restored"])
    elif dialect == "anthropic":
        http = anthropic.DefaultHttpxClient(event_hooks={"response": [headers.hook]}, timeout=600)
        with anthropic.Anthropic(base_url=base, api_key="-", http_client=http, max_retries=0) as a:
            msg = a.messages.create(**body)
            assert msg.usage.cache_read_input_tokens == int(headers.seen[-1]["restored"])
            n = msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
            assert n == int(headers.seen[-1]["prompt"])
    else:
        with ollama.Client(host=base, event_hooks={"response": [headers.hook]}) as client:
            reply = client.chat(**body)
        assert reply.prompt_eval_count == int(headers.seen[-1]["prompt"])  # the whole prompt, as Ollama counts


def _replay(
    rt: Runtime, base: str, dialect: str, bodies: list[dict[str, Any]], stable: StableOptions | None = None
) -> list[tuple[int, int, int]]:
    """(restored, ceiling, prompt tokens) per request of a session."""
    headers = Headers()
    prompts = [prompt_tokens(rt, M, dialect, b, stable) for b in bodies]
    out = []
    for t, body in enumerate(bodies):
        _send(base, headers, dialect, body)
        assert int(headers.seen[-1]["prompt"]) == len(prompts[t])
        out.append((headers.restored(), ceiling(prompts, t) if t else 0, len(prompts[t])))
        _settle(rt)
    return out


@pytest.mark.parametrize(("dialect", "seed"), [("openai", 11), ("anthropic", 12), ("ollama", 13)])
def test_a_tool_loop_restores_its_ceiling_in_each_dialect(rt: Runtime, base: str, dialect: str, seed: int) -> None:
    turns = _replay(rt, base, dialect, tool_loop(dialect, 5, model=M, system_words=250, seed=seed))
    for restored, top, _ in turns[1:]:
        assert top <= restored <= top + REPLY  # (the reply's tokens may go on matching the next prompt)
    share = sum(r for r, _, _ in turns[1:]) / sum(n for _, _, n in turns[1:])
    print(f"{dialect} tool loop: {100 * share:.1f}% of prompt tokens restored on turns 2..5 (= the ceiling)")


def test_the_claude_code_session_restores_over_95_percent(rt: Runtime, base: str) -> None:
    """The billing header changes every request; stripped, every turn restores its ceiling, which is more than
    95% of its prompt. Parallel results replayed in another order (turns 2 and 4) cost nothing either."""
    turns = _replay(rt, base, "anthropic", claude_code_session(4, model=M, system_words=2800, result_words=6, seed=21))
    assert all(top <= restored <= top + REPLY for restored, top, _ in turns[1:]), turns
    share = sum(r for r, _, _ in turns[1:]) / sum(n for _, _, n in turns[1:])
    assert share >= 0.95, turns
    assert rt.cache is not None
    saved = {r.meta.n_tokens for r in rt.cache.rows() if r.meta.save_reason is SaveReason.MANUAL}
    assert len(saved) >= 2  # a row per cache_control breakpoint (those just short of a later row are merged)


def test_with_the_header_left_in_every_request_misses(rt: Runtime, base: str) -> None:
    kept = StableOptions(strip_billing_header=False)
    app = create_app(rt, {M: M}, ServerConfig(stable=kept))
    with serve_app(app) as url:
        turns = _replay(rt, url, "anthropic", claude_code_session(2, model=M, system_words=300, seed=22), kept)
    for restored, top, n in turns:
        assert top <= restored <= top + REPLY if top else restored < 40
        assert restored < 0.05 * n  # up to the header's cch, whatever came before


def test_parallel_results_and_tools_in_another_order_restore_everything(rt: Runtime, base: str) -> None:
    (first,) = tool_loop("openai", 1, model=M, system_words=200, seed=31)
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "read_file", "arguments": f'{{"path": "{p}"}}'}}
             for i, p in enumerate(["a.py", "b.py"])]  # fmt: skip
    results = [{"role": "tool", "tool_call_id": f"call_{i}", "content": f"contents of {p}: " + "x = 1\n" * 20}
               for i, p in enumerate(["a.py", "b.py"])]  # fmt: skip
    turn = [*first["messages"], {"role": "assistant", "content": "", "tool_calls": calls}]
    one = {**first, "messages": [*turn, *results]}
    resumed = {**first, "messages": [*turn, *reversed(results), {"role": "user", "content": "Go on."}],
               "tools": random.Random(5).sample(first["tools"], len(first["tools"]))}  # fmt: skip
    assert resumed["tools"] != first["tools"]
    (_, _, _), (restored, top, n) = _replay(rt, base, "openai", [one, resumed])
    assert top <= restored <= top + REPLY
    as_sent = StableOptions(order_tool_results=False, sort_tools=False)
    plain = [prompt_tokens(rt, M, "openai", b, as_sent) for b in (one, resumed)]
    assert ceiling(plain, 1) < top - 100  # without the rewrites the prompt would leave the row at the tools
    print(f"reordered results and tools: {restored} of {n} tokens restored; {ceiling(plain, 1)} without the rewrites")


def test_thinking_dropped_on_replay_restores_its_ceiling(rt: Runtime, base: str) -> None:
    """SmolLM2's template does not render reasoning, so the replay without it renders the same prompt."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "What is 12 times 12? " + "Show your work. " * 20},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "12 times 12 is 144.", "signature": "-"},
            {"type": "text", "text": "It is 144."},
        ]},
        {"role": "user", "content": "And 13 times 13?"},
    ]  # fmt: skip
    sent = {"model": M, "max_tokens": 4, "system": "You are a careful calculator.", "messages": history}
    dropped = {**sent, "messages": [history[0], {"role": "assistant", "content": "It is 144."}, history[2]]}
    (_, _, _), (restored, top, n) = _replay(rt, base, "anthropic", [sent, dropped])
    assert restored == top == n - 1


def test_prompt_cache_key_saves_the_head_of_the_conversation(rt: Runtime, base: str) -> None:
    body = tool_loop("openai", 4, model=M, system_words=200, seed=41)[-1]  # the head is far from the end
    keyed = {**body, "prompt_cache_key": "session-41"}
    headers = Headers()
    _send(base, headers, "openai", keyed)
    _settle(rt)
    assert rt.cache is not None
    head = len(prompt_tokens(rt, M, "openai", {**body, "messages": body["messages"][:1]}, None))
    manual = sorted(r.meta.n_tokens for r in rt.cache.rows() if r.meta.save_reason is SaveReason.MANUAL)
    assert any(abs(n - head) <= 4 for n in manual), (head, manual)  # at the first turn's header, after the system
    other = {**body, "messages": [body["messages"][0], {"role": "user", "content": "Something else entirely."}]}
    _send(base, headers, "openai", other)
    assert headers.restored() >= head - 4
