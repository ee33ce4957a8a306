"""Drive a grammar processor the way the runner does, with a seeded random "model"; check
an engine output against its response format, whole or cut short."""

from __future__ import annotations

import functools
import json
import random
from typing import Any

import jsonschema
import regex

from kvloom.structured.bitmask import allocate_bitmask, unpack_bitmask
from kvloom.structured.logits_processor import LogitsProcessor
from kvloom.structured.spec import ResponseFormat
from kvloom.structured.vocab import TokenizerVocab


def allowed_tokens(processor: LogitsProcessor, vocab_width: int) -> list[int]:
    """The token ids the processor allows next (fills a poisoned one-row mask first)."""
    bitmask = allocate_bitmask(1, vocab_width)
    bitmask.fill_(0x5A5A5A5A)  # poison: a processor must overwrite the whole row
    processor.fill_bitmask(bitmask, 0)
    ids: list[int] = unpack_bitmask(bitmask, vocab_width)[0].nonzero().flatten().tolist()
    return ids


def random_walk(
    processor: LogitsProcessor, vocab: TokenizerVocab, rng: random.Random, max_steps: int = 300,
    eos_bias: float = 0.5, prefer: frozenset[int] = frozenset(), prefer_bias: float = 0.0,
) -> bytes | None:
    """Sample allowed tokens until the processor terminates; the text's bytes, or None at ``max_steps``.

    Takes an allowed EOS with probability ``eos_bias`` (so that walks end), else an allowed
    token of ``prefer`` with probability ``prefer_bias``, else any allowed token. Checks on
    every step that the mask only allows real (non-special) tokens or EOS, nothing past the
    tokenizer, and that EOS (and only EOS) terminates.
    """
    generated: list[int] = []
    eos_ids = set(vocab.eos_token_ids)
    for _ in range(max_steps):
        allowed = allowed_tokens(processor, vocab.vocab_width)
        assert allowed, "the grammar allows no token at all"
        assert all(t < len(vocab.token_bytes) for t in allowed), "a padded id is allowed"
        assert all(vocab.token_bytes[t] is not None or t in eos_ids for t in allowed), "a special token is allowed"
        eos = [t for t in allowed if t in eos_ids]
        preferred = [t for t in allowed if t in prefer]
        if eos and rng.random() < eos_bias:
            token = rng.choice(eos)
        elif preferred and rng.random() < prefer_bias:
            token = rng.choice(preferred)
        else:
            token = rng.choice(allowed)
        assert processor.accept_token(token), f"an allowed token {token} was rejected"
        if processor.is_terminated():
            assert token in eos_ids, "terminated on a non-EOS token"
            return b"".join(vocab.token_bytes[t] or b"" for t in generated)
        assert token not in eos_ids, "EOS was accepted but the processor did not terminate"
        generated.append(token)
    return None


# ---- checking outputs against their response format ------------------------------------------

def assert_valid_or_prefix(text: str, finish_reason: str | None, response_format: object) -> None:
    r"""An output that ended on its own (``"stop"``) is a whole document of ``response_format``;
    one cut short (``"length"``, ``"abort"``) is a prefix of some whole document.

    ``response_format`` takes every form ``SamplingParams.response_format`` takes. The oracles
    are independent of kvloom's grammar code: ``json.loads``, jsonschema, pydantic, the ``regex``
    package (a dependency of transformers; ``partial=True`` for prefixes, ASCII ``\d``/``\w`` as
    both backends read them) and the choice list; for JSON and EBNF, also an xgrammar matcher
    built here from the schema itself (at most one whitespace character between JSON tokens, no
    property the schema does not name: the output format both backends document), which decides prefixes.
    """
    fmt = ResponseFormat.coerce(response_format)
    if finish_reason == "stop":
        assert_valid(text, fmt)
    else:
        assert finish_reason in ("length", "abort"), f"unexpected finish_reason {finish_reason!r}"
        assert_valid_prefix(text, fmt)


def assert_valid(text: str, response_format: object) -> None:
    """``text`` is a whole document of ``response_format``."""
    fmt = ResponseFormat.coerce(response_format)
    if fmt.type in ("json_schema", "json_object"):
        value = json.loads(text)  # strict: raw control characters in strings fail here
        if fmt.type == "json_object":
            assert isinstance(value, dict), text
        else:
            jsonschema.validate(value, fmt.json_schema)
            if fmt.model is not None:
                fmt.model.model_validate_json(text)
        spec = fmt.to_spec()
        matcher = _matcher(spec.kind, spec.text)
        assert matcher.accept_string(text) and matcher.is_completed(), f"not JSON of the schema in the documented format: {text!r}"
    elif fmt.type == "regex":
        assert fmt.regex is not None and regex.fullmatch(fmt.regex, text, flags=regex.ASCII), (fmt.regex, text)
    elif fmt.type == "choice":
        assert text in (fmt.choice or []), (fmt.choice, text)
    elif fmt.type == "grammar":
        matcher = _matcher("grammar", fmt.grammar or "")
        assert matcher.accept_string(text) and matcher.is_completed(), (fmt.grammar, text)
    else:
        raise NotImplementedError(f"no check for {fmt.type!r} outputs")


def assert_valid_prefix(text: str, response_format: object) -> None:
    """Some whole document of ``response_format`` starts with ``text`` (the empty text included)."""
    fmt = ResponseFormat.coerce(response_format)
    if fmt.type == "regex":
        assert fmt.regex is not None
        assert regex.fullmatch(fmt.regex, text, flags=regex.ASCII, partial=True), (fmt.regex, text)
    elif fmt.type == "choice":
        assert any(c.startswith(text) for c in fmt.choice or []), (fmt.choice, text)
    elif fmt.type in ("json_schema", "json_object", "grammar"):
        spec = fmt.to_spec()
        assert _matcher(spec.kind, spec.text).accept_string(text), f"no {fmt.type} document starts with {text!r}"
    else:
        raise NotImplementedError(f"no check for {fmt.type!r} outputs")


def _matcher(kind: str, text: str) -> Any:
    """A fresh xgrammar matcher at the start of the grammar."""
    import xgrammar

    return xgrammar.GrammarMatcher(_compiled(kind, text))


@functools.cache
def _compiled(kind: str, text: str) -> Any:
    import xgrammar

    # Matching strings needs no vocabulary: an empty one compiles in microseconds.
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), max_threads=1, cache_enabled=False)
    if kind == "grammar":
        return compiler.compile_grammar(text)
    schema = text if kind == "json_schema" else '{"type": "object"}'
    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=True, max_whitespace_cnt=1,
                                                strict_mode=kind == "json_schema")
    return compiler.compile_grammar(grammar)
