"""Agent-shaped traffic on the stub: each request of a replayed session restores exactly its ceiling (the longest
prefix it shares with an earlier prompt), through every dialect; the volatile billing header, reordered parallel
tool results and reordered tools cost nothing; turned off, each shows what it would cost."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from erllama import Runtime
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.cache.report import parse_header
from erllama.chat.stable import StableOptions
from erllama.model import StubBackend
from erllama.server import ServerConfig
from erllama.testing.agents import ceiling, claude_code_session, prompt_tokens, tool_loop

from .conftest import HERMES_TEMPLATE, request, script

PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime(CacheStore([RamTier(1 << 26)]), policy=SavePolicy(min_tokens=8))

    def stub(template: str | None) -> StubBackend:
        return StubBackend(
            n_seq_max=2, n_ctx_seq=1 << 15, n_batch=2048, eos_bias=-50.0, script=script, chat_template=template
        )

    runtime.load_model(backend=lambda: stub(HERMES_TEMPLATE), model_id="hermes")
    runtime.load_model(backend=lambda: stub(None), model_id="plain")
    yield runtime
    runtime.close()
    assert runtime.cache is not None
    runtime.cache.close()


def replay(
    rt: Runtime, dialect: str, bodies: list[dict[str, Any]], config: ServerConfig | None = None
) -> list[tuple[int, int, int]]:
    """Send each request; per request (restored, ceiling, prompt tokens), the ceiling from the daemon's rendering
    of this session's earlier prompts (the first request's is 0, though rows of earlier sessions may serve it)."""
    prompts = [prompt_tokens(rt, b["model"], dialect, b, (config or ServerConfig()).stable) for b in bodies]
    out = []
    for t, body in enumerate(bodies):
        r = request(rt, "POST", PATHS[dialect], config, models={body["model"]: body["model"]}, json=body)
        assert r.status_code == 200, r.text
        header = parse_header(r.headers["x-erllama-cache"])
        assert int(header["prompt"]) == len(prompts[t])
        out.append((int(header["restored"]), ceiling(prompts, t) if t else 0, len(prompts[t])))
        assert rt.cache is not None
        assert rt.cache.drain(10)  # an agent runs its tools before the next turn: the reply's row is written by then
    return out


@pytest.mark.parametrize("model", ["hermes", "plain"])
@pytest.mark.parametrize("dialect", ["openai", "anthropic", "ollama"])
def test_a_tool_loop_restores_its_ceiling_every_turn(rt: Runtime, dialect: str, model: str) -> None:
    for restored, top, _ in replay(rt, dialect, tool_loop(dialect, 5, model=model, system_words=60)):
        assert restored == top


def test_the_claude_code_session_restores_its_ceiling_despite_its_volatile_header(rt: Runtime) -> None:
    turns = replay(rt, "anthropic", claude_code_session(5, model="hermes", system_words=200))
    assert all(restored == top for restored, top, _ in turns[1:])
    share = sum(r for r, _, _ in turns[1:]) / sum(n for _, _, n in turns[1:])
    assert share > 0.8  # (bytes as tokens: the stub's system prompt is short beside its turns)


def test_without_the_rewrites_each_volatile_part_costs_the_cache(rt: Runtime) -> None:
    """The same session with each rewrite off: the billing header makes every request miss from the system
    prompt's first line; reordered results miss from the first result of the earliest reordered turn."""
    off = ServerConfig(stable=StableOptions(strip_billing_header=False))
    turns = replay(rt, "anthropic", claude_code_session(3, model="plain", system_words=200), off)
    assert all(restored == top for restored, top, _ in turns[1:])
    assert all(restored < 0.05 * n for restored, _, n in turns)  # up to the header's cch, every time

    def share_at_turn_3(config: ServerConfig | None, seed: int) -> float:
        turns = replay(rt, "anthropic", claude_code_session(4, model="hermes", system_words=200, seed=seed), config)
        assert all(restored == top for restored, top, _ in turns[1:]), turns
        return turns[3][0] / turns[3][2]

    reordered = share_at_turn_3(ServerConfig(stable=StableOptions(order_tool_results=False)), seed=8)
    ordered = share_at_turn_3(None, seed=9)
    assert ordered > 0.8
    assert reordered < ordered - 0.1  # turn 3 resends turn 0's results reversed: a miss from there on


def test_tools_in_another_order_restore_the_whole_prompt(rt: Runtime) -> None:
    (body,) = tool_loop("openai", 1, model="hermes", system_words=60)
    shuffled = dict(body, tools=random.Random(3).sample(body["tools"], len(body["tools"])))
    assert shuffled["tools"] != body["tools"]
    first, second = replay(rt, "openai", [body, shuffled])
    assert first[0] == 0
    assert second[0] == second[2] - 1  # exact: everything but the last token


THINKING_TEMPLATE = (  # renders an assistant turn's reasoning, as reasoning models' templates do
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
    "</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def test_thinking_dropped_on_replay_restores_up_to_the_reasoning(rt: Runtime) -> None:
    """opencode#19081: a client replays an assistant turn without the reasoning it was sent with. A server cannot
    invent the KV of a context the model never saw, so what is restored is everything before the first token that
    differs: the turn's header. (A template that drops old reasoning itself, as Qwen3's do, costs the same.)"""
    rt.load_model(
        backend=lambda: StubBackend(n_seq_max=2, n_ctx_seq=1 << 14, eos_bias=-50.0, chat_template=THINKING_TEMPLATE),
        model_id="thinker",
    )
    system = "You reason step by step before you answer. " * 8
    turn: list[dict[str, Any]] = [
        {"role": "user", "content": "What is 2 + 2? Explain."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two plus two: count up from two, twice.", "signature": "s"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "And 3 + 3?"},
    ]  # fmt: skip
    with_thinking = {"model": "thinker", "system": system, "messages": turn, "max_tokens": 2}
    dropped = {**with_thinking, "messages": [turn[0], {"role": "assistant", "content": "It is 4."}, turn[2]]}
    (_, _, _), (restored, top, n) = replay(rt, "anthropic", [with_thinking, dropped])
    assert restored == top < n - 20
    prompt = prompt_tokens(rt, "thinker", "anthropic", dropped)
    assert bytes(t - 3 for t in prompt[top - 22 : top]).endswith(b"<|im_start|>assistant\n")
