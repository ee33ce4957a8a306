"""Every accepted ``response_format`` form normalises to one canonical ``GrammarSpec``; bad forms
are refused at ``SamplingParams`` construction with the field named."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from kvloom import SamplingParams
from kvloom.structured.spec import GrammarSpec, ResponseFormat

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


class Point(BaseModel):
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (SCHEMA, "json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}, "json_schema"),
        ({"type": "json_schema", "json_schema": SCHEMA}, "json_schema"),
        ({"json_schema": SCHEMA}, "json_schema"),
        ({"type": "json_object"}, "json_object"),
        ({"type": "regex", "regex": r"\d+"}, "regex"),
        ({"regex": r"\d+"}, "regex"),
        ({"type": "choice", "choice": ["yes", "no"]}, "choice"),
        ({"choice": ["yes", "no"]}, "choice"),
        ({"type": "grammar", "grammar": 'root ::= "a"'}, "grammar"),
        ({"grammar": 'root ::= "a"'}, "grammar"),
        (ResponseFormat.from_regex(r"\d+"), "regex"),
    ],
)
def test_every_form_normalises(value: Any, kind: str) -> None:
    spec = ResponseFormat.coerce(value).to_spec()
    assert spec.kind == kind
    assert SamplingParams(response_format=value).response_format is not None


def test_equal_formats_share_one_spec_and_key_order_is_kept() -> None:
    same = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert ResponseFormat.coerce(SCHEMA).to_spec() == ResponseFormat.coerce(same).to_spec()
    # Property order decides the order the output writes them in: it must survive into the spec.
    ordered = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}
    text = ResponseFormat.coerce(ordered).to_spec().text
    assert text.index('"z"') < text.index('"a"')
    assert ResponseFormat.coerce({"regex": "a+"}).to_spec() == GrammarSpec("regex", "a+")
    assert ResponseFormat.coerce({"choice": ["x", "y"]}).to_spec() == GrammarSpec("choice", '["x", "y"]')


def test_a_pydantic_model_keeps_its_class() -> None:
    fmt = ResponseFormat.coerce(Point)
    assert fmt.model is Point and fmt.json_schema == Point.model_json_schema()


def test_a_schema_that_merely_contains_a_format_key_stays_a_schema() -> None:
    schema = {"type": "object", "properties": {"regex": {"type": "string"}}}
    assert ResponseFormat.coerce(schema).to_spec().kind == "json_schema"
    two_keys = {"regex": "a+", "title": "t"}  # not a lone shorthand key: read as a schema
    assert ResponseFormat.coerce(two_keys).to_spec().kind == "json_schema"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"type": "regex"}, "needs the 'regex' field"),
        ({"type": "regex", "regex": ""}, "regex must not be empty"),
        ({"regex": ""}, "regex must not be empty"),
        ({"choice": []}, "choice must be a non-empty list"),
        ({"type": "choice", "choice": ["a"], "regex": "a"}, "must not set"),
        ({"grammar": "   "}, "grammar must not be empty"),
        ({"type": "json_schema", "json_schema": {"a": object()}}, "JSON-serialisable"),
        ("a string", "expected a pydantic model class"),
    ],
)
def test_bad_forms_name_the_field(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match="response_format") as info:
        SamplingParams(response_format=value)
    assert message in str(info.value)
