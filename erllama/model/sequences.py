"""A worker's records of its requests: queued (:class:`Waiting`), running on a sequence (:class:`Running`), and the
table of sequences (:class:`SeqTable`) the loop's phases share."""

from __future__ import annotations

import dataclasses
import heapq
import time

from erllama.model.cachelink import CacheHit, SeqCache
from erllama.model.delivery import RequestHandle
from erllama.model.events import FinishReason
from erllama.model.request import GenerateRequest
from erllama.model.stop import StopMatcher
from erllama.text import Detokenizer

__all__ = ["FreeSeqs", "Running", "SeqTable", "Waiting", "reply_room"]


@dataclasses.dataclass(slots=True)
class Waiting:
    """A request in the worker's queue, or being admitted."""

    handle: RequestHandle
    request: GenerateRequest
    deadline: float  # a request waits for a row being written (its parent's, a reply it continues) until then
    tokens: list[int] | None = None  # the prompt's tokens, once tokenized (a parked request keeps them)
    seq_id: int | None = None  # the sequence it took while being admitted (given back if admission fails)


@dataclasses.dataclass(slots=True)
class Running:
    """A request that holds a sequence: its context, how much of it is in the KV cache, and its reply so far."""

    handle: RequestHandle
    seq_id: int
    tokens: list[int]  # the context: the prompt, then every sampled token (including a final end token)
    n_prompt: int
    max_tokens: int
    detok: Detokenizer
    stops: StopMatcher | None
    hit: CacheHit
    cache: SeqCache
    fed: int  # context tokens in the KV cache
    fold: bool = False  # the last prompt token rides in the final chunk (BackendInfo.last_token_foldable)
    n_generated: int = 0  # reply tokens streamed
    closing: FinishReason | None = None  # ended and announced; its last token is committed next step, then saved
    t_closing: float = 0.0  # when it started closing (time.monotonic)
    text: list[str] = dataclasses.field(default_factory=list)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    t_first: float = 0.0
    logprobs: int | None = None  # report each reply token's logprob and this many alternatives

    @property
    def ended(self) -> bool:
        """Its reply is over (announced); only closing is left."""
        return self.closing is not None

    @property
    def cold_point(self) -> int | None:
        return self.cache.cold_point

    @property
    def restored(self) -> int:
        return self.hit.prefix_len


class FreeSeqs:
    """The free sequence ids, lowest first. Keeping the busy ones low and contiguous matters: with one KV stream
    per sequence, llama.cpp splits a batch into one micro-batch per run of consecutive ids, and every extra
    micro-batch is another pass over the weights (a gap costs a whole decode step)."""

    def __init__(self, n: int) -> None:
        self._heap = list(range(n))

    def __bool__(self) -> bool:
        return bool(self._heap)

    def take(self) -> int:
        return heapq.heappop(self._heap)

    def give(self, seq_id: int) -> None:
        heapq.heappush(self._heap, seq_id)


@dataclasses.dataclass(slots=True)
class SeqTable:
    """The running requests by sequence id (in admission order) and the free ids: what the admission, the step and
    its application share on the worker thread. ``in_flight``, ``pending_len`` and ``kv_used`` are published for
    other threads."""

    running: dict[int, Running]
    free: FreeSeqs
    in_flight: int = 0
    pending_len: int = 0  # prompt tokens still to prefill over the running requests
    kv_used: int = 0  # context tokens in the KV cache over the running requests

    @classmethod
    def of(cls, n_seq: int) -> SeqTable:
        return cls({}, FreeSeqs(n_seq))

    def add(self, r: Running) -> None:
        self.running[r.seq_id] = r
        self.in_flight = len(self.running)

    def remove(self, r: Running) -> bool:
        """Take ``r`` off the table (its sequence id is given back by the caller); False if it was not on it."""
        if self.running.get(r.seq_id) is not r:
            return False
        del self.running[r.seq_id]
        self.in_flight = len(self.running)
        self.kv_used = sum(x.fed for x in self.running.values())  # its cells are freed with its sequence
        return True

    def count_pending(self) -> None:
        self.pending_len = sum(r.n_prompt - r.fed for r in self.running.values() if r.fed < r.n_prompt)
        self.kv_used = sum(r.fed for r in self.running.values())


def reply_room(n_prompt: int, max_tokens: int | None, n_ctx: int, fit: bool) -> int | None:
    """The reply length a request of ``n_prompt`` context tokens may reach, or None when it does not fit: the
    context's room after the prompt when ``max_tokens`` is None, ``max_tokens`` lowered to that room with ``fit``,
    else ``max_tokens`` itself when prompt and reply fit together. A prompt-only request (``max_tokens=0``) needs
    no room for a reply; any other needs room for one token at least."""
    room = n_ctx - n_prompt
    if max_tokens is None:
        return room if room >= 1 else None
    if fit:
        return min(max_tokens, room) if room >= min(max_tokens, 1) else None
    return max_tokens if n_prompt + max_tokens <= n_ctx else None
