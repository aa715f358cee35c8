"""``ChatEngine``: a conversation in, a prompt (and the grammar that constrains the reply) out; a reply back in,
content and tool calls out. The HTTP dialects call it with dialect-neutral :mod:`erllama.chat.types`.

Templates: the model's own Jinja template (:class:`~erllama.chat.template.ChatTemplate`), compiled once per
distinct source; a model without one, or with one jinja2 cannot compile, uses llama.cpp's built-in templates.
Tools are rendered natively when the template knows about them, and otherwise described in the system prompt
with a generic JSON calling convention. A required or named ``tool_choice`` is enforced by a grammar, as is a
``response_format`` / ``format`` schema.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jinja2

from erllama.chat.stable import MARK
from erllama.chat.template import ChatTemplate
from erllama.chat.tools import (
    HERMES,
    ToolStreamFilter,
    call_schema,
    generic_tool_prompt,
    parse_tool_calls,
    tool_messages_generic,
)
from erllama.chat.types import ChatResult, Message, Tool, ToolChoice
from erllama.errors import InvalidInputError

__all__ = ["ChatEngine", "PreparedChat", "TemplateHost"]

log = logging.getLogger("erllama.chat")


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedChat:
    """A rendered conversation: the prompt, the grammar for the reply (or None), the tools it may call."""

    prompt: str
    grammar: str | None = None
    tools: tuple[Tool, ...] = ()
    template: str = "builtin"
    save_at: tuple[int, ...] = ()  # offsets in ``prompt`` where the client asked for cache breakpoints
    """``jinja`` (the model's template) or ``builtin`` (llama.cpp's)."""

    def parse(self, text: str) -> ChatResult:
        return parse_tool_calls(text, self.tools) if self.tools else ChatResult(content=text)

    def stream_filter(self) -> ToolStreamFilter | None:
        return ToolStreamFilter(self.tools) if self.tools else None


def _grammar(schema: Mapping[str, Any] | bool) -> str:
    from erllama._native import json_schema_to_grammar  # the converter lives in libllama-common

    return json_schema_to_grammar(schema)


def _cut_after(prompt: str, content: str) -> str:
    """``prompt`` (a conversation rendered with its last, assistant, message closed) cut right after that message's
    text, so that the reply continues it. Templates may trim a message, so the trimmed text is looked for."""
    text = content.strip()
    at = prompt.rfind(text)
    if at < 0:
        raise InvalidInputError(
            "the model's chat template does not render the final assistant message's text as"
            " given, so the reply cannot continue it"
        )
    return prompt[: at + len(text)]


class TemplateHost(Protocol):
    """What the engine needs of a model: its metadata (``chat_template``, ``bos_text``, ``eos_text``) and
    llama.cpp's built-in templates. A :class:`~erllama.runtime.Runtime` is one; so is a vocabulary-only model
    (the cluster's ingress renders prompts to route them without loading weights)."""

    def model_info(self, model_id: str) -> dict[str, Any]: ...

    def apply_chat_template(
        self, model_id: str, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> str: ...


class ChatEngine:
    """Chat templates, tools and structured output over one :class:`~erllama.runtime.Runtime`. Thread-safe;
    :meth:`prepare` may block (template rendering on the model's worker), so call it off the event loop."""

    def __init__(self, runtime: TemplateHost) -> None:
        self._runtime = runtime
        self._templates: dict[tuple[str, str, str], ChatTemplate | None] = {}
        self._lock = threading.Lock()

    def template(self, model_id: str) -> ChatTemplate | None:
        """The model's compiled Jinja template, or None when llama.cpp's built-ins are used."""
        info = self._runtime.model_info(model_id)
        source = info.get("chat_template")
        if not source:
            return None
        key = (str(source), str(info.get("bos_text", "")), str(info.get("eos_text", "")))
        with self._lock:
            if key not in self._templates:
                try:
                    self._templates[key] = ChatTemplate(key[0], bos_token=key[1], eos_token=key[2])
                except jinja2.TemplateSyntaxError as exc:
                    log.warning("model %s: its chat template does not compile (%s); using llama.cpp's", model_id, exc)
                    self._templates[key] = None
            return self._templates[key]

    def prepare(
        self,
        model_id: str,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice = "auto",
        response_schema: Mapping[str, Any] | bool | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        continue_final: bool = False,
    ) -> PreparedChat:
        """Render ``messages`` for ``model_id``.

        Cache breakpoints marked in the messages' text with :data:`~erllama.chat.stable.MARK` are removed from
        the prompt and reported as ``save_at`` offsets in it: the conversation is rendered with and without the
        marks, and a mark counts only where the text before it is the same in both (a template that rewrites
        the text around it, or escapes it, loses that breakpoint, never the prompt).

        Args:
            tools: functions the model may call; ``tool_choice`` as in :data:`~erllama.chat.types.ToolChoice`.
            response_schema: a JSON schema the reply must satisfy (``{"type": "object"}`` for any JSON object).
            continue_final: when the last message is the assistant's (text, no tool calls), the reply continues
                it (Anthropic's prefill, ``continue_final_message``): the prompt ends inside that message instead
                of closing it and opening a new turn.

        Raises:
            InvalidInputError: an empty conversation, a tool_choice naming an unknown tool, or a template that
                refuses the conversation; SchemaError for a schema the grammar converter cannot handle.
        """
        kw: dict[str, Any] = {
            "tools": tools,
            "tool_choice": tool_choice,
            "response_schema": response_schema,
            "add_generation_prompt": add_generation_prompt,
            "template_kwargs": template_kwargs,
            "continue_final": continue_final,
        }
        if not any(MARK in m.content for m in messages):
            return self._prepare(model_id, messages, **kw)
        clean = [dataclasses.replace(m, content=m.content.replace(MARK, "")) for m in messages]
        real = self._prepare(model_id, clean, **kw)
        marked = self._prepare(model_id, messages, **kw).prompt
        offsets, at = set(), 0
        for piece in marked.split(MARK)[:-1]:
            at += len(piece)
            offsets.add(at)
        stripped = marked.replace(MARK, "")
        keep = sorted(o for o in offsets if 0 < o <= len(real.prompt) and stripped[:o] == real.prompt[:o])
        return dataclasses.replace(real, save_at=tuple(keep))

    def _prepare(
        self,
        model_id: str,
        messages: Sequence[Message],
        *,
        tools: Sequence[Tool],
        tool_choice: ToolChoice,
        response_schema: Mapping[str, Any] | bool | None,
        add_generation_prompt: bool,
        template_kwargs: Mapping[str, Any] | None,
        continue_final: bool,
    ) -> PreparedChat:
        if not messages:
            raise InvalidInputError("the conversation has no messages")
        if tool_choice not in ("auto", "none", "required") and tool_choice not in {t.name for t in tools}:
            raise InvalidInputError(f"tool_choice names {tool_choice!r}, which is not one of the request's tools")
        if tool_choice == "required" and not tools:
            raise InvalidInputError("tool_choice is 'required' but the request has no tools")
        active = tuple(tools) if tool_choice != "none" else ()
        last = messages[-1]
        prefill = continue_final and last.role == "assistant" and not last.tool_calls and bool(last.content.strip())
        if prefill:
            add_generation_prompt = False
        template = self.template(model_id)
        native = template is not None and template.supports_tools and template.supports_tool_calls
        tool_role = template is not None and template.supports_tool_role
        msgs = list(messages) if native else tool_messages_generic(messages, tool_role)
        if active and not native:
            section = generic_tool_prompt(active, tool_choice)
            if msgs[0].role == "system":
                msgs[0] = dataclasses.replace(msgs[0], content=f"{msgs[0].content}\n\n{section}")
            else:
                msgs.insert(0, Message(role="system", content=section))
        if template is not None:
            prompt = template.render(
                msgs, tools=active if native else (), add_generation_prompt=add_generation_prompt, extra=template_kwargs
            )
        else:
            prompt = self._runtime.apply_chat_template(
                model_id, [(m.role, m.content) for m in msgs], add_generation_prompt=add_generation_prompt
            )
        if prefill:
            prompt = _cut_after(prompt, last.content)
        grammar = None
        if active and tool_choice != "auto":
            one = call_schema(active, tool_choice)
            if native and template is not None and HERMES[0] in template.source:
                rules = _grammar(one).replace("root ::=", "tool-call-json ::=", 1)
                grammar = f'root ::= "{HERMES[0]}\\n" tool-call-json "\\n{HERMES[1]}"\n{rules}'
            else:
                schema = {
                    "type": "object",
                    "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
                    "required": ["tool_calls"],
                }
                grammar = _grammar(schema)
        elif response_schema is not None:
            grammar = _grammar(response_schema)
        return PreparedChat(prompt, grammar, active, "jinja" if template is not None else "builtin")
