"""The worker over llama.cpp: N parallel requests give the same tokens as the same requests run one by one."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama._native import ContextConfig
from erllama.model import FinishReason, LlamaBackend, SamplerConfig
from erllama.model.request import GenerateRequest
from erllama.model.worker import ModelWorker

pytestmark = pytest.mark.native

PROMPTS = [
    "The quick brown fox",
    "Hello world, the cache is warm and",
    "世界 🎉 what would people",
    "the lazy dog was not",
]


@pytest.mark.parametrize("n_seq_max", [1, 4])
def test_parallel_equals_sequential(model_path: Path, n_seq_max: int) -> None:
    def factory() -> LlamaBackend:
        return LlamaBackend(
            model_path, context_config=ContextConfig(n_ctx=512 * n_seq_max, n_batch=64, n_seq_max=n_seq_max)
        )

    w = ModelWorker(factory, name="llama")
    w.start()
    try:
        backend_tokens = LlamaBackend(model_path, context_config=ContextConfig(n_ctx=256, n_batch=64))
        prompts = [backend_tokens.tokenize(p) for p in PROMPTS]
        backend_tokens.close()
        one_by_one = [w.submit(GenerateRequest(p, max_tokens=12)).result(timeout_s=120).tokens for p in prompts]
        handles = [w.submit(GenerateRequest(p, max_tokens=12)) for p in prompts]
        together = [h.result(timeout_s=120).tokens for h in handles]
        seeded = SamplerConfig(temperature=0.9, top_k=40, seed=3)
        s1 = w.submit(GenerateRequest(prompts[0], max_tokens=12, sampling=seeded))
        s2 = w.submit(GenerateRequest(prompts[0], max_tokens=12, sampling=seeded))
        assert s1.result(timeout_s=120).tokens == s2.result(timeout_s=120).tokens
        cancelled = w.submit(GenerateRequest(prompts[1], max_tokens=400))
        cancelled.cancel()
        assert cancelled.result(timeout_s=120).finish_reason is FinishReason.CANCELLED
    finally:
        w.stop()
    assert together == one_by_one
