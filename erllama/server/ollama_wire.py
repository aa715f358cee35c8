"""The Ollama dialect's wire types: request bodies as pydantic models, each turning itself into erllama's neutral
values (:mod:`erllama.chat.types`, :class:`~erllama.server.chat.Params`) before anything else sees it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from erllama.chat import Message, ToolCall
from erllama.chat.schema import JSON_OBJECT_SCHEMA
from erllama.errors import InvalidInputError
from erllama.sampling import SamplerConfig
from erllama.server.chat import (
    Params,
)

__all__ = [
    "ChatMessageIn",
    "ChatRequest",
    "CopyRequest",
    "EmbedRequest",
    "EmbeddingsRequest",
    "FunctionCallIn",
    "FunctionDef",
    "GenerateRequest",
    "ModelRef",
    "Options",
    "ToolCallIn",
    "ToolDef",
]


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")

    num_predict: int | None = None
    temperature: Annotated[float | None, Field(ge=0.0)] = None
    top_k: Annotated[int | None, Field(ge=0, lt=2**31)] = None
    top_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    typical_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    repeat_penalty: Annotated[float | None, Field(gt=0.0)] = None
    repeat_last_n: Annotated[int | None, Field(ge=-1, lt=2**31)] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    options: Options | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    format: Literal["json", ""] | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = 0

    def params(self, default_max: int | None) -> Params:
        o = self.options or Options()
        sampling = SamplerConfig(
            temperature=0.8 if o.temperature is None else o.temperature,
            top_k=40 if o.top_k is None else o.top_k,
            top_p=0.9 if o.top_p is None else o.top_p,
            min_p=0.0 if o.min_p is None else o.min_p,
            typical_p=1.0 if o.typical_p is None else o.typical_p,
            repeat_penalty=1.1 if o.repeat_penalty is None else o.repeat_penalty,
            penalty_last_n=64 if o.repeat_last_n is None else o.repeat_last_n,
            presence_penalty=o.presence_penalty or 0.0,
            frequency_penalty=o.frequency_penalty or 0.0,
            seed=o.seed,
        )
        n = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else default_max
        return Params(n, list(o.stop or ()), sampling, bool(self.think), self.top_logprobs if self.logprobs else None)

    def response_schema(self) -> dict[str, Any] | None:
        if self.format == "json":
            return dict(JSON_OBJECT_SCHEMA)
        return self.format or None


class GenerateRequest(_Base):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None
    images: list[str] | None = None


class FunctionCallIn(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(BaseModel):
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None

    def neutral(self, at: int = 0) -> Message:
        """The message as a neutral one (``at``: its index in the conversation). Ollama's calls carry no ids, and
        a template may render them: each gets one derived from its place and its content, so a conversation
        resent whole renders the same prompt every time (a fresh random id per request would miss the cache)."""
        if self.images:
            raise InvalidInputError("images are not supported by this model")
        calls = []
        for i, c in enumerate(self.tool_calls or ()):
            args = json.dumps(c.function.arguments, ensure_ascii=False)
            digest = hashlib.blake2b(f"{at}\0{i}\0{c.function.name}\0{args}".encode(), digest_size=12).hexdigest()
            calls.append(ToolCall(f"call_{digest}", c.function.name, args))
        return Message(self.role, self.content, tuple(calls), name=self.tool_name, thinking=self.thinking)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatRequest(_Base):
    messages: list[ChatMessageIn] = Field(default_factory=list)
    tools: list[ToolDef] | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    input: str | list[str] = ""
    truncate: bool = True
    keep_alive: str | float | None = None
    dimensions: Annotated[int | None, Field(ge=1)] = None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    prompt: str = ""
    keep_alive: str | float | None = None


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, validation_alias=AliasChoices("model", "name"))]
    stream: bool = True


class CopyRequest(BaseModel):
    source: Annotated[str, Field(min_length=1)]
    destination: Annotated[str, Field(min_length=1)]
