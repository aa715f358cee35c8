"""The step planner: which tokens of which sequences go into the next decode, as pure functions of the running
sequences and :class:`~erllama.model.batching.BatchingConfig` — no thread, no backend, no clock.

A step (one ``llama_decode``) takes, within ``n_batch`` tokens:

1. **generating first** — the pending token of every generating sequence, so streams keep flowing;
2. **closing rides along** — the last token of a reply that ended (committed so its finish row holds the whole
   context) goes with other sequences' one-token rows, but stays out of a step that would otherwise hold only
   prefill chunks (it would cost that step a micro-batch, a pass over the weights) unless every sequence is taken:
   then it goes now, so a request arriving meanwhile finds its sequence free;
3. **prefill in arrival order** — chunks of the prompts still being fed, a long prompt spread over several steps;
4. **the last prompt token alone** — decoded in a one-token step of its own, so a cold run and an exact cache hit
   compute its logits with the same graph (bit-identical), unless the backend is batch-invariant
   (``fold``): then it rides in the final chunk;
5. **cold save point** — a chunk ends at the prompt's cold save point, so the state can be copied right there;
6. **minimum cut chunk** — a chunk the budget would cut shorter than ``min_cut_chunk`` while other prompts are in
   the step waits for the next step: llama.cpp splits a batch into micro-batches of equal tokens per sequence, so a
   scrap costs a whole extra pass over the weights.

Outside the step itself: **dynamic batching** (:func:`gather_wait_s`: before a step that only starts prefills,
wait a moment for requests arriving with them) and the **close grace** (:func:`close_grace_s`: with only ended
replies left, wait a moment for a new request, which then goes first). :class:`PrefillCost` is the estimate of a
token's decode time both use. docs/runtime.md tells how each rule and constant was measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from erllama.model.backend import DecodeItem
from erllama.model.batching import BatchingConfig
from erllama.model.events import Phase

__all__ = ["PlannedSeq", "PrefillCost", "StepPlan", "close_grace_s", "gather_has_room", "gather_wait_s", "plan_step"]


class PlannedSeq(Protocol):
    """What the planner reads of a running sequence."""

    @property
    def seq_id(self) -> int: ...
    @property
    def tokens(self) -> Sequence[int]: ...
    @property
    def n_prompt(self) -> int: ...
    @property
    def fed(self) -> int: ...  # context tokens already in the KV cache
    @property
    def fold(self) -> bool: ...  # its last prompt token may ride in the final chunk
    @property
    def ended(self) -> bool: ...  # its reply is over; its last token is still to be committed
    @property
    def cold_point(self) -> int | None: ...  # where its prompt is saved while prefilling
    @property
    def restored(self) -> int: ...  # how much of its context the cache restored


S = TypeVar("S", bound=PlannedSeq)


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan(Generic[S]):
    """One decode: ``items[i]`` belongs to ``owners[i]``.

    Attributes:
        items: what to decode, generating rows first, then prefill chunks in arrival order.
        owners: the sequence of each item.
        phase: PREFILLING when any prompt chunk is in the step, else GENERATING.
        closing: the ended sequences whose last token is in the step: they close (finish save, sequence freed)
            once it ran.
        n_tokens: tokens in the step.
    """

    items: tuple[DecodeItem, ...]
    owners: tuple[S, ...]
    phase: Phase
    closing: tuple[S, ...]
    n_tokens: int


def plan_step(seqs: Sequence[S], *, n_batch: int, free_seqs: bool, rules: BatchingConfig) -> StepPlan[S]:
    """The next step over ``seqs`` (in admission order); ``free_seqs``: a sequence is free for a new request."""
    budget = n_batch
    items: list[DecodeItem] = []
    owners: list[S] = []
    skip_closing = _closing_waits(seqs, free_seqs)
    for s in seqs:  # rule 1 (and 2): the pending token of every generating or closing sequence
        if s.ended and skip_closing:
            continue
        if s.n_prompt <= s.fed < len(s.tokens) and budget > 0:
            items.append(DecodeItem(s.seq_id, [s.tokens[s.fed]], logits=not s.ended))
            owners.append(s)
            budget -= 1
    prefilling = False
    for s in seqs:  # rule 3: then prefill chunks, in arrival order
        if s.fed < s.n_prompt and budget > 0:
            end = _chunk_end(s, budget, prefilling, rules)
            if end is None:
                continue
            chunk = s.tokens[s.fed : end]
            items.append(DecodeItem(s.seq_id, chunk, logits=end == s.n_prompt))
            owners.append(s)
            budget -= len(chunk)
            prefilling = True
    return StepPlan(
        tuple(items),
        tuple(owners),
        Phase.PREFILLING if prefilling else Phase.GENERATING,
        tuple(s for s in owners if s.ended),
        n_batch - budget,
    )


def _closing_waits(seqs: Sequence[PlannedSeq], free_seqs: bool) -> bool:
    """Rule 2: ended replies stay out of a step that would hold only prefill chunks, unless no sequence is free."""
    prefill = any(s.fed < s.n_prompt for s in seqs)
    live = any(not s.ended and s.n_prompt <= s.fed for s in seqs)
    return prefill and not live and free_seqs


def _chunk_end(s: PlannedSeq, budget: int, prefilling: bool, rules: BatchingConfig) -> int | None:
    """Where this step's prefill chunk of ``s`` ends (rules 4-6), or None when it waits for the next step."""
    if not s.fold and s.fed == s.n_prompt - 1:
        return s.n_prompt  # rule 4: the last prompt token, alone
    end = s.n_prompt if s.fold else s.n_prompt - 1
    if s.cold_point is not None and s.fed < s.cold_point < end:
        end = s.cold_point  # rule 5
    if prefilling and s.fed + budget < end and budget < rules.min_cut_chunk:
        return None  # rule 6
    return min(end, s.fed + budget)


