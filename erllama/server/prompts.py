"""Prompts as the dialects send them: llama-server's arrays mixing token ids and texts, resolved to what the runtime
takes; fill-in-the-middle prompts from a model's FIM tokens; embeddings cut to fewer dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from erllama.errors import InvalidInputError
from erllama.server.state import ServerState

__all__ = [
    "PromptParts",
    "fim_markers",
    "fim_prompt",
    "resolve_prompt",
    "split_prompts",
    "truncate_embedding",
]


PromptParts = list[str | int]  # token ids and texts, one prompt (llama-server's mixed arrays)


def split_prompts(value: str | Sequence[Any]) -> list[str | PromptParts]:
    """A prompt field as llama-server reads it: a text; an array of token ids, texts among them or not, is one
    prompt; any other array is a list of prompts, each a text or such an array."""
    if isinstance(value, str):
        return [value]

    def parts(item: Any) -> PromptParts | None:
        if isinstance(item, list) and all(isinstance(x, str | int) and not isinstance(x, bool) for x in item):
            return list(item)
        return None

    if value and any(isinstance(x, int) for x in value):
        one = parts(list(value))
        if one is None:
            raise InvalidInputError("a prompt array holds token ids and texts; a list of prompts holds no token ids")
        return [one]
    out: list[str | PromptParts] = []
    for item in value:
        p = item if isinstance(item, str) else parts(item)
        if p is None:
            raise InvalidInputError("a prompt is a text, an array of token ids and texts, or a list of those")
        out.append(p)
    return out


def resolve_prompt(state: ServerState, model_id: str, prompt: str | Sequence[str | int]) -> str | list[int]:
    """A prompt as the runtime takes it: a text, or token ids where the prompt mixed in texts (each tokenized
    where it stands, special tokens parsed, the model's BOS only before a leading text as for a text prompt).
    Blocks on the model's worker: call it off the event loop."""
    if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
        return prompt if isinstance(prompt, str) else [int(x) for x in prompt]
    tokens: list[int] = []
    for i, part in enumerate(prompt):
        if isinstance(part, int):
            tokens.append(part)
        else:
            tokens.extend(state.runtime.tokenize(model_id, part, add_special=i == 0, parse_special=True))
    return tokens


def truncate_embedding(vector: list[float], dimensions: int) -> list[float]:
    """The first ``dimensions`` components, L2-normalised again (OpenAI's and Ollama's ``dimensions``: models trained
    for it keep their meaning in a prefix). A vector no longer than that is returned as it is."""
    if dimensions >= len(vector):
        return vector
    head = np.asarray(vector[:dimensions], dtype=np.float64)
    norm = float(np.linalg.norm(head))
    return [float(x) for x in (head / norm if norm > 0 else head)]


# fill-in-the-middle markers of the model families that have them: (prefix, suffix, middle)
_FIM_MARKERS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    ("<PRE>", "<SUF>", "<MID>"),
    ("<|fim\u2581begin|>", "<|fim\u2581hole|>", "<|fim\u2581end|>"),
)


_FIM_FOUND: dict[str, tuple[int, int, int] | None] = {}  # model fingerprint -> its markers


def fim_markers(state: ServerState, model_id: str) -> tuple[int, int, int] | None:
    """The model's fill-in-the-middle tokens (prefix, suffix, middle), or None when it has none: each marker must
    be one special token of its vocabulary. Looked up once per model file (an editor's infill plugin calls /infill
    on every keystroke; each lookup is a few tokenize calls on the model's worker)."""
    fingerprint = str(state.runtime.model_info(model_id).get("fingerprint") or "")
    if fingerprint and fingerprint in _FIM_FOUND:
        return _FIM_FOUND[fingerprint]
    found = _find_fim_markers(state, model_id)
    if fingerprint:
        _FIM_FOUND[fingerprint] = found
    return found


def _find_fim_markers(state: ServerState, model_id: str) -> tuple[int, int, int] | None:
    rt = state.runtime
    for trio in _FIM_MARKERS:
        ids = []
        for marker in trio:
            toks = rt.tokenize(model_id, marker, add_special=False, parse_special=True)
            if len(toks) != 1 or rt.tokenize(model_id, marker, add_special=False, parse_special=False) == toks:
                break  # not one token, or one that plain text also gives (not a special marker)
            ids.append(toks[0])
        else:
            return ids[0], ids[1], ids[2]
    return None


def fim_prompt(state: ServerState, model_id: str, prefix: str, suffix: str) -> list[int]:
    """The tokens of an infill request (prefix-suffix-middle order, as llama-server builds them): the reply is
    the text between ``prefix`` and ``suffix``. Raises InvalidInputError for a model without FIM tokens."""
    markers = fim_markers(state, model_id)
    if markers is None:
        raise InvalidInputError("this model has no fill-in-the-middle tokens, so it cannot infill (suffix)")
    pre, suf, mid = markers
    rt = state.runtime
    bos = rt.tokenize(model_id, "", add_special=True)
    body = rt.tokenize(model_id, prefix, add_special=False) if prefix else []
    tail = rt.tokenize(model_id, suffix, add_special=False) if suffix else []
    return [*bos, pre, *body, suf, *tail, mid]
