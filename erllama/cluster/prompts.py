"""The token ids a request will run, found by the ingress without the model's weights, so the router can place it.

The ingress loads the model's vocabulary only (llama.cpp's ``vocab_only``: the tokenizer and the GGUF metadata, a
few MB) and renders each request the way the server's routes do: the same wire types, the same chat engine and
template, the same tokenizer call. The result is a routing hint, never an input: the replica renders the request
again and the cache compares full keys, so a hint that differs (a dialect this module does not know, an option it
ignores) costs only a worse placement.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from erllama._native import Model, ModelConfig
from erllama.chat import ChatEngine, Message, Tool
from erllama.chat.stable import StableOptions, stabilize
from erllama.errors import ErllamaError

__all__ = ["RoutingPrompts", "VocabModel"]


class VocabModel:
    """A model's vocabulary and chat template without its weights; a :class:`~erllama.chat.engine.TemplateHost`.
    Thread-safe (one lock around the tokenizer)."""

    def __init__(self, path: str | Path) -> None:
        self._model = Model(path, ModelConfig(vocab_only=True))
        self._lock = threading.Lock()
        info = self._model.info
        with self._lock:
            self._info: dict[str, Any] = {
                "chat_template": info.chat_template,
                "bos_text": self._model.token_text(info.bos) if 0 <= info.bos < info.n_vocab else "",
                "eos_text": self._model.token_text(info.eos) if 0 <= info.eos < info.n_vocab else "",
            }

    def model_info(self, model_id: str) -> dict[str, Any]:
        return dict(self._info)

    def apply_chat_template(
        self, model_id: str, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        with self._lock:
            return self._model.apply_chat_template(messages, add_assistant=add_generation_prompt)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        with self._lock:
            return self._model.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._lock:
            return self._model.detokenize(list(tokens))

    def close(self) -> None:
        self._model.close()


class RoutingPrompts:
    """``tokens(path, body)``: the prompt tokens of an HTTP request to the erllama server, or None when the
    request generates nothing or cannot be read (the router then balances load alone)."""

    def __init__(self, vocab: VocabModel, stable: StableOptions | None = None) -> None:
        self._vocab = vocab
        self._chat = ChatEngine(vocab)
        self._stable = stable or StableOptions()  # as the replicas rewrite agent prompts (ServerConfig.stable)

    def tokens(self, path: str, body: bytes) -> list[int] | None:
        try:
            prompt = self._prompt(path.rstrip("/"), json.loads(body or b"null"))
        except (ValueError, ValidationError, ErllamaError, TypeError, KeyError):
            return None
        if prompt is None:
            return None
        if isinstance(prompt, list):
            return prompt
        return self._vocab.tokenize(prompt)

    def _render(self, messages: list[Message], tools: Sequence[Tool] = (), **options: Any) -> str:
        messages, stable_tools = stabilize(messages, tools, self._stable)
        return self._chat.prepare("", messages, tools=stable_tools, **options).prompt

    def _prompt(self, path: str, data: Any) -> str | list[int] | None:
        if not isinstance(data, dict):
            return None
        if path in ("/v1/chat/completions", "/chat/completions"):
            from erllama.server.openai_wire import ChatCompletionRequest

            chat = ChatCompletionRequest.model_validate(data)
            tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in chat.tools or ()]
            return self._render(
                chat.neutral(),
                tools=tools,
                tool_choice=chat.choice(),
                response_schema=chat.response_schema(),
                continue_final=chat.continues(),
            )
        if path == "/v1/messages":
            from erllama.server.anthropic import MessagesRequest

            anth = MessagesRequest.model_validate(data)
            messages = anth.neutral(strip_billing=self._stable.strip_billing_header)
            return self._render(messages, tools=anth.tool_list(), tool_choice=anth.choice(), continue_final=True)
        if path == "/api/chat":
            from erllama.server.ollama_wire import ChatRequest

            ochat = ChatRequest.model_validate(data)
            tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in ochat.tools or ()]
            messages = [m.neutral(i) for i, m in enumerate(ochat.messages)]
            return self._render(messages, tools=tools) if ochat.messages else None
        if path == "/api/generate":
            from erllama.server.ollama_wire import GenerateRequest

            gen = GenerateRequest.model_validate(data)
            if gen.suffix or gen.context or not (gen.prompt or gen.system):
                return None
            if gen.raw:
                return gen.prompt
            msgs = [Message("system", gen.system)] if gen.system else []
            return self._render([*msgs, Message("user", gen.prompt)])
        if path in ("/v1/completions", "/completions", "/completion"):
            prompt = data.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # several prompts: route on the first
            if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
                return prompt
        return None
