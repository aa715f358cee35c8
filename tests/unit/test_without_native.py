"""The pure-Python layers work without the native build: with the generated cffi module unimportable (as before
``build_llama.py`` ever ran), the backend protocol, the stub, the worker, the runtime and the server import, and the
server answers a chat request on the stub."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CODE = textwrap.dedent(
    """
    import asyncio, sys
    sys.modules["erllama._native._llama_ffi"] = None  # any import of it now fails, as with no build

    import httpx
    from erllama import Runtime
    from erllama.cache import CacheStore, RamTier
    from erllama.model import StubBackend
    from erllama.model.backend import ModelBackend
    from erllama.sampling import SamplerConfig
    from erllama.server import create_app

    rt = Runtime(CacheStore([RamTier(1 << 20)]))
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1), model_id="stub")
    app = create_app(rt, {"stub": "stub"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            body = {"model": "stub", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            return await c.post("/v1/chat/completions", json=body)

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4, r.text
    assert r.json()["system_fingerprint"].endswith("llama.cpp-unknown"), r.text  # it knows there is no build
    rt.close()
    print("served without the native build")
    """
)


def test_the_stub_runtime_and_server_need_no_native_build() -> None:
    out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "served without the native build" in out.stdout, out.stdout
