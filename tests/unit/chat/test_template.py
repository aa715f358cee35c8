"""Jinja chat templates: HF semantics, tools, refusal and the sandbox."""

from __future__ import annotations

import jinja2
import pytest

from erllama.chat import ChatTemplate, Message, TemplateRenderError, Tool, ToolCall

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_renders_like_hf_with_trim_and_lstrip_blocks() -> None:
    source = "{{ bos_token }}\n{% for m in messages %}\n    [{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}\n"
    t = ChatTemplate(source, bos_token="<s>")
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one
    assert t.render([Message("user", "hi"), Message("assistant", "yo")]) == "<s>\n    [user] hi\n    [assistant] yo\n"


def test_generation_prompt_switch() -> None:
    t = ChatTemplate(CHATML)
    msgs = [Message("user", "hi")]
    assert t.render(msgs).endswith("<|im_start|>assistant\n")
    assert t.render(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_tools_and_calls_reach_the_template_as_hf_dicts() -> None:
    source = (
        "{% for t in tools %}T:{{ t.function.name }}:{{ t.function.parameters | tojson }}\n{% endfor %}"
        "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "C:{{ c.function.name }}:{{ c.function.arguments | tojson }}\n{% endfor %}"
        "{% elif m.role == 'tool' %}R:{{ m.tool_call_id }}:{{ m.content }}\n{% else %}{{ m.content }}\n{% endif %}"
        "{% endfor %}"
    )
    t = ChatTemplate(source)
    assert t.supports_tools
    assert t.supports_tool_calls
    assert t.supports_tool_role
    tool = Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    msgs = [
        Message("user", "Weather in Zürich?"),
        Message("assistant", "", (ToolCall("c1", "get_weather", '{"city": "Zürich"}'),)),
        Message("tool", "sunny", tool_call_id="c1"),
    ]
    out = t.render(msgs, tools=[tool])
    assert 'T:get_weather:{"type": "object", "properties": {"city": {"type": "string"}}}' in out
    assert 'C:get_weather:{"city": "Zürich"}' in out  # arguments as an object; tojson keeps non-ASCII text
    assert "R:c1:sunny" in out


def test_raise_exception_is_a_clear_input_error() -> None:
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert t.render([Message("user", "x")]) == "ok"
    with pytest.raises(TemplateRenderError, match="first must be user"):
        t.render([Message("assistant", "x")])


def test_sandbox_refuses_unsafe_access() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateRenderError):
        t.render([Message("user", "x")])
    t = ChatTemplate("{% set _ = messages.append(1) %}x")  # the sandbox is immutable
    with pytest.raises(TemplateRenderError):
        t.render([Message("user", "x")])


def test_syntax_error_surfaces_at_compile_time() -> None:
    with pytest.raises(jinja2.TemplateSyntaxError):
        ChatTemplate("{% for m in messages %}")


def test_strftime_now_and_loopcontrols() -> None:
    t = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "|{{ strftime_now('%Y') | length }}"
    )
    assert t.render([Message("user", "a"), Message("user", "b")]) == "a|4"
