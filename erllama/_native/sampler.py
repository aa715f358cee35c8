"""``Sampler``: a llama.cpp sampler chain built from a ``SamplerConfig``.

Chain order follows llama.cpp's own defaults: logit bias, grammar, penalties, then either greedy (temperature
<= 0) or top-k, typical, top-p, min-p, temperature and a seeded distribution draw.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from erllama._native import errcheck
from erllama._native.context import Context
from erllama._native.loader import ffi, lib
from erllama._native.model import Model
from erllama.errors import ClosedError, InvalidInputError, SamplerError
from erllama.sampling import DEFAULT_SEED, SamplerConfig
from erllama.text import utf8

__all__ = ["Sampler", "sample_rows"]


class Sampler:
    """A sampler chain for one model. Use it on the thread that owns the context it samples from."""

    def __init__(self, model: Model, config: SamplerConfig | None = None) -> None:
        self._handle: Any = None
        self.config = cfg = config or SamplerConfig()
        self.model = model
        L = lib()
        for token in cfg.logit_bias:
            model._check_token(token)
        # Greedy with nothing stateful in the chain (no grammar, no penalties) is "the first index of the largest
        # biased logit": computed with numpy on the logits row in place, it skips llama_sampler_sample's copy of all
        # n_vocab candidates into a token-data array (about 10x the cost, on every token of every sequence).
        # The chain is still built: accept() and length behave the same either way.
        self._argmax: tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]] | None = None
        penalties = cfg.repeat_penalty != 1.0 or cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0
        if cfg.greedy and cfg.grammar is None and not penalties:
            ids = np.fromiter(cfg.logit_bias.keys(), dtype=np.intp, count=len(cfg.logit_bias))
            self._argmax = (ids, np.fromiter(cfg.logit_bias.values(), dtype=np.float32, count=len(ids)))
        self._biased = frozenset(cfg.logit_bias)
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = L.llama_sampler_chain_init(params)
        self._handle = chain
        try:
            if cfg.logit_bias:
                biases = ffi.new("llama_logit_bias[]", len(cfg.logit_bias))
                for i, (tok, bias) in enumerate(cfg.logit_bias.items()):
                    biases[i].token, biases[i].bias = tok, bias
                self._add(L.llama_sampler_init_logit_bias(model.n_vocab, len(cfg.logit_bias), biases))
            if cfg.grammar is not None:
                errcheck.clear_last_error()
                grammar = L.llama_sampler_init_grammar(
                    model.vocab, utf8(cfg.grammar, "the grammar"), utf8(cfg.grammar_root, "the grammar root")
                )
                if grammar == ffi.NULL:
                    raise SamplerError(f"could not parse the grammar: {errcheck.last_error('invalid grammar')}")
                self._add(grammar)
            if cfg.repeat_penalty != 1.0 or cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0:
                self._add(
                    L.llama_sampler_init_penalties(
                        model.n_vocab,
                        cfg.penalty_last_n,
                        cfg.repeat_penalty,
                        cfg.frequency_penalty,
                        cfg.presence_penalty,
                    )
                )
            if cfg.greedy:
                self._add(L.llama_sampler_init_greedy())
            else:
                if cfg.top_k > 0:
                    self._add(L.llama_sampler_init_top_k(cfg.top_k))
                if cfg.typical_p < 1.0:
                    self._add(L.llama_sampler_init_typical(cfg.typical_p, 1))
                if cfg.top_p < 1.0:
                    self._add(L.llama_sampler_init_top_p(cfg.top_p, 1))
                if cfg.min_p > 0.0:
                    self._add(L.llama_sampler_init_min_p(cfg.min_p, 1))
                self._add(L.llama_sampler_init_temp(cfg.temperature))
                self._add(L.llama_sampler_init_dist(DEFAULT_SEED if cfg.seed is None else cfg.seed))
        except BaseException:
            self.close()
            raise

    def _add(self, smpl: Any) -> None:
        if smpl == ffi.NULL:
            raise SamplerError("llama.cpp could not create a sampler")
        lib().llama_sampler_chain_add(self._handle, smpl)  # the chain owns it from here on

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            warnings.warn("Sampler was never closed", ResourceWarning, stacklevel=1)

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise ClosedError("sampler is closed")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Free the chain and every sampler in it. Idempotent."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            lib().llama_sampler_free(handle)

    @property
    def length(self) -> int:
        """Number of samplers in the chain."""
        return int(lib().llama_sampler_chain_n(self.handle))

    def sample(self, ctx: Context, row: int) -> int:
        """Pick a token from output row ``row`` of ctx's last decode and accept it into the chain's state."""
        if ctx.model is not self.model:
            raise InvalidInputError("the sampler was built for another model")
        if self._argmax is not None:
            self.handle  # noqa: B018 - closed samplers refuse in both paths
            view = ctx._logits_view(row)
            return self._greedy(view, int(view.argmax()))
        ctx._check_output(row)
        return int(lib().llama_sampler_sample(self.handle, ctx.handle, row))

    def _greedy(self, logits: npt.NDArray[np.float32], best: int) -> int:
        """The first index of the largest biased logit, as llama.cpp's logit_bias + greedy chain picks it, given
        ``best``, the first index of the largest raw logit (llama.cpp's greedy sampler also takes the first)."""
        assert self._argmax is not None
        ids, biases = self._argmax
        if not len(ids):
            return best
        if best in self._biased:  # the raw maximum is itself biased: apply the biases to a copy
            shifted = logits.copy()
            shifted[ids] += biases  # float32 + float32, as llama.cpp's logit_bias sampler adds
            return int(shifted.argmax())
        # best is the first raw maximum and unbiased, so it is the first maximum of the unbiased tokens; only a
        # biased token that reaches its logit can win (at a tie, the lower index)
        values = logits[ids] + biases
        top = values.max()
        if top < logits[best]:
            return best
        first = int(ids[values == top].min())
        return first if top > logits[best] or first < best else best

    def accept(self, token: int) -> None:
        """Feed a token (e.g. of the prompt) to the stateful samplers: penalties and grammar."""
        self.model._check_token(token)
        lib().llama_sampler_accept(self.handle, token)

    def reset(self) -> None:
        lib().llama_sampler_reset(self.handle)


def sample_rows(ctx: Context, picks: Sequence[tuple[Sampler, int]]) -> list[int]:
    """``[sampler.sample(ctx, row) for sampler, row in picks]``, with the plain-argmax samplers served together.

    A generation step of n sequences reads n rows of n_vocab logits that llama.cpp has just written: fetched as
    one matrix and reduced with one argmax over its rows, instead of n views and n argmax calls (half the cost).
    Samplers with state (a distribution draw, grammar, penalties) go through llama.cpp's chain one by one.
    """
    out = [0] * len(picks)
    bulk = []
    for i, (sampler, row) in enumerate(picks):
        if sampler._argmax is None or ctx.model is not sampler.model:
            out[i] = sampler.sample(ctx, row)  # (a sampler for another model raises there)
        else:
            sampler.handle  # noqa: B018 - a closed sampler refuses
            ctx._check_output(row)
            bulk.append(i)
    if bulk:
        matrix, where = ctx._logits_matrix()
        rows = [int(where[picks[i][1]]) for i in bulk]
        if len(rows) >= len(matrix):  # as many picks as output rows: one argmax over the whole matrix
            firsts = matrix.argmax(axis=1).tolist()
            best = [firsts[r] for r in rows]
        else:
            best = [int(matrix[r].argmax()) for r in rows]
        for i, r, b in zip(bulk, rows, best, strict=True):
            out[i] = picks[i][0]._greedy(matrix[r], b)
    return out
