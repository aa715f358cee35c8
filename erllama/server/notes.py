"""What the daemon tells a client about its cache beside the reply: the ``x-erllama-cache`` response header.

The guard middleware opens a :class:`CacheNotes` for each HTTP request (in a context variable, so no route has to
pass it along); a generating route adds each admitted run's :class:`~erllama.cache.report.CacheReport`, and the
guard writes the first one into the response's headers as they go out. A client that sends
``x-erllama-explain: 1`` also gets the report's reason worked out down to the chat message it falls in (the daemon
logs that line at debug level for every request whose prompt left a cached row).
"""

from __future__ import annotations

import contextvars
import dataclasses

from erllama.cache.report import CacheReport

__all__ = ["HEADER", "CacheNotes", "current", "note", "open_notes"]

HEADER = b"x-erllama-cache"
EXPLAIN_HEADER = "x-erllama-explain"

_NOTES: contextvars.ContextVar[CacheNotes | None] = contextvars.ContextVar("erllama_cache_notes", default=None)


@dataclasses.dataclass(slots=True)
class CacheNotes:
    """One HTTP request's cache reports (one per run it started) and whether its client asked why."""

    explain: bool = False
    reports: list[CacheReport] = dataclasses.field(default_factory=list)

    def header(self) -> bytes | None:
        return self.reports[0].header().encode("ascii") if self.reports else None


def open_notes(explain: bool) -> CacheNotes:
    """Start the notes of the request being handled (by the guard, before the route runs)."""
    notes = CacheNotes(explain)
    _NOTES.set(notes)
    return notes


def current() -> CacheNotes | None:
    return _NOTES.get()


def note(report: CacheReport | None) -> None:
    """Add a run's report to the request's notes (nothing outside a request, or without a report)."""
    notes = _NOTES.get()
    if notes is not None and report is not None:
        notes.reports.append(report)
