"""Golden transcripts: every dialect's wire output for the same scripted conversations, streamed and not.

The stub answers from a script (see conftest), so the bytes a client receives are fixed once ids, timestamps and
durations are normalised. A change to any dialect's framing shows up here as a diff against ``golden/``; after a
deliberate change, rerun with ``ERLLAMA_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from erllama import Runtime
from tests.unit.server.conftest import request

GOLDEN = Path(__file__).parent / "golden"

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "openai_chat": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 64}),
    "openai_chat_stream": (
        "/v1/chat/completions",
        {"messages": HELLO, "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}},
    ),
    "openai_tools": (
        "/v1/chat/completions",
        {"messages": WEATHER, "max_tokens": 128, "tools": [{"type": "function", "function": WEATHER_TOOL}]},
    ),
    "openai_tools_stream": (
        "/v1/chat/completions",
        {
            "messages": WEATHER,
            "max_tokens": 128,
            "stream": True,
            "tools": [{"type": "function", "function": WEATHER_TOOL}],
        },
    ),
    "openai_completion_stream": ("/v1/completions", {"prompt": "Say hello", "max_tokens": 8, "stream": True}),
    "anthropic": ("/v1/messages", {"messages": HELLO, "max_tokens": 64}),
    "anthropic_stream": ("/v1/messages", {"messages": HELLO, "max_tokens": 64, "stream": True}),
    "anthropic_thinking_stream": (
        "/v1/messages",
        {
            "messages": [{"role": "user", "content": "think: what is 2 + 2?"}],
            "max_tokens": 64,
            "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 32},
        },
    ),
    "anthropic_tools_stream": (
        "/v1/messages",
        {
            "messages": WEATHER,
            "max_tokens": 128,
            "stream": True,
            "tools": [
                {
                    **{k: v for k, v in WEATHER_TOOL.items() if k != "parameters"},
                    "input_schema": WEATHER_TOOL["parameters"],
                }
            ],
        },
    ),
    "ollama_chat": ("/api/chat", {"messages": HELLO, "stream": False, "options": {"temperature": 0}}),
    "ollama_chat_stream": ("/api/chat", {"messages": HELLO, "options": {"temperature": 0}}),
    "ollama_tools_stream": (
        "/api/chat",
        {"messages": WEATHER, "tools": [{"type": "function", "function": WEATHER_TOOL}], "options": {"temperature": 0}},
    ),
    "ollama_generate_stream": ("/api/generate", {"prompt": "Say hello", "options": {"num_predict": 64}}),
}

_VOLATILE = [
    (re.compile(r"chatcmpl-[0-9a-f]+"), "chatcmpl-ID"),
    (re.compile(r"cmpl-[0-9a-f]+"), "cmpl-ID"),
    (re.compile(r"msg_[0-9a-f]+"), "msg_ID"),
    (re.compile(r"call_[0-9a-f]+"), "call_ID"),
    (re.compile(r'"created": \d+'), '"created": 0'),
    (re.compile(r'"created_at": "[^"]+"'), '"created_at": "T"'),
    (re.compile(r'"system_fingerprint": "[^"]+"'), '"system_fingerprint": "erllama-BUILD"'),  # version and build
    (re.compile(r'"(total|load|prompt_eval|eval)_duration": \d+'), r'"\1_duration": 0'),
    (re.compile(r'"context": \[[\d, ]*\]'), '"context": [...]'),
]


def normalise(text: str) -> str:
    for pattern, repl in _VOLATILE:
        text = pattern.sub(repl, text)
    return text


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", ["hermes", "plain"])
def test_transcript(srt: Runtime, case: str, model: str) -> None:
    path, body = CASES[case]
    resp = request(srt, "POST", path, json={"model": model, **body})
    assert resp.status_code == 200, resp.text
    text = resp.text if "stream" in case else json.dumps(resp.json(), ensure_ascii=False, indent=1) + "\n"
    got = f"{resp.headers['content-type']}\n{normalise(text)}"
    golden = GOLDEN / f"{case}.{model}.txt"
    if os.environ.get("ERLLAMA_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got, encoding="utf-8")
    assert golden.is_file(), f"{golden} is missing: run with ERLLAMA_UPDATE_GOLDEN=1 and review it"
    assert got == golden.read_text(encoding="utf-8")
