"""Property-based fuzzing of every endpoint from the app's own OpenAPI schema (schemathesis): whatever a client
sends — wrong types, missing fields, huge numbers, odd unicode — the answer is never a 5xx."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from erllama import Runtime
from erllama.model import StubBackend
from erllama.server import ServerConfig, create_app
from tests.unit.server.conftest import HERMES_TEMPLATE, script


def _app() -> Any:
    rt = Runtime(None)
    rt.load_model(
        backend=lambda: StubBackend(
            n_seq_max=2, n_ctx_seq=1024, eos_bias=-50.0, chat_template=HERMES_TEMPLATE, script=script
        ),
        model_id="stub",
    )
    _RUNTIMES.append(rt)
    return create_app(
        rt, {"stub": "stub"}, ServerConfig(default_max_tokens=16, max_body_bytes=1 << 16, allowed_hosts=("testserver",))
    )


_RUNTIMES: list[Runtime] = []
schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@pytest.fixture(scope="module", autouse=True)
def _close_runtimes() -> Iterator[None]:
    yield
    for rt in _RUNTIMES:
        rt.close()


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("ERLLAMA_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    body: Any = case.body
    if isinstance(body, dict):
        # keep fuzzed replies short: the stub generates up to max_tokens when its script has no answer
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > 64:
                body[field] = 64
        options = body.get("options")
        if isinstance(options, dict) and isinstance(options.get("num_predict"), int):
            options["num_predict"] = min(options["num_predict"], 64)
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
