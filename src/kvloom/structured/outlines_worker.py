r"""What runs inside the outlines process pool: spec -> regex -> ``outlines_core.Index``.

Importing this module is cheap: only the standard library, ``outlines_core`` and
:mod:`kvloom.structured.json_bounds` (no torch), because every pool process imports it at
start-up. JSON schemas go through :func:`~kvloom.structured.json_bounds.rewrite_bounded_numbers`
first: outlines-core ignores ``minimum``/``maximum``. Arguments and results cross the
process boundary by pickle: ``(kind, text)`` strings in, an ``Index`` out (it pickles through
its compact binary form, ``Index.from_binary``).

Regex dialect: outlines-core's (Rust ``regex``) DFA, matched against the whole output. A
pattern's leading ``^`` and trailing ``$`` are dropped (the DFA is anchored at both ends anyway,
and outlines-core refuses anchors); ``\d``, ``\w`` and ``\s`` mean their ASCII classes, as in
JSON Schema and the xgrammar backend.
"""

from __future__ import annotations

import json
import re

import outlines_core
from outlines_core.json_schema import build_regex_from_schema

from kvloom.structured.json_bounds import fill_placeholders, rewrite_bounded_numbers

WHITESPACE_PATTERN = r"[ \t\n]?"
"""Between JSON tokens: at most one whitespace character (``json.dumps``'s ``", "`` and ``": "``, or
compact JSON), the language of the xgrammar backend. Unbounded whitespace would let a weak model pad
forever instead of closing the object."""

_WS = WHITESPACE_PATTERN

_STRING = r'"([^"\\\x00-\x1F\x7F-\x9F]|\\(["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_SCALAR = f"({_STRING}|{_NUMBER}|true|false|null)"
_FLAT_ARRAY = rf"\[{_WS}({_SCALAR}{_WS}(,{_WS}{_SCALAR}{_WS})*)?\]"
_FLAT_OBJECT = rf"\{{{_WS}({_STRING}{_WS}:{_WS}{_SCALAR}{_WS}(,{_WS}{_STRING}{_WS}:{_WS}{_SCALAR}{_WS})*)?\}}"
_VALUE = f"({_SCALAR}|{_FLAT_ARRAY}|{_FLAT_OBJECT})"
JSON_OBJECT_REGEX = rf"\{{{_WS}({_STRING}{_WS}:{_WS}{_VALUE}{_WS}(,{_WS}{_STRING}{_WS}:{_WS}{_VALUE}{_WS})*)?\}}"
"""``json_object``: a JSON object (whitespace as ``WHITESPACE_PATTERN``) whose values are scalars (string, number, boolean,
null), arrays of scalars, or objects of scalars: two levels of nesting. A regex cannot express
unbounded nesting, and outlines-core's own regex for ``{"type": "object"}`` (three levels, every
combination) takes ~6 s to index even on a 700-token vocabulary; this one takes ~0.1-0.3 s."""

EBNF_ERROR = "EBNF grammars need the xgrammar backend"


def strip_anchors(pattern: str) -> str:
    """Drop a leading ``^`` and a trailing unescaped ``$`` (``"^a\\$$"`` -> ``"a\\$"``)."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$"):
        backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
        if backslashes % 2 == 0:
            pattern = pattern[:-1]
    return pattern


_ASCII_SHORTHANDS = {"d": "0-9", "w": "0-9A-Za-z_", "s": r" \t\n\r\f\v"}


def ascii_shorthands(pattern: str) -> str:
    r"""Spell ``\d``, ``\w``, ``\s`` (and ``\D``, ``\W``, ``\S`` outside brackets) as ASCII classes.

    outlines-core's Rust regex makes them Unicode-aware (``\d`` matches ``"੩"``), unlike JSON
    Schema's ``pattern`` (ECMA-262: ``\d`` is ``[0-9]``) and the xgrammar backend.
    """
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            letter = pattern[i + 1]
            if letter in _ASCII_SHORTHANDS:
                members = _ASCII_SHORTHANDS[letter]
                out.append(members if in_class else f"[{members}]")
            elif letter.lower() in _ASCII_SHORTHANDS and letter.isupper() and not in_class:
                out.append(f"[^{_ASCII_SHORTHANDS[letter.lower()]}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
        elif not in_class and char == "[":
            start = i + 1
            start += pattern.startswith("^", start)
            start += pattern.startswith("]", start)  # a "]" first in brackets is a literal
            out.append(pattern[i:start])
            i, in_class = start, True
        else:
            in_class = in_class and char != "]"
            out.append(char)
            i += 1
    return "".join(out)


def spec_to_regex(kind: str, text: str) -> str:
    """The regex whose full matches are the outputs ``(kind, text)`` allows.

    Raises ``ValueError`` (its message names the problem) for a bad schema or EBNF.
    """
    if kind == "json_schema":
        try:
            placeholders: dict[str, str] = {}
            schema = rewrite_bounded_numbers(json.loads(text), placeholders)
            regex = str(build_regex_from_schema(json.dumps(schema), whitespace_pattern=WHITESPACE_PATTERN))
        except Exception as exc:  # outlines-core raises ValueError, or TypeError on odd input
            raise ValueError(f"invalid JSON schema: {exc}") from exc
        return ascii_shorthands(fill_placeholders(regex, placeholders))
    if kind == "json_object":
        return JSON_OBJECT_REGEX
    if kind == "regex":
        return ascii_shorthands(strip_anchors(text))
    if kind == "choice":
        return "|".join(re.escape(choice) for choice in json.loads(text))
    if kind == "grammar":
        raise ValueError(EBNF_ERROR)
    raise ValueError(f"unknown response format kind {kind!r}")


def build_index(kind: str, text: str, vocabulary: outlines_core.Vocabulary) -> outlines_core.Index:
    """Build the index of ``(kind, text)`` over ``vocabulary`` (seconds for big vocabularies).

    Raises ``ValueError`` with a message fit for the user.
    """
    regex = spec_to_regex(kind, text)
    try:
        return outlines_core.Index(regex, vocabulary)
    except Exception as exc:
        detail = str(exc)
        if "incompatible" in detail:
            raise ValueError(f"the tokenizer's vocabulary cannot spell this {kind}: {detail}") from exc
        if kind == "regex":
            try:  # Python's parser explains syntax errors better than "error building NFA"
                re.compile(regex)
            except re.error as py_exc:
                detail = str(py_exc)
            raise ValueError(f"invalid regex {text!r}: {detail}") from exc
        raise ValueError(f"cannot build the {kind} index: {detail}") from exc