def gather_wait_s(
    seqs: Sequence[PlannedSeq], *, n_batch: int, free_seqs: bool, s_per_token: float | None, rules: BatchingConfig
) -> float:
    """Dynamic batching: how long to wait for more requests before the next step, 0 for not at all.

    Clients that fire together reach the worker a few milliseconds apart. Started at the first, a prefill step runs
    it alone and the rest queue behind a step that could have held them. So a step that only prefills (no sequence
    is generating, so no stream waits on it), has a prompt not fed yet beyond its restore, a free sequence and room
    in the batch waits: at most ``batch_wait_s`` and at most ``gather_share`` of the step's estimated time, so a
    lone request loses at most that share of its time to first token.
    """
    if rules.batch_wait_s <= 0 or s_per_token is None or not free_seqs:
        return 0.0
    if any(s.fed >= s.n_prompt for s in seqs) or all(s.fed > s.restored for s in seqs):
        return 0.0
    if not gather_has_room(seqs, n_batch=n_batch, rules=rules):
        return 0.0
    pending = sum(s.n_prompt - s.fed for s in seqs)
    return min(rules.batch_wait_s, rules.gather_share * pending * s_per_token)


def gather_has_room(seqs: Sequence[PlannedSeq], *, n_batch: int, rules: BatchingConfig) -> bool:
    """Whether another prompt's chunk of at least ``min_cut_chunk`` tokens would still fit in the step."""
    pending = sum(s.n_prompt - s.fed for s in seqs if s.fed < s.n_prompt)
    return pending + rules.min_cut_chunk <= n_batch


def close_grace_s(seqs: Sequence[PlannedSeq], t_closing: Sequence[float], now: float, rules: BatchingConfig) -> float:
    """With only ended replies left to close, how much longer to wait for a new request (0: close now).

    A client that sends its next request the moment a reply ends then has its prompt go first, and the closing rows
    ride along with its generation instead of holding up its time to first token. ``t_closing``: when each began
    closing (the clock of ``now``)."""
    if not seqs or any(not s.ended for s in seqs):
        return 0.0
    return max(0.0, min(t_closing) + rules.close_grace_s - now)


class PrefillCost:
    """Decode seconds per token, from recent steps: prefill-sized steps (``min_cut_chunk`` tokens or more) are
    averaged; a smaller step only seeds the estimate (an overestimate: small batches cost more per token)."""

    def __init__(self, rules: BatchingConfig) -> None:
        self._min_tokens = rules.min_cut_chunk
        self.s_per_token: float | None = None

    def record(self, n_tokens: int, elapsed_s: float) -> None:
        per_token = elapsed_s / max(n_tokens, 1)
        if n_tokens >= self._min_tokens:
            old = self.s_per_token
            self.s_per_token = per_token if old is None else 0.5 * (old + per_token)
        elif self.s_per_token is None:
            self.s_per_token = per_token
