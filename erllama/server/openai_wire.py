"""The OpenAI dialect's wire types: request bodies as pydantic models, each turning itself into erllama's neutral
values (:mod:`erllama.chat.types`, :class:`~erllama.server.chat.Params`) before anything else sees it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from erllama.chat import Message, ToolCall
from erllama.chat.schema import JSON_OBJECT_SCHEMA
from erllama.chat.stable import MARK
from erllama.errors import InvalidInputError
from erllama.sampling import SamplerConfig
from erllama.server.chat import Params
from erllama.server.prompts import PromptParts, split_prompts

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "FunctionCall",
    "FunctionDef",
    "JsonSchemaFormat",
    "NamedToolChoice",
    "ResponseFormat",
    "StreamOptions",
    "ToolCallIn",
    "ToolDef",
]


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            kind = part.get("type")
            if kind not in ("text", "input_text"):
                raise InvalidInputError(
                    f"content parts of type {kind!r} are not supported: the model reads text only ({self.role} message)"
                )
            texts.append(str(part.get("text", "")) + (MARK if part.get("cache_control") else ""))
        return "".join(texts)

    def neutral(self) -> Message:
        calls = tuple(
            ToolCall(
                c.id,
                c.function.name,
                c.function.arguments
                if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments, ensure_ascii=False),
            )
            for c in self.tool_calls or ()
        )
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=self.text(), tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name)


class FunctionDef(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: Any = Field(default=None, alias="schema")  # llama-server's extension: json_object with a schema


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # none: the default model answers (ServerConfig.model_fallback)
    max_tokens: Annotated[int | None, Field(ge=0)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = None
    grammar: str | None = None  # llama-server's extensions: a GBNF grammar, or a JSON schema, for the reply
    json_schema: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def n_logprobs(self) -> int | None:
        return None

    def params(self, max_tokens: int | None) -> Params:
        sampling = SamplerConfig(
            temperature=0.0 if self.temperature is None else self.temperature,  # greedy unless asked
            top_p=1.0 if self.top_p is None else self.top_p,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            penalty_last_n=-1 if self.frequency_penalty or self.presence_penalty else 64,
            seed=self.seed,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
        )
        return Params(max_tokens=max_tokens, stop=self.stops(), sampling=sampling, logprobs=self.n_logprobs())


def _items(value: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """A prompt or input field as a list of items: a text, a token array, or a list of either."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(x, int) for x in value):
        return [[int(x) for x in value if isinstance(x, int)]]
    return [x if isinstance(x, str) else [int(t) for t in x] for x in value if not isinstance(x, int)]


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=64)]
    )
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    echo: bool = False
    suffix: str | None = None

    def n_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request (a list of prompts is a batch: ``n`` choices for each, in order)."""
        if self.suffix:
            raise InvalidInputError("suffix (insertion) is not supported by /v1/completions; use /infill")
        return _items(self.prompt)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # none: the default model answers (ServerConfig.model_fallback)
    # OpenAI's forms (a text, texts, token ids, token arrays) and llama-server's arrays mixing ids and texts
    input: str | Annotated[list[str | int | Annotated[list[str | int], Field(min_length=1)]], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1)] = None

    def inputs(self) -> list[str | PromptParts]:
        """The texts or token arrays to embed, one vector each."""
        return split_prompts(self.input)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=0)] = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    timings_per_token: bool = False  # llama-server's extensions: its timings in the stream's last chunks,
    verbose: bool = False  # and the rendered prompt (``__verbose``) in a reply
    prompt_cache_key: Annotated[str | None, Field(max_length=1024)] = None

    def neutral(self) -> list[Message]:
        """The conversation as neutral messages, with cache breakpoints marked (:mod:`erllama.chat.stable`): after
        each content part that carries ``cache_control`` (as OpenAI-compatible gateways pass Anthropic's through),
        and, with a ``prompt_cache_key``, before the first turn after the system prompt (the head the client's
        requests share, whatever their tails)."""
        out = [m.neutral() for m in self.messages]
        if self.prompt_cache_key:
            first = next((i for i, m in enumerate(out) if m.role != "system"), None)
            if first is not None and first > 0:
                out[first] = dataclasses.replace(out[first], content=MARK + out[first].content)
        return out

    def continues(self) -> bool:
        """Whether the reply continues a final assistant message: when asked (``continue_final_message``, vLLM's
        name), or, as llama-server does, when the conversation ends with one and a new turn is not asked for."""
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidInputError("continue_final_message and add_generation_prompt cannot both be true")
        if self.continue_final_message is not None:
            continues = self.continue_final_message
        else:
            continues = self.messages[-1].role == "assistant" and self.add_generation_prompt is not True
        if continues and len(self.messages) > 1 and self.messages[-2].role == "assistant":
            raise InvalidInputError("the reply continues the last assistant message: the one before cannot be one too")
        return continues

    def n_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def choice(self) -> str:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.get("name", "")
        return self.tool_choice or "auto"

    def response_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        given = [x for x in (rf is not None and rf.type != "text", self.json_schema is not None, self.grammar) if x]
        if len(given) > 1:
            raise InvalidInputError("give one of response_format, json_schema and grammar")
        if self.json_schema is not None:
            return self.json_schema
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            if rf.schema_ is None:
                return dict(JSON_OBJECT_SCHEMA)
            if not isinstance(rf.schema_, dict):
                raise InvalidInputError("response_format schema must be a JSON schema object")
            return rf.schema_
        if rf.json_schema is None:
            raise InvalidInputError("response_format json_schema needs a json_schema object")
        return rf.json_schema.schema_ or dict(JSON_OBJECT_SCHEMA)
