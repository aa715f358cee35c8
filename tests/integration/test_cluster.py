"""erllama on a Ray Serve cluster (issue 22): a local Ray cluster of two nodes, one SmolLM2 replica on each, the
ingress behind Ray's HTTP proxy. The official clients work through the proxy; a conversation resent turn by turn
stays on one replica and hits; a prompt cached by one replica is restored by the other from the shared disk tier;
a replica killed mid-stream ends that stream with an error, Ray brings it back, and service goes on."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="erllama[cluster] is not installed (scripts/bootstrap installs it)")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from erllama.cluster import ClusterConfig, build  # noqa: E402
from erllama.cluster.replica import REPLICA_HEADER  # noqa: E402
from erllama.testing import free_port  # noqa: E402

pytestmark = [pytest.mark.native, pytest.mark.smollm2, pytest.mark.slow]

SYSTEM = "You are a patient assistant who answers in one short sentence. " * 8


@pytest.fixture(scope="module")
def cluster(smollm2_path: Path, native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kv = tmp_path_factory.mktemp("kv-shared")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ClusterConfig(
        model=str(smollm2_path),
        name="smollm2",
        replicas=2,
        max_replicas_per_node=1,
        ctx=1024,
        parallel=2,
        batch=256,
        ram_cache_mb=256,
        disk_cache_mb=512,
        kv_dir=str(kv),
        stats_period_s=0.5,
    )
    serve.run(build(config), name="erllama", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        nodes.shutdown()  # type: ignore[no-untyped-call]


def _replicas(base: str) -> list[str]:
    """Both replicas' names, found by asking until each has answered."""
    seen: set[str] = set()
    with httpx.Client(base_url=base, timeout=120) as c:
        for i in range(40):
            r = c.post("/v1/completions", json={"model": "smollm2", "prompt": f"{uuid.uuid4()} {i}", "max_tokens": 1})
            assert r.status_code == 200, r.text
            seen.add(r.headers[REPLICA_HEADER])
            if len(seen) == 2:
                return sorted(seen)
    raise AssertionError(f"only {seen} answered")


def _metric(base: str, replica: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={REPLICA_HEADER: replica}, timeout=60).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_official_clients_work_through_the_proxy(cluster: str) -> None:
    oa = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    reply = oa.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content
    streamed = oa.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == reply.choices[0].message.content, "greedy: streamed and whole replies agree"

    an = anthropic.Anthropic(base_url=cluster, api_key="unused", max_retries=0)
    msg = an.messages.create(
        model="smollm2",
        system=SYSTEM,
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=12,
        extra_body={"temperature": 0},
    )
    whole = "".join(b.text for b in msg.content if b.type == "text")
    assert whole
    with an.messages.stream(
        model="smollm2",
        system=SYSTEM,
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=12,
        extra_body={"temperature": 0},
    ) as stream:
        assert "".join(stream.text_stream) == whole
    assert [m.id for m in oa.models.list().data] == ["smollm2"]


def test_bad_requests_get_the_dialect_s_errors_through_the_proxy(cluster: str) -> None:
    with httpx.Client(base_url=cluster, timeout=120) as c:
        huge = c.post("/v1/chat/completions", content=b"x" * (65 << 20), headers={"content-type": "application/json"})
        assert huge.status_code == 413
        assert huge.json()["error"]["type"] == "invalid_request_error"
        bad = c.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400, bad.text
        assert bad.json()["type"] == "error", "the replica's own Anthropic envelope, passed through"
        missing = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 404
        assert missing.headers[REPLICA_HEADER]


