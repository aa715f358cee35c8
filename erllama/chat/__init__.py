"""Conversations for the HTTP dialects: chat templates (Jinja, HF semantics), tools and structured output.

``types`` holds the dialect-neutral messages; ``template`` renders the model's Jinja template; ``tools`` renders,
forces and parses tool calls; ``engine`` ties them to a runtime.
"""

from erllama.chat.engine import ChatEngine, PreparedChat, TemplateHost
from erllama.chat.schema import JSON_OBJECT_SCHEMA
from erllama.chat.template import ChatTemplate, TemplateRenderError
from erllama.chat.tools import ToolStreamFilter, parse_tool_calls
from erllama.chat.types import ChatResult, Message, Role, Tool, ToolCall, ToolChoice

__all__ = [
    "JSON_OBJECT_SCHEMA",
    "ChatEngine",
    "ChatResult",
    "ChatTemplate",
    "Message",
    "PreparedChat",
    "Role",
    "TemplateHost",
    "TemplateRenderError",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolStreamFilter",
    "parse_tool_calls",
]
