"""Agent-shaped request sequences in each dialect's wire format, and the prompt tokens the daemon renders for them.

Coding agents resend their whole conversation every turn: a long system prompt and tool scaffold, then a growing
loop of tool calls and results. The sequences here replay such a session with *recorded* assistant turns (as a
trace replay does): each request's reply is not fed back, so every request's prompt, and therefore the most a
cache can restore of it (its *ceiling*), is known in advance. :func:`ceiling` computes it from the prompts' tokens.

* :func:`tool_loop`: a plain tool loop in the OpenAI, Anthropic or Ollama wire format.
* :func:`claude_code_session`: the Anthropic requests Claude Code sends: a volatile billing-header block first in the
  system prompt (a new ``cch`` every request), ``cache_control`` breakpoints on the system blocks, the last tool
  and the newest message, and parallel tool calls whose results the client may replay in another order.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from typing import Any

from erllama.chat.stable import StableOptions, stabilize
from erllama.chat.types import Message, Tool

__all__ = ["ceiling", "claude_code_session", "prompt_tokens", "tool_loop", "words"]

_PHRASE = (
    "the agent reads each file before it edits it and runs the tests after every change so that a failing build "
    "is found early never guess at an interface open the module first prefer small focused commits describe what "
    "changed and why keep the public api stable unless asked handle errors explicitly log what matters and nothing "
    "else respect the style of the code around you when unsure ask one short question instead of assuming"
)
_WORDS = tuple(_PHRASE.split())

_TOOLS = [
    ("read_file", "Read a file of the repository and return its text.", {"path": "string"}),
    ("write_file", "Replace a file's text with new text.", {"path": "string", "text": "string"}),
    ("run_tests", "Run the test suite, or the tests matching a pattern, and return the report.", {"pattern": "string"}),
    ("grep", "Search the repository for a regular expression.", {"pattern": "string", "path": "string"}),
    ("list_dir", "List a directory of the repository.", {"path": "string"}),
    ("bash", "Run a shell command in the repository and return its output.", {"command": "string"}),
]


def words(n: int, seed: int) -> str:
    """``n`` words of plausible instruction text, the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _schema(props: dict[str, str]) -> dict[str, Any]:
    return {"type": "object", "properties": {k: {"type": v} for k, v in props.items()}, "required": list(props)}


def _steps(turns: int, seed: int, result_words: int = 40) -> list[tuple[str, dict[str, str], str]]:
    """The recorded loop: per turn the tool called, its arguments, and its result."""
    rng = random.Random(seed)
    out = []
    for i in range(turns):
        name, _, props = _TOOLS[i % len(_TOOLS)]
        args = {k: f"src/module_{i}/{k}_{rng.randrange(100)}.py" for k in props}
        out.append((name, args, f"result {i}: " + words(result_words, seed * 1000 + i)))
    return out