@pytest.mark.parametrize("conversation", range(3))
def test_a_conversation_stays_on_one_replica_and_hits(cluster: str, conversation: int) -> None:
    oa = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    messages: list[Any] = [{"role": "system", "content": f"{uuid.uuid4()} {SYSTEM}"}]
    where: list[str] = []
    cached: list[int] = []
    prompts: list[int] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: say a number."})
        raw = oa.chat.completions.with_raw_response.create(
            model="smollm2", messages=messages, max_tokens=8, temperature=0
        )
        where.append(raw.headers[REPLICA_HEADER])
        reply = raw.parse()
        assert reply.usage is not None
        assert reply.usage.prompt_tokens_details is not None
        cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
        prompts.append(reply.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert len(set(where)) == 1, f"the turns went to {where}"
    assert cached[0] == 0
    # each turn restores the whole conversation before it (the previous prompt and its reply), not just the system
    assert all(cached[t] >= prompts[t - 1] for t in range(1, 4)), f"restored {cached} of prompts {prompts}"


def test_a_prompt_cached_by_one_replica_is_restored_by_the_other_from_the_shared_disk(cluster: str) -> None:
    a, b = _replicas(cluster)
    prompt = f"{uuid.uuid4()} " + "A long document about llamas and their habits. " * 20
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    with httpx.Client(base_url=cluster, timeout=120) as c:
        first = c.post("/v1/completions", json=body, headers={REPLICA_HEADER: a})
        assert first.headers[REPLICA_HEADER] == a
        assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        learned = _metric(cluster, b, "erllama_cache_disk_rows_learned")
        promoted = _metric(cluster, b, "erllama_cache_promotions")
        deadline = time.monotonic() + 30
        second = None
        while time.monotonic() < deadline:  # a's disk write is asynchronous: until it is published, b is cold
            second = c.post("/v1/completions", json=body, headers={REPLICA_HEADER: b})
            assert second.headers[REPLICA_HEADER] == b
            if second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0:
                break
            time.sleep(0.5)
    assert second is not None
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 100
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"], "a disk restore = the cold run"
    assert _metric(cluster, b, "erllama_cache_disk_rows_learned") > learned
    assert _metric(cluster, b, "erllama_cache_promotions") > promoted, "b loaded a's row from disk"


def test_a_replica_killed_mid_stream_ends_that_stream_only_and_comes_back(cluster: str) -> None:
    a, b = _replicas(cluster)
    oa = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0, timeout=120)
    other: dict[str, Any] = {}

    def calm() -> None:  # a stream on the replica that stays up
        try:
            with httpx.Client(base_url=cluster, timeout=120) as c:
                r = c.post(
                    "/v1/completions",
                    json={"model": "smollm2", "prompt": "Count: one, two,", "max_tokens": 64, "stream": True},
                    headers={REPLICA_HEADER: b},
                )
                other["status"] = r.status_code
                other["text"] = r.text
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            other["error"] = exc

    raw = oa.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a very long story about a llama."}],
        max_tokens=600,
        stream=True,
        extra_headers={REPLICA_HEADER: a},
    )
    assert raw.headers[REPLICA_HEADER] == a
    calm_thread = threading.Thread(target=calm)
    calm_thread.start()
    chunks = 0

    def read_until_it_fails() -> None:
        nonlocal chunks
        for _ in raw.parse():
            chunks += 1
            if chunks == 3:
                ray.kill(ray.get_actor(f"SERVE_REPLICA::erllama#ModelReplica#{a}", namespace="serve"))

    with pytest.raises(openai.APIError, match="replica"):
        read_until_it_fails()
    assert 3 <= chunks < 600
    calm_thread.join(120)
    assert other.get("status") == 200, f"the other stream: {other}"
    assert "[DONE]" in other.get("text", ""), f"the other stream: {other}"

    # failures before a response starts are sent again: every request succeeds while Ray replaces the replica
    with httpx.Client(base_url=cluster, timeout=120) as c:
        for i in range(4):
            r = c.post("/v1/completions", json={"model": "smollm2", "prompt": f"{i} {uuid.uuid4()}", "max_tokens": 2})
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        deployment = serve.status().applications["erllama"].deployments["ModelReplica"]
        running = {getattr(k, "value", k): v for k, v in deployment.replica_states.items()}.get("RUNNING", 0)
        if deployment.status == "HEALTHY" and running == 2:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the replica did not come back: {serve.status()}")
    assert len(_replicas(cluster)) == 2
