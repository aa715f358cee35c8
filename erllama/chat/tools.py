"""Tool calls in the model's text: the generic prompt for templates without tools, the grammar that forces a call,
the parser for the formats model families emit, and the stream filter that keeps call text out of streamed content.

Formats recognised (a call only counts when it names one of the request's tools):

* Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number, after optional text;
* Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
* Llama 3.x: ``<|python_tag|>`` (optional) then ``{"name": ..., "parameters": {...}}``;
* generic JSON (the fallback erllama asks for when the template has no tools): the whole reply, possibly in a
  ```json fence, is ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``, one call object, or a list of them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from erllama.chat.types import ChatResult, Message, Tool, ToolCall

__all__ = ["ToolStreamFilter", "parse_tool_calls"]  # the rest serves ChatEngine

HERMES = ("<tool_call>", "</tool_call>")
_MISTRAL = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"
_MARKERS = (HERMES[0], _MISTRAL, _PYTHON_TAG)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def generic_tool_prompt(tools: Sequence[Tool], required: str | None) -> str:
    """A system-prompt section describing ``tools`` and the JSON reply that calls them."""
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools],
        ensure_ascii=False,
        indent=1,
    )
    must = (
        f"You must call the tool {required!r} now."
        if required not in (None, "auto", "required")
        else "You must call at least one tool now."
        if required == "required"
        else "Call a tool only when it helps; otherwise answer normally."
    )
    return (
        f"You can call these tools:\n{listing}\n"
        'To call tools, reply with only this JSON: {"tool_calls": [{"name": "<tool name>", "arguments": {...}}]}\n'
        f"{must}"
    )


def render_calls_generic(calls: Sequence[ToolCall]) -> str:
    """Earlier tool calls, written the way the generic prompt asks the model to write them."""
    body = [{"name": c.name, "arguments": _loads(c.arguments, c.arguments)} for c in calls]
    return json.dumps({"tool_calls": body}, ensure_ascii=False)


def call_schema(tools: Sequence[Tool], choice: str) -> dict[str, Any]:
    """The JSON schema of one call object ({"name", "arguments"}) of the allowed tools."""
    allowed = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters) or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for t in allowed
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _loads(text: str, default: Any = None) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return default


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, Mapping):
        return None
    if "function" in obj and isinstance(obj["function"], Mapping):  # OpenAI-shaped
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(args, str):
        args = _loads(args, args)
    text = json.dumps(args, ensure_ascii=False) if not isinstance(args, str) else args
    return ToolCall(id=new_call_id(), name=name, arguments=text)


def _calls_in(obj: Any, names: set[str]) -> list[ToolCall] | None:
    """The calls a decoded JSON value holds, or None when it is not (only) tool calls."""
    if isinstance(obj, Mapping) and "tool_calls" in obj:
        obj = obj["tool_calls"]
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _first_json(text: str) -> tuple[Any, int] | None:
    text_stripped = text.lstrip()
    offset = len(text) - len(text_stripped)
    try:
        value, end = json.JSONDecoder().raw_decode(text_stripped)
    except ValueError:
        return None
    return value, offset + end


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> ChatResult:
    """Split a reply into content and the tool calls it makes (see the module's list of formats)."""
    names = {t.name for t in tools}
    if not names:
        return ChatResult(content=text)
    # Hermes: blocks anywhere after the content; an unterminated last block still counts
    if HERMES[0] in text:
        head, _, rest = text.partition(HERMES[0])
        calls: list[ToolCall] = []
        for block in (HERMES[0] + rest).split(HERMES[0])[1:]:
            body = block.split(HERMES[1], 1)[0]
            found = _calls_in(_loads(body.strip()), names)
            if found is None:
                return ChatResult(content=text)
            calls.extend(found)
        return ChatResult(content=head.strip(), tool_calls=tuple(calls))
    stripped = text.strip()
    for marker in (_MISTRAL, _PYTHON_TAG):
        if stripped.startswith(marker):
            stripped = stripped[len(marker) :].strip()
    fence = _FENCE.match(stripped)
    if fence:
        stripped = fence.group(1)
    first = _first_json(stripped)
    if first is not None and not stripped[first[1] :].strip():
        found = _calls_in(first[0], names)
        if found:
            return ChatResult(content="", tool_calls=tuple(found))
    return ChatResult(content=text)


class ToolStreamFilter:
    """Streams text while holding back anything that may turn out to be a tool call.

    Text before a call marker streams at once. A reply that starts like JSON (``{``, ``[`` or a fence) or a marker
    is held to the end, where :meth:`finish` parses the whole reply: held text that is not a call is released then.
    """

    def __init__(self, tools: Sequence[Tool]) -> None:
        self._tools = tools
        self._text = ""
        self._sent = 0
        self._holding = False

    def feed(self, delta: str) -> str:
        """Text that can be streamed now."""
        self._text += delta
        if self._holding:
            return ""
        start = self._text.lstrip()
        if not start:
            return ""
        if start[0] in "{[`" and self._sent == 0:
            self._holding = True
            return ""
        cut = len(self._text)
        for marker in _MARKERS:
            at = self._text.find(marker, self._sent)
            if at >= 0:
                self._holding = True
                cut = min(cut, at)
            else:  # a marker may be starting at the very end: hold its possible prefix back
                for k in range(min(len(marker) - 1, len(self._text) - self._sent), 0, -1):
                    if self._text.endswith(marker[:k]):
                        cut = min(cut, len(self._text) - k)
                        break
        out = self._text[self._sent : cut]
        self._sent = cut
        return out

    def finish(self) -> tuple[str, ChatResult]:
        """The text still to stream, and the whole reply parsed."""
        result = parse_tool_calls(self._text, self._tools)
        if result.tool_calls:
            rest = result.content[self._sent :] if len(result.content) > self._sent else ""
            return rest, result
        return self._text[self._sent :], result


def tool_messages_generic(messages: Sequence[Message], tool_role: bool) -> list[Message]:
    """Messages for a template without tools: calls become JSON content, results a tool (or user) turn."""
    out: list[Message] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            text = (m.content + "\n" if m.content else "") + render_calls_generic(m.tool_calls)
            out.append(Message(role="assistant", content=text))
        elif m.role == "tool" and not tool_role:
            label = f" {m.name}" if m.name else ""
            out.append(Message(role="user", content=f"Result of the tool{label}:\n{m.content}"))
        else:
            out.append(m)
    return out
