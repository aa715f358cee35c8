"""The dialect-neutral conversation: what every HTTP dialect turns its wire types into, and what it gets back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["ChatResult", "Message", "Role", "Tool", "ToolCall", "ToolChoice"]

Role = Literal["system", "user", "assistant", "tool"]


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool by the model. ``arguments`` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One turn. Tool results are ``role="tool"`` with the id (and name, when known) of the call they answer."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    thinking: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema of its arguments object."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"type": "object", "properties": {}})


ToolChoice = Literal["auto", "none", "required"] | str
"""``auto`` (the model decides), ``none`` (no calls), ``required`` (at least one), or a tool's name (that one)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChatResult:
    """The reply split into what the dialects report: text, tool calls and thinking."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    thinking: str | None = None
