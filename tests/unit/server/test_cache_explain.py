"""Every miss explained: the ``x-erllama-cache`` header, the dialects' counts, and the debug line that names the
message a prompt left its cached row in — on a template that renders an old turn differently once it is old."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from erllama import Runtime
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.cache.report import parse_header
from erllama.model import StubBackend

from .conftest import GREETING, request, script

# The newest user turn is marked "(latest)"; once a newer one follows, it is rendered plain. So every new turn's
# prompt leaves the previous request's rows inside the previous user message (Qwen3's templates do the same to old
# assistant turns, dropping their reasoning).
MARKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}"
    "{% if m.role == 'user' and loop.last %} (latest){% endif %}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime(CacheStore([RamTier(1 << 24)]), policy=SavePolicy(min_tokens=8))
    runtime.load_model(
        backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0, chat_template=MARKING_TEMPLATE, script=script),
        model_id="hermes",
    )
    yield runtime
    runtime.close()
    assert runtime.cache is not None
    runtime.cache.close()


def test_a_template_that_changes_an_old_turn_is_explained(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly and kindly."}
    first = [system, {"role": "user", "content": "Say hi to everyone in the room, please."}]
    r1 = request(rt, "POST", "/api/chat", json={"model": "hermes", "messages": first, "stream": False})
    assert r1.status_code == 200, r1.text
    assert parse_header(r1.headers["x-erllama-cache"])["kind"] == "cold"

    second = [*first, {"role": "assistant", "content": GREETING}, {"role": "user", "content": "And again?"}]
    with caplog.at_level(logging.DEBUG, logger="erllama.server"):
        r2 = request(
            rt,
            "POST",
            "/api/chat",
            json={"model": "hermes", "messages": second, "stream": False},
            headers={"x-erllama-explain": "1"},
        )
    assert r2.status_code == 200, r2.text
    header = parse_header(r2.headers["x-erllama-cache"])
    # where the old user turn's "(latest)" mark was: the first token that differs from the cached rows
    old = "<|im_start|>system" + system["content"] + "<|im_end|>\n<|im_start|>user"  # (the template trims newlines)
    at = len(rt.tokenize("hermes", old, parse_special=True))
    assert header["diverged_at"] == str(at)
    assert header["restored"] == str(at)  # everything before the first differing token is restored
    assert header["message"] == "1"  # the first user message (the system prompt is message 0)
    cache = r2.json()["cache"]
    assert cache["diverged_at"] == at
    assert cache["message"] == 1
    assert cache["cached_tokens"] == at
    line = next(r.getMessage() for r in caplog.records if "left the nearest cached row" in r.getMessage())
    assert f"at token {at} in message 1" in line
    assert cache["reason"] == line.removeprefix("model hermes: ")  # what `erllama run -v` prints
    assert "the cache holds ' (late'" in line  # what the cache holds there (six stub tokens: six bytes)
    assert r2.json()["prompt_eval_cached_count"] == at


def test_no_explanation_is_worked_out_unless_asked(rt: Runtime) -> None:
    """Without the request header (and debug logging off) the header still says where, not in which message."""
    msgs = [{"role": "user", "content": "Say hi to everyone in the room, please, all of them."}]
    request(rt, "POST", "/v1/chat/completions", json={"model": "hermes", "messages": msgs})
    msgs2 = [*msgs, {"role": "assistant", "content": GREETING}, {"role": "user", "content": "Once more."}]
    r = request(rt, "POST", "/v1/chat/completions", json={"model": "hermes", "messages": msgs2})
    header = parse_header(r.headers["x-erllama-cache"])
    assert "diverged_at" in header
    assert "message" not in header
    assert int(header["restored"]) == r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
