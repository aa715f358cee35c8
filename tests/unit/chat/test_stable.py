"""Stable prefixes for agent traffic (erllama.chat.stable) and cache breakpoints as prompt offsets (ChatEngine)."""

from __future__ import annotations

from typing import Any

import pytest

from erllama.chat import ChatEngine, Message, Tool, ToolCall
from erllama.chat.stable import MARK, StableOptions, stabilize, strip_billing_header

HEADER = "x-anthropic-billing-header: cc_version=2.1.177.01c; cc_entrypoint=cli; cch={};"


def test_the_billing_header_line_is_stripped_and_nothing_else() -> None:
    assert strip_billing_header(HEADER.format("36ee5") + "\nYou are a coding agent.") == "You are a coding agent."
    assert strip_billing_header("You are a coding agent.\n" + HEADER.format("1")) == (
        "You are a coding agent.\n" + HEADER.format("1")
    )  # only a leading line: a header quoted later in a prompt stays
    msgs, _ = stabilize([Message("system", HEADER.format("0aaa9")), Message("user", "hi")], [])
    assert [m.role for m in msgs] == ["user"]  # a system message that was only the header is dropped
    a, _ = stabilize([Message("system", HEADER.format("1") + "\nRules."), Message("user", "hi")], [])
    b, _ = stabilize([Message("system", HEADER.format("2") + "\nRules."), Message("user", "hi")], [])
    assert a == b
    kept, _ = stabilize(
        [Message("system", HEADER.format("1") + "\nRules.")], [], StableOptions(strip_billing_header=False)
    )
    assert kept[0].content.startswith("x-anthropic-billing-header")
    user, _ = stabilize([Message("user", HEADER.format("1"))], [])
    assert user[0].content == HEADER.format("1")  # only system text: a user may paste anything


def _turn(results_order: list[str]) -> list[Message]:
    calls = (ToolCall("call_a", "read", '{"path": "a"}'), ToolCall("call_b", "read", '{"path": "b"}'))
    results = {
        "call_a": Message("tool", "A", tool_call_id="call_a"),
        "call_b": Message("tool", "B", tool_call_id="call_b"),
    }
    return [
        Message("user", "read both"),
        Message("assistant", "", tool_calls=calls),
        *(results[i] for i in results_order),
    ]


def test_parallel_tool_results_go_back_in_call_order() -> None:
    assert stabilize(_turn(["call_b", "call_a"]), [])[0] == _turn(["call_a", "call_b"])
    unordered, _ = stabilize(_turn(["call_b", "call_a"]), [], StableOptions(order_tool_results=False))
    assert unordered == _turn(["call_b", "call_a"])
    odd = [*_turn(["call_b"]), Message("tool", "?", tool_call_id="unknown")]
    assert stabilize(odd, [])[0] == odd  # a result naming no call of the turn: left as the client sent it


def test_tools_are_sorted_by_name() -> None:
    tools = [Tool("write"), Tool("bash"), Tool("read")]
    assert [t.name for t in stabilize([], tools)[1]] == ["bash", "read", "write"]
    assert [t.name for t in stabilize([], tools, StableOptions(sort_tools=False))[1]] == ["write", "bash", "read"]


class Host:
    """A TemplateHost with a given Jinja template."""

    def __init__(self, template: str) -> None:
        self.template = template

    def model_info(self, model_id: str) -> dict[str, Any]:
        return {"chat_template": self.template, "bos_text": "", "eos_text": ""}

    def apply_chat_template(self, model_id: str, messages: Any, *, add_generation_prompt: bool = True) -> str:
        raise AssertionError("not used")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_breakpoints_become_offsets_in_the_prompt_and_leave_no_mark() -> None:
    engine = ChatEngine(Host(CHATML))
    msgs = [Message("system", "Be brief." + MARK + " Always."), Message("user", MARK + "hi")]
    prepared = engine.prepare("m", msgs)
    assert MARK not in prepared.prompt
    assert (
        prepared.prompt == engine.prepare("m", [Message("system", "Be brief. Always."), Message("user", "hi")]).prompt
    )
    cut = [prepared.prompt[:o] for o in prepared.save_at]
    assert cut == [
        "<|im_start|>system\nBe brief.",
        "<|im_start|>system\nBe brief. Always.<|im_end|>\n<|im_start|>user\n",
    ]


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content | tojson }}{% endfor %}",  # escapes the mark: it is not found
        "{% for m in messages %}{{ m.content | trim }}|{% endfor %}",  # trims around it: text differs after
    ],
)
def test_a_template_that_rewrites_around_a_mark_loses_that_breakpoint_not_the_prompt(template: str) -> None:
    engine = ChatEngine(Host(template))
    marked = engine.prepare("m", [Message("user", "hi " + MARK)], add_generation_prompt=False)
    plain = engine.prepare("m", [Message("user", "hi ")], add_generation_prompt=False)
    assert marked.prompt == plain.prompt
    assert all(marked.prompt[:o] == plain.prompt[:o] for o in marked.save_at)
