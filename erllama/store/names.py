"""Model names: ``name[:tag]``, the way Ollama spells them (``smollm2:135m``; the tag defaults to ``latest``).

A name is also a path component of the store (``manifests/<name>/<tag>.json``), so the grammar is strict: letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 80 characters each, compared in lower case
(case-insensitive filesystems must not see two models where users see one). Anything else — separators, ``..``,
empty parts, a second colon — is refused with a message that says what a name may contain.
"""

from __future__ import annotations

import dataclasses
import re

from erllama.errors import InvalidInputError

__all__ = ["DEFAULT_TAG", "ModelName"]

DEFAULT_TAG = "latest"
_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class ModelName:
    """A validated, normalised model name."""

    name: str
    tag: str = DEFAULT_TAG

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """``name`` or ``name:tag``; InvalidInputError for anything else."""
        base, sep, tag = text.strip().lower().partition(":")
        if sep and not tag:
            tag = "?"  # "name:" is as wrong as any other bad tag
        tag = tag or DEFAULT_TAG
        for part in (base, tag):
            if not _PART.fullmatch(part) or ".." in part:
                raise InvalidInputError(
                    f"invalid model name {text!r}: use name or name:tag, each 1-80 of a-z 0-9 . _ - "
                    "(starting with a letter or digit)"
                )
        return cls(base, tag)

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"
