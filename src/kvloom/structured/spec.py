"""Response formats: what a request's output must look like, and its canonical grammar spec.

``SamplingParams.response_format`` accepts any of:

- a pydantic model class (its JSON schema; validate the text with ``Model.model_validate_json``);
- a JSON schema ``dict`` (any dict whose ``"type"`` is not one of the format types below);
- an OpenAI-style dict: ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` or
  ``{"type": "json_object"}``; or kvloom's ``{"type": "regex", "regex": ...}``,
  ``{"type": "choice", "choice": [...]}``, ``{"type": "grammar", "grammar": ...}``, and their
  one-key shorthands ``{"regex": ...}``, ``{"choice": [...]}``, ``{"grammar": ...}``,
  ``{"json_schema": {...}}`` (a lone one of these keys is never a JSON schema);
- a :class:`ResponseFormat` (``ResponseFormat.from_schema(...)``, ``.from_regex(...)``,
  ``.from_choice(...)``, ``.from_grammar(...)``, ``.json_object()``).

Every form normalises to a :class:`GrammarSpec`, the hashable compile-cache key.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

FormatType = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
GrammarKind = FormatType | Literal["structural_tag"]
"""What a compiled grammar can be: a response format, or a structural tag (tool calls: built by
the engine from ``tools=``, never a user's ``response_format``)."""
_FORMAT_TYPES = ("json_schema", "json_object", "regex", "choice", "grammar")
_SHORTHAND_KEYS = ("json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A compiled grammar's identity: ``kind`` and canonical ``text``. Hashable and picklable.

    ``text`` is: the schema as JSON, keys in the caller's order (``json_schema``); ``""`` (``json_object``);
    the pattern (``regex``); the choices as a JSON list (``choice``); the EBNF (``grammar``); the
    xgrammar structural tag as JSON (``structural_tag``).
    """

    kind: GrammarKind
    text: str


class ResponseFormat(BaseModel):
    """One response format. Exactly the field matching ``type`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    type: FormatType
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # builtins.type: inside the class body, ``type`` is the field above (for type checkers).
    model: builtins.type[BaseModel] | None = Field(None, exclude=True, description="The pydantic model, if one was given.")

    @model_validator(mode="after")
    def _one_field(self) -> Self:
        needed = {"json_schema": self.json_schema, "regex": self.regex, "choice": self.choice,
                  "grammar": self.grammar}
        if self.type in needed and needed[self.type] is None:
            raise ValueError(f"a {self.type!r} response format needs the {self.type!r} field")
        extra = [k for k, v in needed.items() if v is not None and k != self.type]
        if extra:
            raise ValueError(f"a {self.type!r} response format must not set {extra}")
        if self.regex is not None and not self.regex:
            raise ValueError("regex must not be empty")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("grammar must not be empty")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if self.json_schema is not None:
            try:
                json.dumps(self.json_schema)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"json_schema is not JSON-serialisable: {exc}") from exc
        return self

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_schema(cls, schema: dict[str, Any] | builtins.type[BaseModel]) -> ResponseFormat:
        """A JSON schema, or a pydantic model class (its ``model_json_schema()``)."""
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return cls(type="json_schema", json_schema=schema.model_json_schema(), model=schema)
        return cls(type="json_schema", json_schema=schema)

    @classmethod
    def json_object(cls) -> ResponseFormat:
        """Any JSON object."""
        return cls(type="json_object")

    @classmethod
    def from_regex(cls, pattern: str) -> ResponseFormat:
        """Output must ``re.fullmatch`` the pattern."""
        return cls(type="regex", regex=pattern)

    @classmethod
    def from_choice(cls, choices: list[str]) -> ResponseFormat:
        """Output is exactly one of ``choices``."""
        return cls(type="choice", choice=list(choices))

    @classmethod
    def from_grammar(cls, ebnf: str) -> ResponseFormat:
        """An EBNF (GBNF-style) grammar with a ``root`` rule. xgrammar only."""
        return cls(type="grammar", grammar=ebnf)

    @classmethod
    def coerce(cls, value: object) -> ResponseFormat:
        """Any accepted form (see the module docstring) -> ``ResponseFormat``."""
        if isinstance(value, ResponseFormat):
            return value
        if isinstance(value, type) and issubclass(value, BaseModel):
            return cls.from_schema(value)
        if isinstance(value, dict):
            kind = value.get("type")
            if isinstance(kind, str) and kind in _FORMAT_TYPES:
                if kind == "json_schema" and isinstance(value.get("json_schema"), dict):
                    inner = value["json_schema"]
                    # OpenAI nests the schema: {"json_schema": {"name": ..., "schema": {...}}}
                    if "schema" in inner and isinstance(inner["schema"], dict):
                        return cls(type="json_schema", json_schema=inner["schema"])
                return cls.model_validate(value)
            if "type" not in value and len(value) == 1 and next(iter(value)) in _SHORTHAND_KEYS:
                # {"regex": ...}, {"choice": [...]}, {"grammar": ...}, {"json_schema": {...}}: no JSON
                # schema is a lone one of these (they are not schema keywords), so read it as meant.
                (key, inner), = value.items()
                return cls.model_validate({"type": key, key: inner})
            return cls(type="json_schema", json_schema=value)
        raise ValueError(
            "expected a pydantic model class, a JSON schema dict, a {'type': ...} dict or a ResponseFormat, "
            f"got {type(value).__name__}"
        )

    def to_spec(self) -> GrammarSpec:
        if self.type == "json_schema":
            # Key order is kept: it is the order in which the output writes an object's properties
            # (a model that writes "reasoning" before "answer" must be let to), so it is part of the spec.
            return GrammarSpec("json_schema", json.dumps(self.json_schema))
        if self.type == "json_object":
            return GrammarSpec("json_object", "")
        if self.type == "regex":
            assert self.regex is not None
            return GrammarSpec("regex", self.regex)
        if self.type == "choice":
            return GrammarSpec("choice", json.dumps(self.choice))
        assert self.grammar is not None
        return GrammarSpec("grammar", self.grammar)