def tool_loop(dialect: str, turns: int, *, model: str, system_words: int = 300, seed: int = 1) -> list[dict[str, Any]]:
    """The request bodies of a ``turns``-turn tool loop resent whole each turn (``openai``, ``anthropic`` or
    ``ollama``): request ``t`` holds the task and the first ``t`` recorded tool calls with their results."""
    system = "You are a coding agent. " + words(system_words, seed)
    task = "Fix the failing test in the payments module and explain the cause."
    steps = _steps(turns - 1, seed)
    bodies = []
    for t in range(turns):
        done = steps[:t]
        if dialect == "anthropic":
            msgs: list[dict[str, Any]] = [{"role": "user", "content": task}]
            for i, (name, args, result) in enumerate(done):
                msgs.append({"role": "assistant", "content": [
                    {"type": "text", "text": f"Step {i}: calling {name}."},
                    {"type": "tool_use", "id": f"toolu_{i}", "name": name, "input": args},
                ]})  # fmt: skip
                msgs.append({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": result},
                ]})  # fmt: skip
            tools = [{"name": n, "description": d, "input_schema": _schema(p)} for n, d, p in _TOOLS]
            bodies.append({"model": model, "system": system, "messages": msgs, "tools": tools, "max_tokens": 4})
            continue
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        for i, (name, args, result) in enumerate(done):
            if dialect == "openai":
                call = {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                msgs.append({"role": "assistant", "content": f"Step {i}: calling {name}.", "tool_calls": [call]})
                msgs.append({"role": "tool", "tool_call_id": f"call_{i}", "content": result})
            else:
                call = {"function": {"name": name, "arguments": args}}
                msgs.append({"role": "assistant", "content": f"Step {i}: calling {name}.", "tool_calls": [call]})
                msgs.append({"role": "tool", "content": result, "tool_name": name})
        fns = [
            {"type": "function", "function": {"name": n, "description": d, "parameters": _schema(p)}}
            for n, d, p in _TOOLS
        ]
        if dialect == "openai":
            bodies.append({"model": model, "messages": msgs, "tools": fns, "max_tokens": 4, "temperature": 0})
        else:
            bodies.append({"model": model, "messages": msgs, "tools": fns, "stream": False,
                           "options": {"num_predict": 4, "temperature": 0}})  # fmt: skip
    return bodies


def claude_code_session(
    turns: int,
    *,
    model: str,
    system_words: int = 1500,
    result_words: int = 40,
    seed: int = 7,
    shuffle_results: bool = True,
) -> list[dict[str, Any]]:
    """The Anthropic requests of a Claude-Code-shaped session (see the module): each turn the agent calls two
    tools in parallel; on a resend the client may list their results in the other order (``shuffle_results``)."""
    rng = random.Random(seed)
    identity = "You are Claude Code, an interactive command line tool that helps users with software engineering."
    instructions = words(system_words, seed)
    tools: list[dict[str, Any]] = [{"name": n, "description": d, "input_schema": _schema(p)} for n, d, p in _TOOLS]
    tools[-1] = {**tools[-1], "cache_control": {"type": "ephemeral"}}
    history: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Why does the build fail?"}]}
    ]
    bodies = []
    for t in range(turns):
        cch = f"{rng.randrange(16**5):05x}"
        billing = f"x-anthropic-billing-header: cc_version=2.1.177.{cch[:3]}; cc_entrypoint=cli; cch={cch};"
        system = [
            {"type": "text", "text": billing},
            {"type": "text", "text": identity, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": instructions, "cache_control": {"type": "ephemeral"}},
        ]  # fmt: skip
        msgs = copy.deepcopy(history)
        for m in msgs:  # the newest message carries the moving breakpoint
            for block in m["content"]:
                block.pop("cache_control", None)
        msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        if shuffle_results and t % 2 == 1:  # a resend listing parallel results in another order
            for m in msgs:
                if m["role"] == "user" and len(m["content"]) > 1:
                    m["content"].reverse()
        bodies.append({"model": model, "system": system, "tools": tools, "messages": msgs, "max_tokens": 4})
        (a, a_args, a_res), (b, b_args, b_res) = _steps(2 * t + 2, seed, result_words)[2 * t :]
        history.append({"role": "assistant", "content": [
            {"type": "text", "text": f"Let me look at two things at once (step {t})."},
            {"type": "tool_use", "id": f"toolu_{t}a", "name": a, "input": a_args},
            {"type": "tool_use", "id": f"toolu_{t}b", "name": b, "input": b_args},
        ]})  # fmt: skip
        history.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{t}a", "content": a_res},
            {"type": "tool_result", "tool_use_id": f"toolu_{t}b", "content": b_res},
        ]})  # fmt: skip
    return bodies


def prompt_tokens(
    runtime: Any, model_id: str, dialect: str, body: dict[str, Any], stable: StableOptions | None = None
) -> list[int]:
    """The prompt tokens the daemon renders for ``body`` (its wire model, the stable rewrites, the chat template)."""
    from erllama.chat import ChatEngine
    from erllama.server import anthropic, ollama_wire, openai_wire

    opts = stable or StableOptions()
    tools: Sequence[Tool]
    if dialect == "anthropic":
        req = anthropic.MessagesRequest.model_validate(body)
        messages: list[Message] = req.neutral(strip_billing=opts.strip_billing_header)
        tools, choice, cont = req.tool_list(), req.choice(), True
    elif dialect == "openai":
        oreq = openai_wire.ChatCompletionRequest.model_validate(body)
        messages = oreq.neutral()
        tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in oreq.tools or ()]
        choice, cont = oreq.choice(), oreq.continues()
    else:
        lreq = ollama_wire.ChatRequest.model_validate(body)
        messages = [m.neutral(i) for i, m in enumerate(lreq.messages)]
        tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in lreq.tools or ()]
        choice, cont = "auto", False
    messages, tools = stabilize(messages, tools, opts)
    prepared = ChatEngine(runtime).prepare(model_id, messages, tools=tools, tool_choice=choice, continue_final=cont)
    return list(runtime.tokenize(model_id, prepared.prompt, parse_special=True))


def ceiling(prompts: Sequence[Sequence[int]], t: int) -> int:
    """The most a cache can restore of request ``t``'s prompt from requests ``0..t-1``: the longest prefix it shares
    with one of their prompts (their replies are not resent: recorded turns replace them), short of its last token
    (always computed)."""
    new = prompts[t]
    best = 0
    for old in prompts[:t]:
        n = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        best = max(best, n)
    return min(best, len(new) - 1)
