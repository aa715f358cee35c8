"""Cache counters: thread-safe tallies with a consistent snapshot.

Names follow the reference (``hits_exact``, ``saves_finish``, ...) so dashboards carry over. Vetoes from the policy
gates are counted per reason (``vetoes_not_due``), saves per reason (``saves_cold``), and latencies keep a count,
a total and a maximum so a mean and a worst case can be derived from any two snapshots.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter

from erllama.cache.kvc import SaveReason
from erllama.cache.policy import Veto
from erllama.errors import InvalidInputError

__all__ = ["COUNTERS", "TIER_COUNTERS", "Counters", "HitKind"]


class HitKind(enum.StrEnum):
    """How a request's context was found in the cache: the one name for it, from the counters to the wire.

    ``EXACT``: all of it but its last token was restored; ``PARTIAL``: a shorter prefix; ``COLD``: nothing. (A
    ``parent_key`` resume is one of the first two, counted apart as ``hits_resume``.)
    """

    EXACT = "exact"
    PARTIAL = "partial"
    COLD = "cold"


_HIT_NAMES = {
    HitKind.EXACT: "hits_exact",
    HitKind.PARTIAL: "hits_longest_prefix",
    HitKind.COLD: "misses",
}


# Every name a counter, gauge or latency may have: a misspelt name is an error, not a new series on a dashboard.
COUNTERS = frozenset(
    {
        *_HIT_NAMES.values(),
        "hits_resume",
        *(f"saves_{r.name.lower()}" for r in SaveReason),
        *(f"vetoes_{v.value}" for v in Veto),
        "restored_tokens",
        "query_tokens",  # prompt tokens looked up (restored_tokens of them were served)
        "restore_failures",
        "restore_cut_refused",
        "saves_already_cached",
        "saves_deduplicated",
        "saves_refused",
        "saves_dropped",
        "saves_sync_timeout",
        "promotions",
        "promotions_dropped",  # the writer was full: the row stays in the slower tier until its next hit
        "evictions",
        "corrupt_files",
        "load",  # latencies of the store
        "save",
    }
)
# ... and those of a tier, named after it: "<tier>_<name>" ("disk_write_errors", "ram_bytes")
TIER_COUNTERS = frozenset(
    {
        "refused_too_large",
        "refused_no_room",
        "refused_read_only",
        "skipped_entries",
        "scan_evictions",
        "temp_files_removed",
        "write_errors",
        "load_errors",
        "bytes",
        "rows",
        "read_only_roots",
        "rows_learned",  # a shared tier: rows other processes published, and rows they deleted
        "rows_gone",
        "restored_tokens",  # prompt tokens restored from rows this tier served
        "save",  # latencies
        "load",
    }
)


def _declared(name: str) -> str:
    if name in COUNTERS or any(name.endswith("_" + s) and len(name) > len(s) + 1 for s in TIER_COUNTERS):
        return name
    raise InvalidInputError(f"no cache counter is named {name!r} (erllama.cache.counters declares them)")


class Counters:
    """All cache counters of one process. Every method is thread-safe; every name must be declared
    (:data:`COUNTERS`, or a tier's name and one of :data:`TIER_COUNTERS`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._gauges: dict[str, int] = {}
        self._latency: dict[str, tuple[int, float, float]] = {}

    def adopt(self, other: Counters) -> Counters:
        """Take over ``other``'s counts, gauges and latencies (added to this one's) and return self: a tier built
        with counters of its own counts into its store's from then on, nothing it counted before lost."""
        if other is self:
            return self
        with other._lock:
            counts, gauges, latency = Counter(other._counts), dict(other._gauges), dict(other._latency)
        with self._lock:
            self._counts.update(counts)
            for name, value in gauges.items():
                self._gauges[name] = self._gauges.get(name, 0) + value
            for name, (n, total, worst) in latency.items():
                n0, total0, worst0 = self._latency.get(name, (0, 0.0, 0.0))
                self._latency[name] = (n0 + n, total0 + total, max(worst0, worst))
        return self

    def incr(self, name: str, by: int = 1) -> None:
        _declared(name)
        with self._lock:
            self._counts[name] += by

    def record_hit(self, kind: HitKind, *, resumed: bool = False) -> None:
        """Count a request's hit: ``hits_resume`` for a restored ``parent_key`` row, else by its kind."""
        self.incr("hits_resume" if resumed and kind is not HitKind.COLD else _HIT_NAMES[kind])

    def record_save(self, reason: SaveReason) -> None:
        self.incr(f"saves_{reason.name.lower()}")

    def record_veto(self, veto: Veto) -> None:
        self.incr(f"vetoes_{veto.value}")

    def record_latency(self, name: str, seconds: float) -> None:
        _declared(name)
        with self._lock:
            n, total, worst = self._latency.get(name, (0, 0.0, 0.0))
            self._latency[name] = (n + 1, total + seconds, max(worst, seconds))

    def set_gauge(self, name: str, value: int) -> None:
        _declared(name)
        with self._lock:
            self._gauges[name] = value

    def add_gauge(self, name: str, delta: int) -> None:
        _declared(name)
        with self._lock:
            self._gauges[name] = self._gauges.get(name, 0) + delta

    def snapshot(self) -> dict[str, float]:
        """Every counter, gauge and latency (``<name>_count``, ``_total_s``, ``_max_s``) at one instant."""
        with self._lock:
            out: dict[str, float] = dict(self._counts)
            out.update(self._gauges)
            for name, (n, total, worst) in self._latency.items():
                out[f"{name}_count"] = n
                out[f"{name}_total_s"] = total
                out[f"{name}_max_s"] = worst
        for name in (*_HIT_NAMES.values(), "saves_dropped", "evictions", "corrupt_files"):
            out.setdefault(name, 0)
        return out
