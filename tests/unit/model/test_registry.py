"""The registry: ids, duplicates, unload, failures to load."""

from __future__ import annotations

import pytest

from erllama.errors import ModelExistsError, UnknownModelError
from erllama.model import FinishReason, StubBackend
from erllama.model.registry import Registry
from erllama.model.request import GenerateRequest
from erllama.model.supervisor import ModelStatus


def test_ids_duplicates_and_unload() -> None:
    reg = Registry()
    try:
        a = reg.load(StubBackend)
        b = reg.load(StubBackend)
        named = reg.load(StubBackend, "tiny")
        assert (a, b, named) == ("model-1", "model-2", "tiny")
        with pytest.raises(ModelExistsError):
            reg.load(StubBackend, "tiny")
        assert reg.list() == {a: ModelStatus.RUNNING, b: ModelStatus.RUNNING, "tiny": ModelStatus.RUNNING}
        done = reg.get("tiny").submit(GenerateRequest([5, 6], max_tokens=2)).result(timeout_s=10)
        assert done.finish_reason is FinishReason.LENGTH
        reg.unload("tiny")
        with pytest.raises(UnknownModelError):
            reg.get("tiny")
        with pytest.raises(UnknownModelError):
            reg.unload("tiny")
        assert reg.load(StubBackend, "tiny") == "tiny", "an unloaded id can be loaded again"
    finally:
        reg.shutdown()
    assert reg.list() == {}


def test_a_model_that_fails_to_load_is_not_registered() -> None:
    def broken() -> StubBackend:
        raise OSError("missing.gguf does not exist")

    reg = Registry()
    with pytest.raises(OSError, match="does not exist"):
        reg.load(broken, "bad")
    assert reg.list() == {}
    assert reg.load(StubBackend, "bad") == "bad"
    reg.shutdown()
