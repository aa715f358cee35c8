"""JSON schema -> GBNF through llama.cpp's own converter (the C shim), and the grammar constraining real output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erllama import Runtime
from erllama._native import json_schema_to_grammar
from erllama.chat.schema import JSON_OBJECT_SCHEMA
from erllama.errors import SchemaError
from erllama.model import LlamaBackend

pytestmark = pytest.mark.native


def test_converter_output_and_errors(native: None) -> None:
    grammar = json_schema_to_grammar(
        {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}}, "required": ["n"]}
    )
    assert grammar.splitlines()[0]  # non-empty
    assert any(line.startswith("root ::=") for line in grammar.splitlines())
    assert '"\\"a\\""' in grammar
    assert "root ::=" in json_schema_to_grammar(JSON_OBJECT_SCHEMA)
    with pytest.raises(SchemaError, match="cannot resolve"):
        json_schema_to_grammar({"$ref": "#/definitions/missing"})
    with pytest.raises(SchemaError, match="not JSON"):
        json_schema_to_grammar({"x": object()})


@pytest.mark.smollm2
def test_grammar_constrains_real_output(smollm2_path: Path, native: None) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 1}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    with Runtime(None) as rt:
        model = rt.load_model(backend=lambda: LlamaBackend(smollm2_path))
        prompt = rt.apply_chat_template(model, [("user", "Pick a colour and a number.")])
        for seed in range(3):
            done = rt.complete(
                model, prompt, max_tokens=64, grammar=json_schema_to_grammar(schema), temperature=1.0, seed=seed
            )
            value = json.loads(done.reply)
            assert value["colour"] in ("red", "green", "blue")
            assert isinstance(value["count"], int)
            assert value["count"] >= 1
            assert set(value) == {"colour", "count"}
