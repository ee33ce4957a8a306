"""Regexes for bounded JSON integers and numbers, which outlines-core's schema converter ignores.

outlines-core turns ``{"type": "integer", "minimum": 0, "maximum": 120}`` into ``-?(0|[1-9][0-9]*)``,
so a constrained model can write ``4025``. :func:`rewrite_bounded_numbers` swaps every bounded
integer/number subschema for a unique string ``const`` placeholder before conversion, and
:func:`fill_placeholders` then replaces the placeholder (rendered as the literal ``"name"``) by
the exact range regex.

Languages (canonical JSON, no leading zeros, no exponent):

- integer in ``[lo, hi]``: exactly the integers in range;
- number in ``[lo, hi]``: the integers in range, and ``k.ddd`` (``ddd`` not ending in 0) for
  integers ``k`` such that the whole open interval ``(k, k + 1)`` (or ``(-k - 1, -k)`` for
  ``-k.ddd``) lies in range. A subset of the valid numbers (``0.7`` for ``minimum: 0.5`` is left
  out) but never an invalid one.

Standard library only: the outlines process-pool workers import this module.
"""

from __future__ import annotations

import math
from typing import Any

_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not subschemas
_FRACTION = r"\.[0-9]*[1-9]"  # a non-zero fraction without trailing zeros: k.ddd is never k


def _digit_class(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives matching the digit strings of ``lo``'s length in ``[lo, hi]`` (``lo <= hi``)."""
    if lo == hi:
        return [lo]
    common = 0
    while lo[common] == hi[common]:
        common += 1
    prefix, lo, hi = lo[:common], lo[common:], hi[common:]
    rest = len(lo) - 1
    if rest == 0:
        return [prefix + _digit_class(int(lo), int(hi))]
    zeros, nines = "0" * rest, "9" * rest
    out: list[str] = []
    first_full, last_full = int(lo[0]), int(hi[0])
    if lo[1:] != zeros:  # lo[0] followed by lo[1:]..99
        out += [prefix + lo[0] + tail for tail in _same_length(lo[1:], nines)]
        first_full += 1
    if hi[1:] != nines:
        last_full -= 1
    if first_full <= last_full:
        out.append(f"{prefix}{_digit_class(first_full, last_full)}[0-9]{{{rest}}}")
    if hi[1:] != nines:  # hi[0] followed by 00..hi[1:]
        out += [prefix + hi[0] + tail for tail in _same_length(zeros, hi[1:])]
    return out


def _magnitudes(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching the canonical decimals of ``lo <= n <= hi`` (``0 <= lo``; ``hi`` None = no bound)."""
    out: list[str] = []
    top = hi if hi is not None else 10 ** len(str(lo)) - 1
    for num_digits in range(len(str(lo)), len(str(top)) + 1):
        start = max(lo, 10 ** (num_digits - 1) if num_digits > 1 else 0)
        end = min(top, 10**num_digits - 1)
        if start <= end:
            out += _same_length(str(start), str(end))
    if hi is None:  # every number with more digits
        out.append(f"[1-9][0-9]{{{len(str(lo))},}}")
    return out


def integer_regex(lo: int | None, hi: int | None, suffix: str = "") -> str | None:
    """A regex for the integers in ``[lo, hi]`` (None = unbounded), each followed by ``suffix``.

    None if the range is empty. ``-0`` is never produced.
    """
    if lo is not None and hi is not None and lo > hi:
        return None
    parts: list[str] = []
    if hi is None or hi >= 0:  # the non-negative side
        parts += [p + suffix for p in _magnitudes(max(lo, 0) if lo is not None else 0, hi)]
    if lo is None or lo < 0:  # the negative side: -m for m in [max(1, -hi), -lo]
        low_mag = max(1, -hi) if hi is not None else 1
        parts += ["-" + p + suffix for p in _magnitudes(low_mag, -lo if lo is not None else None)]
    return "(" + "|".join(parts) + ")" if parts else None


def _number(schema: dict[str, Any], key: str) -> float | None:
    value = schema.get(key)
    if value is None or (key.startswith("exclusive") and isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return value


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """``(lo, lo_exclusive, hi, hi_exclusive)`` from draft-4 (boolean) or draft-6+ (numeric) keywords."""
    lo, hi = _number(schema, "minimum"), _number(schema, "maximum")
    ex_lo, ex_hi = _number(schema, "exclusiveMinimum"), _number(schema, "exclusiveMaximum")
    lo_excl = schema.get("exclusiveMinimum") is True and lo is not None
    hi_excl = schema.get("exclusiveMaximum") is True and hi is not None
    if ex_lo is not None and (lo is None or ex_lo >= lo):
        lo, lo_excl = ex_lo, True
    if ex_hi is not None and (hi is None or ex_hi <= hi):
        hi, hi_excl = ex_hi, True
    return lo, lo_excl, hi, hi_excl


def bounded_regex(schema: dict[str, Any]) -> str:
    """The regex for an ``integer``/``number`` schema with bounds; ``ValueError`` if none can match."""
    lo, lo_excl, hi, hi_excl = _bounds(schema)
    # The integers in range.
    int_lo = None if lo is None else (math.floor(lo) + 1 if lo_excl else math.ceil(lo))
    int_hi = None if hi is None else (math.ceil(hi) - 1 if hi_excl else math.floor(hi))
    parts = [integer_regex(int_lo, int_hi)]
    if schema.get("type") == "number":
        # k.ddd lies in (k, k + 1): in range iff lo <= k and k + 1 <= hi (exclusive or not).
        frac_lo = 0 if lo is None else max(0, math.ceil(lo))
        frac_hi = None if hi is None else math.floor(hi) - 1
        parts.append(integer_regex(frac_lo, frac_hi, _FRACTION))
        # -k.ddd lies in (-k - 1, -k): in range iff lo <= -k - 1 and -k <= hi.
        neg_lo = 0 if hi is None else max(0, math.ceil(-hi))
        neg_hi = None if lo is None else math.floor(-lo) - 1
        magnitudes = integer_regex(neg_lo, neg_hi, _FRACTION)
        parts.append(None if magnitudes is None else "-" + magnitudes)
    alternatives = [p for p in parts if p is not None]
    if not alternatives:
        raise ValueError(f"no {schema.get('type')} satisfies the bounds of {schema}")
    return "(" + "|".join(alternatives) + ")"


def _is_bounded_number(node: dict[str, Any]) -> bool:
    keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    return node.get("type") in ("integer", "number") and any(k in node for k in keys) and not (
        "enum" in node or "const" in node
    )


def rewrite_bounded_numbers(schema: Any, placeholders: dict[str, str]) -> Any:
    """A copy of ``schema`` whose bounded integer/number subschemas are string ``const`` placeholders.

    Adds ``placeholder -> range regex`` to ``placeholders``. Raises ``ValueError`` for bounds no
    value satisfies.
    """
    if isinstance(schema, list):
        return [rewrite_bounded_numbers(item, placeholders) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if _is_bounded_number(schema):
        name = f"KVLOOMBOUNDED{len(placeholders)}X"
        placeholders[name] = bounded_regex(schema)
        return {"const": name}
    return {key: value if key in _DATA_KEYWORDS else rewrite_bounded_numbers(value, placeholders)
            for key, value in schema.items()}


def fill_placeholders(regex: str, placeholders: dict[str, str]) -> str:
    """Replace each ``"placeholder"`` literal in ``regex`` by its range regex."""
    for name, replacement in placeholders.items():
        regex = regex.replace(f'"{name}"', replacement)
    return regex
