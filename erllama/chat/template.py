"""Chat templates: the model's own Jinja template, rendered the way Hugging Face's ``apply_chat_template`` does.

The template runs in jinja2's immutable sandbox (no attribute writes, no unsafe calls) with HF's conventions:
``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that keeps non-ASCII text,
``raise_exception`` and ``strftime_now``, and the variables ``messages``, ``tools``, ``add_generation_prompt``,
``bos_token`` and ``eos_token``. A template that does not compile is not used: the caller falls back to
llama.cpp's built-in templates.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from erllama.chat.types import Message, Tool
from erllama.errors import InvalidInputError

__all__ = ["ChatTemplate", "TemplateRenderError"]


class TemplateRenderError(InvalidInputError):
    """The template refused the conversation (``raise_exception``), or failed while rendering it."""


def _raise(message: str) -> NoReturn:
    raise TemplateRenderError(f"the chat template refused the conversation: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def hf_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as Hugging Face templates expect them (tool calls with their arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        if m.thinking:
            d["reasoning_content"] = m.thinking
        out.append(d)
    return out


def hf_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]


class ChatTemplate:
    """One compiled template and the special-token texts it is rendered with."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        """Raises ``jinja2.TemplateSyntaxError`` when ``source`` does not compile."""
        self.source = source
        self._template = _environment().from_string(source)
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}
        # what the template can express natively; anything else is rendered in a generic way by the caller
        self.supports_tools = "tools" in source
        self.supports_tool_role = "tool" in source.replace("tools", "")
        self.supports_tool_calls = "tool_calls" in source

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool] = (),
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        variables: dict[str, Any] = {
            **self._specials,
            "messages": hf_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            **(extra or {}),
        }
        if tools:
            variables["tools"] = hf_tools(tools)
        try:
            return self._template.render(**variables)
        except TemplateRenderError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateRenderError(f"the chat template failed on this conversation: {exc}") from exc
