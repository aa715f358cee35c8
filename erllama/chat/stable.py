"""Keeping agent traffic's prompt prefix stable, and the client's cache breakpoints as save points.

Agent clients resend their whole conversation every turn, and the KV cache restores only the tokens before the
first one that differs from a cached row. Three things clients do move that first difference to the front of the
prompt even though nothing the model needs has changed; :func:`stabilize` undoes each, with the risk noted:

* **A volatile first system block.** Claude Code puts ``x-anthropic-billing-header: cc_version=…; cch=…`` first in
  the system prompt, with a new ``cch`` (and version suffix) on every request: every request would miss from its
  first line. The line is billing metadata for Anthropic's API, not instructions for a model, so it is removed
  (the rest of that block, if any, is kept). Risk: none to the model's reply; a prompt that *quotes* such a line as
  its very first system text loses that line.
* **Parallel tool results in another order.** Results of one assistant turn's parallel calls are put back in the
  order of the calls (their ids): a client that replays them in another order (claude-code#76959) renders the
  same prompt. Risk: none — a template pairs results with calls by position, so call order is the right one.
* **Tool definitions in another order.** Tools are sorted by name (hermes-agent#27450 sends the same set in a
  different order each run). Risk: the model sees the tools in another order than the client listed them;
  the set, and each definition, are unchanged.

Cache breakpoints (Anthropic ``cache_control``; OpenAI ``prompt_cache_key``) are marked in the messages' text with
:data:`MARK` by the dialect; :class:`~erllama.chat.engine.ChatEngine` renders, finds and removes the marks, and
reports their offsets in the prompt, where the runtime saves a row while prefilling. A row per breakpoint lets a
conversation whose tail changed still restore its stable head, even on models whose cached rows cannot be cut
back (sliding-window attention).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from erllama.chat.types import Message, Tool

__all__ = ["BILLING_HEADER", "MARK", "StableOptions", "stabilize", "strip_billing_header"]

# Where a client asked for a cache breakpoint (removed before the prompt is tokenized): U+FDD0, a Unicode
# noncharacter, which the standard sets aside for a program's internal use (unlike private-use characters, which
# icon fonts assign and terminals print).
MARK = "\ufdd0"

BILLING_HEADER = re.compile(r"\A\s*x-anthropic-billing-header:[^\n]*(?:\n|\Z)")


@dataclasses.dataclass(frozen=True, slots=True)
class StableOptions:
    """Which of :func:`stabilize`'s rewrites run (all by default)."""

    strip_billing_header: bool = True
    order_tool_results: bool = True
    sort_tools: bool = True


def strip_billing_header(text: str) -> str:
    """``text`` without a leading ``x-anthropic-billing-header:`` line."""
    return BILLING_HEADER.sub("", text, count=1)


def stabilize(
    messages: Sequence[Message], tools: Sequence[Tool], options: StableOptions | None = None
) -> tuple[list[Message], list[Tool]]:
    """The conversation and tools with the volatile parts agent clients add made stable (see the module)."""
    opts = options or StableOptions()
    out = list(messages)
    if opts.strip_billing_header:
        stripped = []
        for m in out:
            if m.role == "system" and BILLING_HEADER.match(m.content):
                rest = strip_billing_header(m.content)
                if rest.strip(MARK + " \n"):
                    stripped.append(dataclasses.replace(m, content=rest))
                continue  # (a message that was only the header is dropped)
            stripped.append(m)
        out = stripped
    if opts.order_tool_results:
        out = _order_tool_results(out)
    tools_out = sorted(tools, key=lambda t: t.name) if opts.sort_tools else list(tools)
    return out, tools_out


def _order_tool_results(messages: list[Message]) -> list[Message]:
    """Each run of tool results after an assistant turn with calls, in the order of those calls."""
    out: list[Message] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        out.append(m)
        i += 1
        if m.role != "assistant" or len(m.tool_calls) < 2:
            continue
        j = i
        while j < len(messages) and messages[j].role == "tool":
            j += 1
        order = {call.id: k for k, call in enumerate(m.tool_calls)}
        results = messages[i:j]
        if all(r.tool_call_id in order for r in results):
            results = sorted(results, key=lambda r: order[r.tool_call_id or ""])
        out.extend(results)
        i = j
    return out
