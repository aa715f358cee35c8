"""Stop sequences matched on the detokenised text stream, across token boundaries.

``StopMatcher.feed`` takes each new piece of text and returns what is safe to show now, holding back any tail that
might still become a stop sequence. A stop ends the text at its first occurrence (the earliest start; of stops
starting at the same place, the shortest), and the stop itself is trimmed from the reply. Holding back the tail
also means a longer stop that starts earlier than a completed one wins, exactly as if the whole text had been
searched at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from erllama.errors import InvalidInputError

__all__ = ["StopMatcher", "first_stop"]


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Where the first stop occurs in a whole text: (index, stop), earliest start and then shortest stop."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0 and (best is None or (i, len(stop)) < best[:2]):
            best = (i, len(stop), stop)
    return None if best is None else (best[0], best[2])


class StopMatcher:
    """Streams text through, stopping at the first stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise InvalidInputError("stop sequences must not be empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._buf = ""
        self.matched: str | None = None

    def _pending_start(self) -> int:
        """Earliest index from which the buffer's tail is a proper prefix of some stop (len(buf) if none)."""
        start = len(self._buf)
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._buf)), 0, -1):
                if self._buf.endswith(stop[:k]):
                    start = min(start, len(self._buf) - k)
                    break
        return start

    def feed(self, piece: str) -> str:
        """Add text; returns the part that can be emitted. After a match, ``matched`` is set and nothing more comes."""
        if self.matched is not None:
            return ""
        self._buf += piece
        hit = first_stop(self._buf, self._stops)
        pending = self._pending_start()
        if hit is not None and hit[0] <= pending:
            out, self._buf, self.matched = self._buf[: hit[0]], "", hit[1]
            return out
        cut = pending if hit is None else min(pending, hit[0])
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out

    def flush(self) -> str:
        """End of the stream: a stop already complete in the held-back text still counts; the rest is released."""
        if self.matched is not None:
            return ""
        hit = first_stop(self._buf, self._stops)
        out, self._buf = (self._buf, "") if hit is None else (self._buf[: hit[0]], "")
        if hit is not None:
            self.matched = hit[1]
        return out
