"""Plain ``erllama serve`` daemons behind SGLang's model gateway (``smg``, from PyPI), as a gateway user would run
them (issue 22): requests go through the gateway to two daemons, and a conversation resent turn by turn under the
gateway's cache-aware policy keeps hitting the cache. Skipped where ``smg`` is not installed (scripts/bootstrap
installs it where PyPI has a wheel for the machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.model import LlamaBackend
from erllama.server import create_app
from erllama.testing import free_port, serve_app

pytestmark = [pytest.mark.native, pytest.mark.smollm2, pytest.mark.slow]

SMG = shutil.which("smg", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module")
def gateway(smollm2_path: Path, native: None) -> Iterator[str]:
    if SMG is None:
        pytest.skip("smg (SGLang's model gateway) is not installed here")
    with ExitStack() as stack:
        urls = []
        cfg = ContextConfig(n_ctx=2048, n_batch=256, n_seq_max=2, n_threads=1, n_threads_batch=1)
        for _ in range(2):
            rt = Runtime(CacheStore([RamTier(1 << 29)]), policy=SavePolicy(min_tokens=8))
            stack.callback(rt.close)
            rt.load_model(backend=lambda: LlamaBackend(smollm2_path, context_config=cfg), model_id="smollm2")
            urls.append(stack.enter_context(serve_app(create_app(rt, {"smollm2": "smollm2"}))))
        port = free_port()
        log = stack.enter_context(open(Path(os.environ.get("TMPDIR", "/tmp")) / f"smg-{port}.log", "w"))
        proc = subprocess.Popen(
            [SMG, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
             "--policy", "cache_aware", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.callback(proc.wait, 30)
        stack.callback(proc.terminate)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"smg did not come up (exit {proc.poll()}); see {log.name}")
            time.sleep(0.5)
        yield base


def test_requests_go_through_the_gateway(gateway: str) -> None:
    oa = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = oa.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    streamed = oa.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


def test_a_conversation_through_the_gateway_keeps_hitting(gateway: str) -> None:
    oa = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    messages: list[Any] = [{"role": "system", "content": f"{uuid.uuid4()} You answer briefly. " * 6}]
    cached = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: a number?"})
        reply = oa.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
        assert reply.usage is not None
        assert reply.usage.prompt_tokens_details is not None
        cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert all(c > 50 for c in cached[1:]), f"the gateway kept each turn where the conversation is warm: {cached}"
