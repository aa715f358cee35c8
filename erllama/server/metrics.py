"""Prometheus metrics of the daemon (``GET /metrics``), on a registry of its own per app.

Request-level series are recorded by the routes; model and cache series are read at scrape time: queue depth and
running requests per model (also under vLLM's names, with its prefix-cache token counters, for gateways), models
loaded, bytes / rows / budget per cache tier, and every counter of the
runtime's cache (hits / misses by kind, saves by reason, evictions, latencies).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from erllama._native.loader import Library
    from erllama.runtime import Completion

__all__ = ["LiveView", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _loaded_library() -> Library | None:
    try:
        from erllama._native.loader import loaded_library
    except ImportError:  # no build at all: a stub-backed daemon
        return None
    return loaded_library()


@dataclasses.dataclass(frozen=True, slots=True)
class LiveView:
    """What a scrape reads of the daemon at that moment (the server state builds it; metrics reads nothing else).

    Attributes:
        queues: per loaded model, its served name, requests waiting for a slot and requests running.
        kv_usage: per loaded model, its served name and the share of its KV cells in use (0..1).
        models: how many models the daemon can serve by name.
        tiers: per cache tier, its name, bytes held, byte budget and rows.
        counters: the runtime cache's counters.
        tier_tokens: per cache tier, the prompt tokens its rows hold.
    """

    queues: tuple[tuple[str, int, int], ...] = ()
    models: int = 0
    tiers: tuple[tuple[str, int, int, int], ...] = ()
    counters: Mapping[str, float] = dataclasses.field(default_factory=dict)
    kv_usage: tuple[tuple[str, float], ...] = ()
    tier_tokens: tuple[tuple[str, int], ...] = ()


class _Live(Collector):
    def __init__(self, view: Callable[[], LiveView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        waiting = GaugeMetricFamily("erllama_queue_waiting", "Requests waiting for a model slot", labels=["model"])
        running = GaugeMetricFamily("erllama_requests_running", "Requests running on a model", labels=["model"])
        # the same, under the names vLLM exports: gateways and routers (vllm-router, SGLang's gateway, llm-d) read them
        v_running = GaugeMetricFamily("vllm:num_requests_running", "Requests running", labels=["model_name"])
        v_waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting", labels=["model_name"])
        for name, w, r in view.queues:
            waiting.add_metric([name], w)
            running.add_metric([name], r)
            v_waiting.add_metric([name], w)
            v_running.add_metric([name], r)
        v_kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cells in use, 0..1", labels=["model_name"])
        for name, share in view.kv_usage:
            v_kv.add_metric([name], share)
        yield waiting
        yield running
        yield v_waiting
        yield v_running
        yield v_kv
        yield GaugeMetricFamily("erllama_models_loaded", "Models loaded", value=view.models)
        build = _loaded_library()
        if build is not None:
            info = build.build
            labels = {
                "backend": info["backend"],
                "cpu_variant": info["cpu_variant"],
                "flavor": str(info["flavor"] or ""),
                "selfcheck": info["selfcheck"],
                "deterministic": str(info["deterministic"]).lower(),
                "patches": ",".join(info["patches"]),
            }
            family = GaugeMetricFamily("erllama_build_info", "The libllama in use (value 1)", labels=list(labels))
            family.add_metric(list(labels.values()), 1)
            yield family
        used = GaugeMetricFamily("erllama_cache_tier_bytes", "Bytes held by a cache tier", labels=["tier"])
        budget = GaugeMetricFamily("erllama_cache_tier_budget_bytes", "Byte budget of a cache tier", labels=["tier"])
        rows = GaugeMetricFamily("erllama_cache_tier_rows", "Rows held by a cache tier", labels=["tier"])
        for tier, n_bytes, n_budget, n_rows in view.tiers:
            used.add_metric([tier], n_bytes)
            budget.add_metric([tier], n_budget)
            rows.add_metric([tier], n_rows)
        yield used
        yield budget
        yield rows
        # in tokens, as vLLM and SGLang count: what each tier holds, and what each served (SGLang's cache_source);
        # the tokens looked up are erllama_cache_query_tokens, those restored erllama_cache_restored_tokens
        held = GaugeMetricFamily("erllama_cache_tier_tokens", "Prompt tokens held by a cache tier", labels=["tier"])
        for tier, n in view.tier_tokens:
            held.add_metric([tier], n)
        yield held
        served = CounterMetricFamily(
            "erllama_cache_restored_tokens_by_tier",
            "Prompt tokens restored, by the tier that served them",
            labels=["tier"],
        )
        for tier, *_ in view.tiers:
            served.add_metric([tier], view.counters.get(f"{tier}_restored_tokens", 0))
        yield served
        for key, value in sorted(view.counters.items()):
            name = "erllama_cache_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            yield UnknownMetricFamily(name, f"cache counter {key}", value=value)


class Metrics:
    """The daemon's series. ``registry`` is what ``/metrics`` exposes; ``view`` is called at each scrape."""

    def __init__(self, view: Callable[[], LiveView]) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "erllama_requests", "HTTP requests served", ["dialect", "endpoint", "status"], registry=registry
        )
        self.latency = Histogram(
            "erllama_request_seconds",
            "Time to the last byte of a response",
            ["dialect", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "erllama_ttft_seconds", "Time to the first token", ["model"], buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.tokens = Counter("erllama_tokens", "Tokens by kind", ["model", "kind"], registry=registry)
        # vLLM's prefix-cache series, in tokens: prompt tokens looked up, and those served from the cache
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            ["model_name"],
            registry=registry,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache", ["model_name"], registry=registry
        )
        self.finished = Counter(
            "erllama_generations", "Generations by finish reason", ["model", "reason"], registry=registry
        )
        self.rejected = Counter(
            "erllama_rejected", "Requests refused by the queue limits", ["reason"], registry=registry
        )
        registry.register(_Live(view))

    def record(self, model: str, completion: Completion) -> None:
        """One finished generation."""
        s = completion.stats
        self.tokens.labels(model, "prompt").inc(s.prompt_tokens)
        self.tokens.labels(model, "cached").inc(s.restored_tokens)
        self.tokens.labels(model, "completion").inc(s.generated_tokens)
        self.prefix_queries.labels(model).inc(s.prompt_tokens)
        self.prefix_hits.labels(model).inc(s.restored_tokens)
        self.ttft.labels(model).observe(s.ttft_s)
        self.finished.labels(model, completion.finish_reason).inc()
