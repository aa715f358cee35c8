"""``StubBackend``: a deterministic pure-Python model for fast tests of everything above the binding.

Its vocabulary is bytes: token 0 is padding, 1 BOS, 2 EOS, and token ``3 + b`` is byte ``b``, so any UTF-8 text
tokenizes and multi-byte characters really are split across tokens. Its "model" derives the logits of the next
token from a hash of the sequence's last ``window`` tokens, so a sequence's continuation depends only on its
tokens: a state restored from a blob continues exactly like the original, which is the property the cache relies
on. Its "KV state" is the token list. Decoding validates like the real context (same exception types), honours
``abort()``, and can be slowed down (``step_delay_s``) to test cancellation and batching.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from erllama.errors import (
    ContextOverflowError,
    DecodeAbortedError,
    InvalidInputError,
    SeqIdError,
    StateError,
    ThreadAffinityError,
    TokenIdError,
)
from erllama.model.backend import BackendInfo, DecodeItem, SamplerConfig
from erllama.text import utf8

__all__ = ["StubBackend"]

PAD, BOS, EOS = 0, 1, 2
N_VOCAB = 259
_MAGIC = b"STUB"
_READABLE = np.array([3 + b for b in b"abcdefghijklmnopqrstuvwxyz     ,."], dtype=np.int64)


class StubBackend:
    """A deterministic byte-level model with ``n_seq_max`` sequences of ``n_ctx_seq`` positions."""

    def __init__(
        self,
        *,
        n_seq_max: int = 4,
        n_ctx_seq: int = 4096,
        n_batch: int = 512,
        window: int = 8,
        eos_bias: float = -1.0,
        step_delay_s: float = 0.0,
        seed: int = 0,
        name: str = "stub",
        chat_template: str | None = None,
        script: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        """``chat_template`` is reported as the model's Jinja template. ``script`` makes the stub answer like an
        instruction-tuned model, for tests of what parses replies: called with a request's prompt bytes, the bytes
        it returns are the reply (then EOS); None leaves the request to the hash model."""
        self._seqs: list[list[int]] = [[] for _ in range(n_seq_max)]
        self._samplers: dict[int, tuple[SamplerConfig, np.random.Generator]] = {}
        self._rows: dict[int, npt.NDArray[np.float64]] = {}
        self._abort = threading.Event()
        self._window = window
        self._eos_bias = eos_bias
        self._delay = step_delay_s
        self._seed = seed
        self._owner = threading.get_ident()
        self.decode_calls = 0
        self.adapters: list[tuple[object, float]] = []
        self._script = script
        self._scripted: dict[int, tuple[int, bytes | None]] = {}  # seq -> (prompt length, reply)
        self._info = BackendInfo(
            name=name,
            n_vocab=N_VOCAB,
            n_ctx_seq=n_ctx_seq,
            n_seq_max=n_seq_max,
            n_batch=n_batch,
            bos=BOS,
            add_bos=True,
            eog_tokens=frozenset({EOS}),
            fingerprint=f"stub-{seed}-{window}",
            quantization="none",
            ctx_params={"n_ctx_seq": n_ctx_seq, "n_seq_max": n_seq_max, "window": window},
            chat_template=chat_template,
            bos_text="<s>",
            eos_text="</s>",
            max_token_bytes=1,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    # -- vocabulary -----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        body = [3 + b for b in utf8(text, "the prompt")]
        return [BOS, *body] if add_special else body

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        self._check_token(token)
        return bytes([token - 3]) if token >= 3 else b""

    def apply_chat_template(self, messages: Sequence[tuple[str, str]], *, add_assistant: bool = True) -> str:
        text = "".join(f"<{role}>{content}\n" for role, content in messages)
        return text + "<assistant>" if add_assistant else text

    def _check_token(self, token: int) -> None:
        if not 0 <= token < N_VOCAB:
            raise TokenIdError(token, N_VOCAB)

    def _check_owner(self) -> None:
        """Context calls come from the thread that made the backend, as llama.cpp's context requires (the worker's
        own thread): the stub refuses others the same way, so a test on it catches a call from the wrong thread."""
        if threading.get_ident() != self._owner:
            raise ThreadAffinityError("a model backend may only be used by the thread that created it")

    def _check_seq(self, seq_id: int) -> None:
        if not 0 <= seq_id < len(self._seqs):
            raise SeqIdError(seq_id, len(self._seqs))

    # -- decoding --------------------------------------------------------------------------------------------

    def _logits(self, history: Sequence[int]) -> npt.NDArray[np.float64]:
        tail = np.asarray(history[-self._window :], dtype="<i4").tobytes()
        digest = hashlib.blake2b(tail + struct.pack("<q", self._seed), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        logits = rng.standard_normal(N_VOCAB)
        logits[_READABLE] += 2.5
        logits[EOS] += self._eos_bias
        logits[PAD] = logits[BOS] = -np.inf
        return logits

    def decode(self, items: Sequence[DecodeItem]) -> list[int | None]:
        self._check_owner()
        total = sum(len(item.tokens) for item in items)
        if total == 0:
            raise InvalidInputError("empty batch")
        if total > self._info.n_batch:
            raise InvalidInputError(f"batch of {total} tokens exceeds n_batch {self._info.n_batch}")
        seen: set[int] = set()
        for item in items:
            self._check_seq(item.seq_id)
            if item.seq_id in seen:
                raise InvalidInputError(f"sequence {item.seq_id} appears twice in one batch")
            seen.add(item.seq_id)
            for token in item.tokens:
                self._check_token(token)
            needed = len(self._seqs[item.seq_id]) + len(item.tokens)
            if needed > self._info.n_ctx_seq:
                raise ContextOverflowError(item.seq_id, needed, self._info.n_ctx_seq)
        if self._abort.is_set():
            raise DecodeAbortedError("decode aborted on request", 2)
        if self._delay:
            time.sleep(self._delay * total)
        self.decode_calls += 1
        self._rows = {}
        rows: list[int | None] = []
        row = 0
        for item in items:
            seq = self._seqs[item.seq_id]
            seq.extend(int(t) for t in item.tokens)
            row += len(item.tokens)
            if item.logits:
                self._rows[row - 1] = self._logits(seq)
                rows.append(row - 1)
            else:
                rows.append(None)
        return rows

    def set_sampler(self, seq_id: int, config: SamplerConfig) -> None:
        self._check_owner()
        self._check_seq(seq_id)
        for token in config.logit_bias:
            self._check_token(token)
        seed = config.seed if config.seed is not None else int.from_bytes(np.random.bytes(4), "little")
        self._samplers[seq_id] = (config, np.random.default_rng(seed))
        self._scripted.pop(seq_id, None)

    def logits(self, row: int) -> npt.NDArray[np.float32]:
        self._check_owner()
        if row not in self._rows:
            raise InvalidInputError(f"row {row} of the last batch has no outputs")
        return self._rows[row].astype(np.float32)

    def sample_rows(self, picks: Sequence[tuple[int, int]]) -> list[int]:
        self._check_owner()
        return [self.sample(seq_id, row) for seq_id, row in picks]

    def sample(self, seq_id: int, row: int) -> int:
        self._check_owner()
        self._check_seq(seq_id)
        if row not in self._rows:
            raise InvalidInputError(f"row {row} of the last batch has no outputs")
        if self._script is not None:
            seq = self._seqs[seq_id]
            if seq_id not in self._scripted:
                self._scripted[seq_id] = (len(seq), self._script(bytes(t - 3 for t in seq if t >= 3)))
            start, reply = self._scripted[seq_id]
            if reply is not None:
                i = len(seq) - start
                return 3 + reply[i] if i < len(reply) else EOS
        logits = self._rows[row].copy()
        config, rng = self._samplers.get(seq_id, (SamplerConfig(), np.random.default_rng(0)))
        for token, bias in config.logit_bias.items():
            logits[token] += bias
        if config.greedy:
            return int(np.argmax(logits))
        order = np.argsort(-logits)
        if config.top_k > 0:
            order = order[: config.top_k]
        probs = np.exp((logits[order] - logits[order[0]]) / config.temperature)
        probs /= probs.sum()
        if config.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), config.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(len(order), p=probs)])

    # -- sequences and state ----------------------------------------------------------------------------------

    def seq_len(self, seq_id: int) -> int:
        self._check_owner()
        self._check_seq(seq_id)
        return len(self._seqs[seq_id])

    def seq_truncate(self, seq_id: int, n_tokens: int) -> None:
        self._check_owner()
        self._check_seq(seq_id)
        if n_tokens < 0:
            raise InvalidInputError("n_tokens must be >= 0")
        del self._seqs[seq_id][n_tokens:]

    def state_get(self, seq_id: int) -> memoryview:
        self._check_owner()
        self._check_seq(seq_id)
        body = np.asarray(self._seqs[seq_id], dtype="<i4").tobytes()
        return memoryview(_MAGIC + struct.pack("<I", N_VOCAB) + body)

    def state_set(self, seq_id: int, blob: bytes | memoryview) -> None:
        self._check_owner()
        self._check_seq(seq_id)
        data = bytes(blob)
        if len(data) < 8 or data[:4] != _MAGIC or struct.unpack_from("<I", data, 4)[0] != N_VOCAB:
            self._seqs[seq_id] = []
            raise StateError(f"not a state of this stub model ({len(data)} bytes)")
        if (len(data) - 8) % 4:
            self._seqs[seq_id] = []
            raise StateError("truncated stub state")
        tokens = np.frombuffer(data, dtype="<i4", offset=8).tolist()
        if len(tokens) > self._info.n_ctx_seq:
            raise ContextOverflowError(seq_id, len(tokens), self._info.n_ctx_seq)
        self._seqs[seq_id] = tokens

    def logits_rows(self, seq_id: int, tokens: Sequence[int]) -> Iterator[npt.NDArray[np.float32]]:
        self._check_owner()
        for token in tokens:
            self._check_token(token)
        for token in tokens:
            self.decode([DecodeItem(seq_id, [token], logits=False)])
            yield self._logits(self._seqs[seq_id]).astype(np.float32)

    def argmax_rows(self, seq_id: int, tokens: Sequence[int]) -> list[int]:
        self._check_owner()
        out: list[int] = []
        for token in tokens:
            self.decode([DecodeItem(seq_id, [token], logits=False)])
            out.append(int(np.argmax(self._logits(self._seqs[seq_id]))))
        return out

    def embed(self, seq_id: int, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        self._check_owner()
        if not tokens:
            raise InvalidInputError("nothing to embed")
        self._check_seq(seq_id)
        for token in tokens:
            self._check_token(token)
        total = np.zeros(32)
        for i in range(len(tokens)):
            total += self._logits(tokens[: i + 1])[3:35]
        return (total / np.linalg.norm(total)).astype(np.float32)

    def load_adapter(self, path: str) -> object:
        self._check_owner()
        if not path:
            raise InvalidInputError("adapter path is empty")
        return ("stub-adapter", path)

    def set_adapters(self, adapters: Sequence[tuple[object, float]]) -> None:
        self._check_owner()
        self.adapters = list(adapters)

    def free_adapter(self, handle: object) -> None:
        self._check_owner()
        pass

    def abort(self) -> None:
        self._abort.set()

    def clear_abort(self) -> None:
        self._abort.clear()

    def close(self) -> None:
        self._seqs = [[] for _ in self._seqs]
