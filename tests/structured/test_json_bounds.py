"""Range regexes for bounded JSON numbers (the outlines backend's fix for minimum/maximum)."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from kvloom.structured.json_bounds import (
    bounded_regex,
    fill_placeholders,
    integer_regex,
    rewrite_bounded_numbers,
)

INT_BOUNDS: list[int | None] = [None, -1000, -101, -100, -99, -10, -9, -1, 0, 1, 5, 9, 10, 42, 99, 100, 101, 999, 1000]
NUMBER_BOUNDS: list[float | None] = [None, -10, -2.5, -1, 0, 0.5, 1, 2, 2.5, 10]
NUMBER_TEXTS = sorted(
    {str(v) for v in range(-30, 31)}
    | {f"{a}.{b}" for a in range(-12, 13) for b in ("5", "05", "25", "0", "50", "999")}
    | {"-0.5", "-0.25", "0.0", "1e3", "-0"}
)


def test_integer_ranges_match_exactly() -> None:
    values = range(-1200, 1201)
    for lo, hi in itertools.product(INT_BOUNDS, INT_BOUNDS):
        regex = integer_regex(lo, hi)
        expected = [v for v in values if (lo is None or v >= lo) and (hi is None or v <= hi)]
        if regex is None:
            assert not expected, (lo, hi)
            continue
        pattern = re.compile(regex)
        assert [v for v in values if pattern.fullmatch(str(v))] == expected, (lo, hi, regex)
        assert not any(pattern.fullmatch(s) for s in ("-0", "007", "01", "+1", "1.0")), (lo, hi)


@pytest.mark.parametrize(("lo_key", "hi_key"), list(itertools.product(
    ["minimum", "exclusiveMinimum"], ["maximum", "exclusiveMaximum"])))
def test_bounded_numbers_only_match_values_in_range(lo_key: str, hi_key: str) -> None:
    for lo, hi in itertools.product(NUMBER_BOUNDS, NUMBER_BOUNDS):
        schema: dict[str, object] = {"type": "number"}
        if lo is not None:
            schema[lo_key] = lo
        if hi is not None:
            schema[hi_key] = hi
        if len(schema) == 1:
            continue
        try:
            pattern = re.compile(bounded_regex(schema))
        except ValueError:
            assert lo is not None and hi is not None and lo >= hi - 1  # only (near-)empty ranges fail
            continue
        matched = [s for s in NUMBER_TEXTS if pattern.fullmatch(s)]
        for text in matched:
            value = float(text)
            assert lo is None or (value > lo if lo_key.startswith("exclusive") else value >= lo), (schema, text)
            assert hi is None or (value < hi if hi_key.startswith("exclusive") else value <= hi), (schema, text)
            assert "." not in text or not text.endswith("0"), text  # canonical fractions
        if lo is not None and hi is not None and hi - lo >= 2:
            assert any("." in text for text in matched), schema  # fractions are reachable


def test_draft4_boolean_exclusive_bounds() -> None:
    pattern = re.compile(bounded_regex({"type": "integer", "minimum": 0, "exclusiveMinimum": True,
                                        "maximum": 5, "exclusiveMaximum": True}))
    assert [v for v in range(-3, 9) if pattern.fullmatch(str(v))] == [1, 2, 3, 4]


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 5, "maximum": 4},
    {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
    {"type": "integer", "minimum": "3"},
    {"type": "number", "maximum": float("inf")},
])
def test_impossible_or_malformed_bounds_are_refused(schema: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        bounded_regex(schema)


def test_rewrite_replaces_bounded_subschemas_everywhere() -> None:
    schema = {
        "$defs": {"pct": {"type": "integer", "minimum": 0, "maximum": 100}},
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/pct"},
            "b": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
            "c": {"type": "integer"},  # unbounded: left to outlines-core
            "d": {"enum": [{"type": "integer", "minimum": 0}]},  # data, not a schema
            "e": {"type": "integer", "minimum": 0, "maximum": 3, "enum": [1, 2]},  # enum already exact
        },
    }
    placeholders: dict[str, str] = {}
    rewritten = rewrite_bounded_numbers(schema, placeholders)
    assert len(placeholders) == 2
    assert rewritten["$defs"]["pct"] == {"const": next(iter(placeholders))}
    assert rewritten["properties"]["c"] == {"type": "integer"}
    assert rewritten["properties"]["d"] == schema["properties"]["d"]  # type: ignore[index]
    assert rewritten["properties"]["e"] == schema["properties"]["e"]  # type: ignore[index]
    regex = fill_placeholders(json.dumps(rewritten), placeholders)
    assert all(name not in regex for name in placeholders)
