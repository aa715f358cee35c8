"""Save-policy gates: side-effect-free decisions on whether (and where) to save a sequence's state.

Each gate returns ``None`` to allow or a :class:`Veto` naming the reason, which the caller records in the counters
(``Counters.record_veto``): deciding and counting are kept apart so the gates stay pure and testable.

Save points, by reason:

* **cold** — while prefilling a prompt that missed the cache, save at a boundary before its end: the prompt minus
  its last token (which is always recomputed for logits) minus ``boundary_trim_tokens``, aligned down to
  ``boundary_align_tokens``. That is where the next request with the same prefix will find it.
* **continued** — during a long generation, every ``continued_interval`` tokens.
* **finish** — at the end of a request, the whole sequence (what a ``parent_key`` resume restores).
* **evict** / **shutdown** — when a sequence is evicted or its model unloads.
"""

from __future__ import annotations

import dataclasses
import enum

from erllama.errors import InvalidInputError

__all__ = [
    "SavePolicy",
    "Veto",
    "allows_continued_save",
    "allows_final_save",
    "cold_save_point",
]


class Veto(enum.Enum):
    """Why a save was not made."""

    TOO_SHORT = "too_short"  # fewer than min_tokens
    COLD_TOO_SHORT = "cold_too_short"  # the cold save point would be below cold_min_tokens
    COLD_TOO_LONG = "cold_too_long"  # the cold save point would be above cold_max_tokens
    NOT_DUE = "not_due"  # fewer than continued_interval tokens since the last save
    DISABLED = "disabled"  # this kind of save is switched off
    ALREADY_CACHED = "already_cached"  # a row for exactly these tokens exists


@dataclasses.dataclass(frozen=True, slots=True)
class SavePolicy:
    """The knobs of the save policy. The defaults cache a chat of a few hundred tokens.

    By default the cold save point is the whole prompt but its last token: the prefix index finds rows of any
    length, so nothing is gained by aligning, and a repeated prompt then restores everything but the one token
    the worker always recomputes (an exact hit). Trim and align (e.g. to ``erllama.cache.BLOCK_TOKENS``) to save
    a shorter, more shareable prefix instead.

    Attributes:
        min_tokens: no row is ever saved for fewer tokens.
        cold_min_tokens: a cold save needs a save point at least this long.
        cold_max_tokens: a cold save point is never longer (bounds the state written mid-prefill).
        continued_interval: generated tokens between continued saves (0 disables them).
        boundary_trim_tokens: tokens trimmed from the end of the prompt before the cold save point.
        boundary_align_tokens: the cold save point is aligned down to a multiple of this.
        session_resume_wait_ms: how long a parent_key resume waits for that key's in-flight finish save.
    """

    min_tokens: int = 32
    cold_min_tokens: int = 64
    cold_max_tokens: int = 1 << 20
    continued_interval: int = 512
    boundary_trim_tokens: int = 0
    boundary_align_tokens: int = 1
    session_resume_wait_ms: int = 500

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise InvalidInputError(f"{field.name} must be >= 0")
        if self.boundary_align_tokens < 1:
            raise InvalidInputError("boundary_align_tokens must be >= 1")
        if self.cold_max_tokens < self.cold_min_tokens:
            raise InvalidInputError("cold_max_tokens must be >= cold_min_tokens")


def cold_save_point(policy: SavePolicy, n_prompt: int) -> int | Veto:
    """Where a cold prompt of ``n_prompt`` tokens should be saved, or why it should not."""
    point = n_prompt - 1 - policy.boundary_trim_tokens
    point -= point % policy.boundary_align_tokens if point > 0 else 0
    if point < max(policy.min_tokens, 1):
        return Veto.TOO_SHORT
    if point < policy.cold_min_tokens:
        return Veto.COLD_TOO_SHORT
    if point > policy.cold_max_tokens:
        return Veto.COLD_TOO_LONG
    return point


def allows_continued_save(policy: SavePolicy, n_tokens: int, since_last_save: int) -> Veto | None:
    """Whether a generation that has produced ``since_last_save`` tokens since the last save should save now."""
    if policy.continued_interval == 0:
        return Veto.DISABLED
    if n_tokens < policy.min_tokens:
        return Veto.TOO_SHORT
    if since_last_save < policy.continued_interval:
        return Veto.NOT_DUE
    return None


def allows_final_save(policy: SavePolicy, n_tokens: int, already_cached: bool = False) -> Veto | None:
    """Finish, evict and shutdown saves: anything long enough that is not cached already."""
    if n_tokens < policy.min_tokens:
        return Veto.TOO_SHORT
    if already_cached:
        return Veto.ALREADY_CACHED
    return None
