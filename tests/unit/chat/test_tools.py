"""Tool-call parsing (model-family formats, generic JSON) and the stream filter that holds call text back."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from erllama.chat import Tool, ToolStreamFilter, parse_tool_calls

TOOLS = [Tool("get_weather", "", {"type": "object"}), Tool("add", "", {"type": "object"})]


def calls(text: str) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in parse_tool_calls(text, TOOLS).tool_calls]


def test_hermes_blocks_after_text() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    result = parse_tool_calls(text, TOOLS)
    assert result.content == "Let me check."
    assert calls(text) == [("get_weather", {"city": "Paris"})]


def test_hermes_several_and_unterminated() -> None:
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "東京"}}'
    )
    assert calls(text) == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "東京"})]


def test_mistral_llama_and_generic_forms() -> None:
    assert calls('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]') == [("add", {"a": 1})]
    assert calls('<|python_tag|>{"name": "add", "parameters": {"a": 2}}') == [("add", {"a": 2})]
    assert calls('{"tool_calls": [{"name": "add", "arguments": {"a": 3}}]}') == [("add", {"a": 3})]
    assert calls('```json\n{"name": "add", "arguments": "{\\"a\\": 4}"}\n```') == [("add", {"a": 4})]


def test_not_calls_stay_content() -> None:
    for text in (
        '{"name": "unknown_tool", "arguments": {}}',  # a tool the request does not have
        '{"answer": 42}',
        "<tool_call>not json</tool_call>",
        '{"name": "add", "arguments": {}} and then some words',
        "plain words",
    ):
        result = parse_tool_calls(text, TOOLS)
        assert result.tool_calls == ()
        assert result.content == text
    assert parse_tool_calls('{"name": "add", "arguments": {}}', []).content.startswith("{")


REPLIES = [
    "Hello there, 世界 👋",
    'Sure.<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>',
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}',
    '{"not": "a call"}',
    "<tool_ca is not a marker",
    "text [TOOL_CALLS] later",
]


@given(st.sampled_from(REPLIES), st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_stream_filter_matches_whole_parse_for_any_chunking(reply: str, cuts: list[int]) -> None:
    pieces, i = [], 0
    for n in cuts:
        if i >= len(reply):
            break
        pieces.append(reply[i : i + n])
        i += n
    pieces.append(reply[i:])
    filt = ToolStreamFilter(TOOLS)
    streamed = "".join(filt.feed(p) for p in pieces)
    rest, result = filt.finish()
    whole = parse_tool_calls(reply, TOOLS)
    assert result == whole or (result.content, len(result.tool_calls)) == (whole.content, len(whole.tool_calls))
    if whole.tool_calls:
        assert streamed + rest == whole.content  # call text never reaches the stream
    else:
        assert streamed + rest == reply  # everything streams, some of it maybe late
