"""LoRA adapters: load, attach with a scale, detach, free (tiny model and a generated adapter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from erllama._native import Context, ContextConfig, Model
from erllama.errors import AdapterError, ClosedError, ResourceBusyError
from erllama.testing import write_tiny_lora

pytestmark = pytest.mark.native

CFG = ContextConfig(n_ctx=256, n_batch=64)


@pytest.fixture
def tiny(native: None, tiny_path: Path) -> Iterator[Model]:
    with Model(tiny_path) as m:
        yield m


def _logits(ctx: Context, model: Model) -> npt.NDArray[np.float32]:
    ctx.seq_rm(0)
    return ctx.logits(ctx.decode_tokens(model.tokenize("the quick brown fox")))


def test_attach_scale_and_detach(tiny: Model, tmp_path: Path) -> None:
    adapter = tiny.load_adapter(write_tiny_lora(tmp_path / "lora.gguf"))
    assert adapter.meta("adapter.type") == "lora"
    with Context(tiny, CFG) as ctx:
        base = _logits(ctx, tiny)
        ctx.set_adapters([(adapter, 1.0)])
        assert ctx.adapters == [(adapter, 1.0)]
        with pytest.raises(ResourceBusyError):
            adapter.close()  # freeing it now would leave the context pointing at freed memory
        full = _logits(ctx, tiny)
        assert not np.allclose(full, base)
        ctx.set_adapters([(adapter, 0.5)])
        half = _logits(ctx, tiny)
        assert not np.allclose(half, full)
        ctx.set_adapters([(adapter, 0.0)])
        np.testing.assert_array_equal(_logits(ctx, tiny), base)
        ctx.set_adapters([])
        np.testing.assert_array_equal(_logits(ctx, tiny), base)
    adapter.close()
    adapter.close()
    assert adapter.closed
    with pytest.raises(ClosedError):
        adapter.meta("adapter.type")


def test_bad_adapter_files(tiny: Model, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        tiny.load_adapter(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AdapterError, match="could not load"):
        tiny.load_adapter(junk)


def test_closing_the_context_releases_its_adapters(tiny: Model, tmp_path: Path) -> None:
    adapter = tiny.load_adapter(write_tiny_lora(tmp_path / "lora.gguf"))
    with Context(tiny, CFG) as ctx:
        ctx.set_adapters([(adapter, 1.0)])
    adapter.close()
    assert adapter.closed


def test_adapter_freed_with_its_model(native: None, tiny_path: Path, tmp_path: Path) -> None:
    lora = write_tiny_lora(tmp_path / "lora.gguf")
    model = Model(tiny_path)
    adapter = model.load_adapter(lora)
    model.close()
    assert adapter.closed
