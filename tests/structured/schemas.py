"""JSON schemas (and a pydantic model) that the constrained-decoding tests generate against.

Strings carry ``maxLength`` and numbers bounds: a random model at temperature 1 would
otherwise rarely close a string, and most runs would end at ``max_tokens`` (``length``),
which proves nothing about validity.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Address(BaseModel):
    city: str = Field(max_length=8)
    zip: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    address: Address
    nickname: str | None = Field(default=None, max_length=6)


SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
        "required": ["id", "ok"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array_min_max_items": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1,
                     "maxItems": 3},
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "small": {"type": "integer", "minimum": -5, "maximum": 5},
            "pct": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["small", "pct"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "boolean"},
            "c": {"type": "null"},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                               "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "string", "enum": ["x", "y"]}, "v": {"type": "boolean"}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 3}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "pydantic_person": Person.model_json_schema(),
}

REGEXES = [r"[a-z]{3}-\d{2,4}", r"(yes|no|maybe)", r"\d{4}-\d{2}-\d{2}", r"#[0-9a-f]{6}"]
CHOICES = ["positive", "negative", "neutral"]
