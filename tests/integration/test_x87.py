"""x87 state hygiene: the shim resets a thread's x87 state, and every decode starts ggml's threads clean.

numpy's import does long double (x87) arithmetic, which leaves the thread's x87 state "in use" (XINUSE bit 0) and
every thread started from it inherits that; ggml's compute threads then run measurably slower (docs/runtime.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from erllama._native import Context, ContextConfig, Model
from erllama._native.shim import x87_in_use, x87_resetter

pytestmark = pytest.mark.native


def _dirty() -> None:
    value = np.longdouble(2.0) ** np.longdouble(0.5)  # x87 arithmetic on x86-64
    assert value > 1


@pytest.fixture
def observable(native: None) -> None:
    if x87_in_use() is None:
        pytest.skip("this CPU does not report the x87 in-use state (XGETBV with ECX=1)")


def test_reset_returns_a_dirty_thread_to_its_initial_state(observable: None) -> None:
    reset = x87_resetter()
    _dirty()
    assert x87_in_use() is True
    assert reset() == 1
    assert x87_in_use() is False
    assert reset() == 0  # already initial: nothing to do
    x = np.float64(1.0) / np.float64(3.0)  # the reset kept SSE state: ordinary arithmetic is unaffected
    assert x == 1.0 / 3.0


def test_reset_is_per_thread(observable: None) -> None:
    _dirty()
    seen: list[bool | None] = []

    def other() -> None:
        _dirty()
        x87_resetter()()
        seen.append(x87_in_use())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [False]
    assert x87_in_use() is True  # this thread was not touched
    x87_resetter()()


def test_context_and_decode_leave_the_owner_thread_clean(observable: None, tiny_path: Path) -> None:
    with Model(tiny_path) as model:
        assert x87_in_use() is False  # the load reset it
        _dirty()
        with Context(model, ContextConfig(n_ctx=128, n_batch=32)) as ctx:
            assert x87_in_use() is False
            tokens = model.tokenize("hello world")
            row = ctx.decode_tokens(tokens[:-1])
            logits = ctx.logits(row).copy()
            _dirty()
            assert x87_in_use() is True
            ctx.decode_tokens(tokens[-1:])
            assert x87_in_use() is False  # the decode started clean, and ggml kept it so
            assert np.isfinite(logits).all()
