"""``CacheReport``: how one request's prompt met the cache, and where it left the nearest cached row.

A request restores the longest stored prefix of its prompt. When that is less than the whole prompt (all but its
last token, which is always computed), the report says why: which cached row came nearest, how many tokens the
prompt shares with it, and the tokens on either side of the first one that differs. The runtime fills it on the
worker (it holds the tokens); the server turns it into the ``x-erllama-cache`` header and a log line naming the
message the divergence falls in. A prompt that simply goes on past a cached row's end (the next turn of a chat)
did not *leave* it: that is the normal partial hit, and ``diverged_at`` is None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from erllama.cache.counters import HitKind
from erllama.errors import InvalidInputError

__all__ = ["CONTEXT_TOKENS", "CacheReport", "parse_header"]

CONTEXT_TOKENS = 6  # tokens of context kept on each side of a divergence


@dataclasses.dataclass(frozen=True, slots=True)
class CacheReport:
    """How a request's prompt met the cache.

    Attributes:
        kind: exact (all but the last prompt token restored), partial, or cold.
        prompt_tokens: the prompt's length.
        restored_tokens: how many of its leading tokens were restored instead of computed.
        tier: the tier that served the restored row (``ram``, ``ram_file``, ``disk``), None when cold.
        row_tokens: the length of the cached row that shares the most with the prompt (0: none shares a whole
            16-token block, or the cache was not consulted).
        shared_tokens: how many leading tokens the prompt shares with that row.
        before: the prompt's tokens just before ``shared_tokens`` (context for the log line).
        row_next: the row's tokens from ``shared_tokens`` on (what the cache held there).
        prompt_next: the prompt's tokens from ``shared_tokens`` on (what the request sent instead).
        message: the index of the chat message the divergence falls in, when the server worked it out.
        reason: :meth:`explain`'s line, when the server wrote it (``x-erllama-explain``, or debug logging).
    """

    kind: HitKind
    prompt_tokens: int
    restored_tokens: int
    tier: str | None = None
    row_tokens: int = 0
    shared_tokens: int = 0
    before: tuple[int, ...] = ()
    row_next: tuple[int, ...] = ()
    prompt_next: tuple[int, ...] = ()
    message: int | None = None
    reason: str | None = None

    @property
    def ceiling(self) -> int:
        """The most a cache could restore of this prompt (its last token is always computed)."""
        return max(self.prompt_tokens - 1, 0)

    @property
    def diverged_at(self) -> int | None:
        """Where the prompt left the nearest cached row: the position of the first token that differs from it.
        None when it did not leave one: an exact hit, a prompt that goes on past the row's end, or no row near."""
        if self.restored_tokens >= self.ceiling or self.row_tokens == 0 or self.shared_tokens >= self.row_tokens:
            return None
        return self.shared_tokens

    def header(self) -> str:
        """The ``x-erllama-cache`` header value: ``key=value`` pairs separated by ``; `` (ASCII, one line)."""
        parts = [
            f"kind={self.kind.value}",
            f"prompt={self.prompt_tokens}",
            f"restored={self.restored_tokens}",
        ]
        if self.tier is not None:
            parts.append(f"tier={self.tier}")
        parts.append(f"row={self.row_tokens}")
        if self.diverged_at is not None:
            parts.append(f"diverged_at={self.diverged_at}")
        if self.message is not None:
            parts.append(f"message={self.message}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, int | str | None]:
        """The numbers of the report (what the dialects put in their usage objects)."""
        return {
            "hit": self.kind.value,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.restored_tokens,
            "tier": self.tier,
            "row_tokens": self.row_tokens,
            "diverged_at": self.diverged_at,
            "message": self.message,
            "reason": self.reason,
        }

    def explain(self, piece: Callable[[Sequence[int]], str]) -> str:
        """One line a person can act on: what was restored and, for a prompt that left a cached row, where and how
        (``piece`` turns token ids into text)."""
        head = f"cache {self.kind.value}: restored {self.restored_tokens} of {self.prompt_tokens} prompt tokens"
        if self.tier is not None:
            head += f" from {self.tier}"
        at = self.diverged_at
        if at is None:
            if self.restored_tokens >= self.ceiling:
                return head
            if self.row_tokens:
                return f"{head}; the prompt goes on past the nearest cached row ({self.row_tokens} tokens)"
            return f"{head}; no cached row shares the prompt's first 16 tokens"
        where = f" in message {self.message}" if self.message is not None else ""
        return (
            f"{head}; the prompt left the nearest cached row ({self.row_tokens} tokens) at token {at}{where}: "
            f"after {piece(self.before)!r} the cache holds {piece(self.row_next)!r}, "
            f"the prompt has {piece(self.prompt_next)!r}"
        )


def parse_header(value: str) -> dict[str, str]:
    """The pairs of an ``x-erllama-cache`` header (for clients and tests)."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        pair = part.strip()
        if not pair:
            continue
        name, sep, val = pair.partition("=")
        if not sep:
            raise InvalidInputError(f"not a key=value pair in x-erllama-cache: {pair!r}")
        out[name.strip()] = val.strip()
    return out
