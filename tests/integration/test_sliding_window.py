"""A sliding-window model (Gemma 3 270M: local layers see the last 512 positions) through the runtime's cache.

With ``swa_full`` (the default) the local layers keep every cell, so restoring and cutting back work as on any
model. Without it they keep only the window: a restore continues only from the exact point it was saved at, a cut
back that would need dropped cells is refused (``restore_cut_refused``) and the request falls back to a prefix row
or goes cold; it never attends to a hole. Prompts here are longer than the window so that cells really are dropped.
Q4_K weights are repacked for the CPU, whose kernels depend on the batch, so only exact hits are compared bit for
bit; the others must give the cold run's greedy tokens.

Without ``swa_full`` on the stock kernels (llamafile's sgemm on) even an exact hit is not bit-identical: the live
sequence's local layers hold their cells in a ring that has wrapped, a restored sequence holds them in position
order, and sgemm's attention products sum over the cells in that order. The logits then agree within
``WINDOW_TOLERANCE`` of their range (measured: up to 3% on Gemma 3 270M, AMD EPYC Zen 4) and the greedy tokens are
the same; on a batch-invariant build (``--deterministic``) and with ``swa_full`` they are bit-identical.

A partial hit (a longer row cut back, then the rest of the prompt prefilled) computes that rest in other batch
shapes than the cold run. On a batch-invariant build its greedy tokens are the cold run's; on the stock kernels its
first logits agree within ``PARTIAL_TOLERANCE`` of their range (measured: 4.3% on AMD EPYC Zen 3, AVX2, where the
cold run's top three logits lie within 0.07 of each other and the greedy token differs), and the token is compared
only where the cold run's top two are further apart than the measured difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from erllama import Runtime
from erllama._native import ContextConfig, Model, library
from erllama.cache import CacheStore, RamTier, SavePolicy

from .helpers import Recording

pytestmark = [pytest.mark.native, pytest.mark.gemma3]

WINDOW_TOLERANCE = 5e-2
PARTIAL_TOLERANCE = 8e-2
DOC = "".join(f"Entry {i}: the lighthouse keeper logged the weather, the ships and the tides. " for i in range(60))


def runtime(cache: bool) -> Runtime:
    return Runtime(CacheStore([RamTier(1 << 30)]) if cache else None, policy=SavePolicy(min_tokens=8))


def load(rt: Runtime, path: Path, swa_full: bool, box: list[Recording]) -> str:
    cfg = ContextConfig(n_ctx=4096, n_batch=256, swa_full=swa_full)

    def factory() -> Recording:
        box.append(Recording(path, context_config=cfg))
        return box[-1]

    return rt.load_model(backend=factory)


def cold_reply(path: Path, prompt: str | list[int], swa_full: bool) -> tuple[tuple[int, ...], npt.NDArray[np.float32]]:
    box: list[Recording] = []
    with runtime(cache=False) as rt:
        done = rt.complete(load(rt, path, swa_full, box), prompt, max_tokens=10)
    return done.generated, box[0].sampled_from[0]


def test_gemma3_has_a_window_shorter_than_the_prompts(gemma3_path: Path) -> None:
    with Model(gemma3_path) as model:
        assert 0 < model.info.n_swa < len(model.tokenize(DOC)) - 100


@pytest.mark.parametrize("swa_full", [True, False], ids=["swa_full", "window_only"])
def test_sliding_window_hits_match_cold_runs(gemma3_path: Path, swa_full: bool) -> None:
    q1, q2 = DOC + "Question: what was logged?", DOC + "Question: who kept the log?"
    box: list[Recording] = []
    rt = runtime(cache=True)
    try:
        model = load(rt, gemma3_path, swa_full, box)
        first = rt.complete(model, q1, max_tokens=10)
        assert rt.cache is not None
        rt.cache.drain()
        n = len(box[0].sampled_from)
        exact = rt.complete(model, q1, max_tokens=10)
        exact_logits = box[0].sampled_from[n]
        n_other = len(box[0].sampled_from)
        other = rt.complete(model, q2, max_tokens=10)
        other_logits = box[0].sampled_from[n_other]
        rt.cache.drain()
        resumed = rt.complete(model, " And the tides?", parent_key=first.finish_key, max_tokens=10)
        counters = rt.counters()
    finally:
        rt.close()
        assert rt.cache is not None
        rt.cache.close()

    assert first.cache_hit_kind == "cold"
    assert (exact.cache_hit_kind, exact.generated) == ("exact", first.generated)
    cold_logits = box[0].sampled_from[0]
    if swa_full or library().batch_invariant:
        assert np.array_equal(exact_logits, cold_logits), "the exact hit reproduces the cold run bit for bit"
    else:
        assert np.abs(exact_logits - cold_logits).max() <= WINDOW_TOLERANCE * float(np.abs(cold_logits).max())

    cold_other, cold_other_logits = cold_reply(gemma3_path, q2, swa_full)
    if other.cache_hit_kind == "cold" or library().batch_invariant:
        assert other.generated == cold_other
    else:
        # A partial hit prefills the rest of the prompt in other batch shapes than the cold run: on kernels that
        # depend on the batch the logits then agree within PARTIAL_TOLERANCE of their range (see the docstring),
        # and the greedy token is the cold run's wherever the cold run's top two are further apart than that.
        diff = float(np.abs(other_logits - cold_other_logits).max())
        assert diff <= PARTIAL_TOLERANCE * float(np.abs(cold_other_logits).max())
        top2 = np.sort(cold_other_logits)[-2:]
        if float(top2[1] - top2[0]) > 2 * diff:
            assert other.generated[0] == cold_other[0]
    if swa_full:
        assert other.cache_hit_kind == "partial", "all cells are kept: the longer row is cut back"
    else:
        assert counters.get("restore_cut_refused", 0) >= 1, "the cut would need cells the window dropped"
        assert other.cache_hit_kind == "cold"

    assert resumed.stats.restored_tokens == len(first.context_tokens), "a resume continues where it was saved"
    cold_resumed, _ = cold_reply(gemma3_path, list(resumed.context_tokens[: resumed.stats.prompt_tokens]), swa_full)
    assert resumed.generated == cold_resumed
