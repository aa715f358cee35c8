"""Model metadata, context settings, per-sequence memory operations, logging and library discovery."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from erllama._native import Context, ContextConfig, FlashAttention, KVType, Model, library
from erllama.errors import ContextCreateError, KVCacheFullError, LibraryError
from erllama.testing import SMOLLM2, FetchError, TinyModelSpec, fetch, tiny_model

pytestmark = pytest.mark.native


def test_tiny_model_metadata(native: None, tiny_path: Path) -> None:
    spec = TinyModelSpec()
    with Model(tiny_path) as m:
        info = m.info
        assert (info.architecture, info.n_layer, info.n_embd) == ("llama", spec.n_layer, spec.n_embd)
        assert (info.n_head, info.n_head_kv, info.n_ctx_train) == (spec.n_head, spec.n_head_kv, spec.n_ctx_train)
        assert info.vocab_type == 1  # SPM
        assert (info.bos, info.eos, info.add_bos) == (1, 2, True)
        assert info.eos in info.eog_tokens
        assert info.quantization == "F16"
        assert info.n_swa == 0
        assert info.chat_template is not None
        assert "<|im_start|>" in info.chat_template
        assert 0 < info.size_bytes <= info.file_size_bytes
        assert m.meta("general.name") == "erllama-tiny"
        assert m.meta_items()["general.architecture"] == "llama"
        assert m.meta("no.such.key") is None


@pytest.mark.smollm2
def test_smollm2_metadata(native: None, smollm2_path: Path) -> None:
    with Model(smollm2_path) as m:
        info = m.info
        assert (info.n_layer, info.n_embd, info.n_vocab, info.n_head_kv) == (30, 576, 49152, 3)
        assert info.quantization.startswith("Q4_1")
        assert info.vocab_type == 2  # BPE
        assert {0, 2} <= set(info.eog_tokens)
        assert "135M" in (m.meta("general.size_label") or "135M")
        assert info.n_params > 100_000_000


def test_vocab_only_model_tokenizes_without_weights(native: None, tiny_path: Path) -> None:
    from erllama._native import ModelConfig

    with Model(tiny_path, ModelConfig(vocab_only=True)) as m:
        assert m.tokenize("hello world", add_special=False)
        assert m.info.n_vocab > 256


def test_context_settings_are_applied(model: Model) -> None:
    cfg = ContextConfig(n_ctx=512, n_batch=128, n_ubatch=64, n_threads=1, n_threads_batch=2, n_seq_max=2)
    with Context(model, cfg) as ctx:
        assert (ctx.n_ctx, ctx.n_batch, ctx.n_ubatch, ctx.n_seq_max) == (512, 128, 64, 2)
        assert ctx.n_ctx_seq == 256
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 2)
        ctx.set_threads(2)
        assert (ctx.n_threads, ctx.n_threads_batch) == (2, 2)


@pytest.mark.parametrize(
    "changes",
    [
        {"type_k": KVType.Q8_0},
        {"type_k": KVType.Q8_0, "type_v": KVType.Q8_0, "flash_attn": FlashAttention.ON},
        {"flash_attn": FlashAttention.ON},
        {"type_k": KVType.F32, "type_v": KVType.F32},
    ],
    ids=["q8-k", "q8-kv-flash", "flash", "f32"],
)
def test_kv_types_and_flash_attention_decode(model: Model, changes: dict[str, object]) -> None:
    cfg = dataclasses.replace(ContextConfig(n_ctx=256, n_batch=64), **changes)  # type: ignore[arg-type]
    with Context(model, cfg) as ctx:
        logits = ctx.logits(ctx.decode_tokens(model.tokenize("the cache is warm")))
        assert logits.shape == (model.n_vocab,)


def test_impossible_kv_layout_is_a_clean_error(native: None, tmp_path: Path) -> None:
    """A Q8_0 cache needs head sizes divisible by its 32-element blocks; llama.cpp refuses, we raise."""
    spec = TinyModelSpec(n_head=4, n_head_kv=2)  # head size 16
    with Model(tiny_model(tmp_path, spec)) as m:
        cfg = ContextConfig(n_ctx=256, n_batch=64, type_k=KVType.Q8_0, type_v=KVType.Q8_0, flash_attn=FlashAttention.ON)
        with pytest.raises(ContextCreateError, match="does not divide"):
            Context(m, cfg)
        with Context(m, ContextConfig(n_ctx=256, n_batch=64)) as ctx:
            ctx.decode_tokens(m.tokenize("still fine"))


def test_memory_operations(model: Model) -> None:
    cfg = ContextConfig(n_ctx=512, n_batch=64, n_seq_max=3, kv_unified=True)
    tokens = model.tokenize("the quick brown fox jumps over the lazy dog")
    with Context(model, cfg) as ctx:
        ctx.decode_tokens(tokens, 0)
        assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (0, len(tokens) - 1)
        assert ctx.seq_pos_max(1) == -1
        ctx.seq_cp(0, 1, 0, 5)  # shares the first 5 cells (unified KV)
        assert ctx.seq_len(1) == 5
        ctx.decode_tokens(tokens[5:], 1)
        assert ctx.seq_len(1) == len(tokens)
        ctx.seq_cp(0, 2)
        ctx.seq_keep(2)
        assert (ctx.seq_len(0), ctx.seq_len(1), ctx.seq_len(2)) == (0, 0, len(tokens))
        assert ctx.seq_rm(2, 3, -1)
        assert ctx.seq_len(2) == 3
        assert ctx.can_shift
        ctx.clear()
        assert ctx.seq_len(2) == 0


def test_kv_cache_full_is_an_exception_not_an_abort(model: Model) -> None:
    """Per-sequence room is checked up front; the shared cells of a unified cache can still run out."""
    cfg = ContextConfig(n_ctx=256, n_batch=256, n_seq_max=2, kv_unified=True)
    filler = (model.tokenize("hello world the cache ") * 60)[:200]
    with Context(model, cfg) as ctx:
        assert ctx.n_ctx_seq == 256
        ctx.decode_tokens(filler, 0)
        with pytest.raises(KVCacheFullError) as info:
            ctx.decode_tokens(filler[:100], 1)
        assert info.value.code == 1
        ctx.seq_rm(0)
        ctx.seq_rm(1)
        ctx.decode_tokens(filler[:100], 1)


def test_llama_log_goes_to_logging(tiny_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="erllama.llama"), Model(tiny_path):
        pass
    assert any(r.name == "erllama.llama" and "llama" in r.getMessage() for r in caplog.records)


def test_process_is_protected_from_debugger_backtraces(native: None) -> None:
    assert os.environ.get("GGML_NO_BACKTRACE") == "1"
    assert library().backend == "cpu"


def test_lib_dir_override(native: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from erllama._native import loader

    monkeypatch.setenv("ERLLAMA_LIB_DIR", str(library().lib_dir))
    assert loader.library_dir()[0] == library().lib_dir
    monkeypatch.setenv("ERLLAMA_LIB_DIR", str(tmp_path))
    assert loader.library_dir()[0] == tmp_path
    with pytest.raises(LibraryError, match="does not exist"):
        loader._dlopen_all(tmp_path)


@pytest.mark.smollm2
def test_fetcher_verifies_checksums(smollm2_path: Path, tmp_path: Path) -> None:
    assert fetch(SMOLLM2) == smollm2_path
    assert fetch(SMOLLM2, smollm2_path.parent, verify_existing=True) == smollm2_path
    tampered = dataclasses.replace(SMOLLM2, sha256="0" * 64)
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch(tampered, tmp_path)
    assert not any(tmp_path.glob("*.gguf")), "nothing unverified is installed"


def test_backend_of_an_unrecorded_library_is_detected(native: None) -> None:
    import dataclasses as dc

    lib = library()
    expected = "cpu" if lib.backend == "cpu" else "gpu"  # a CUDA or Metal build reports its GPU device
    assert dc.replace(lib, manifest={}).backend == expected
