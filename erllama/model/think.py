"""``ThinkSplitter``: separates a reasoning model's ``<think>`` ... ``</think>`` text from its reply, as it streams.

Tags may arrive split across tokens: a tail that could still become a tag is held back until the next piece decides
it, so the two channels come out exactly as a split of the whole text would give them.
"""

from __future__ import annotations

__all__ = ["ThinkSplitter"]

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Feed text pieces; get ``(inside_thinking, text)`` parts back."""

    def __init__(self, *, inside: bool = False) -> None:
        self.inside = inside
        self._buf = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        self._buf += text
        out: list[tuple[bool, str]] = []
        while True:
            tag = CLOSE if self.inside else OPEN
            i = self._buf.find(tag)
            if i < 0:
                break
            if i:
                out.append((self.inside, self._buf[:i]))
            self._buf = self._buf[i + len(tag) :]
            self.inside = not self.inside
        keep = next((k for k in range(min(len(tag) - 1, len(self._buf)), 0, -1) if self._buf.endswith(tag[:k])), 0)
        ready = self._buf[: len(self._buf) - keep]
        if ready:
            out.append((self.inside, ready))
        self._buf = self._buf[len(ready) :]
        return out

    def flush(self) -> list[tuple[bool, str]]:
        """Whatever is held back (an unfinished tag is plain text after all)."""
        out = [(self.inside, self._buf)] if self._buf else []
        self._buf = ""
        return out

    def feed_all(self, text: str) -> list[tuple[bool, str]]:
        return self.feed(text) + self.flush()
