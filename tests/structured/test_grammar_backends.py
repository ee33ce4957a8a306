"""Both grammar backends, driven like the runner drives them by a seeded random "model".

A random walk over the allowed tokens produces text no model would write; every walk that
ends must still parse and validate (jsonschema, ``re.fullmatch``, the choice list).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch

from kvloom.errors import GrammarError
from kvloom.structured.bitmask import allocate_bitmask, unpack_bitmask
from kvloom.structured.compiler import CompiledGrammar, GrammarCompiler
from kvloom.structured.spec import GrammarSpec, ResponseFormat
from kvloom.structured.vocab import TokenizerVocab
from tests.structured.conftest import TINY_EOS_IDS
from tests.structured.grammar_helpers import allowed_tokens, random_walk
from tests.structured.schemas import CHOICES, REGEXES, SCHEMAS

BACKENDS = ("xgrammar", "outlines")
WALKS_PER_SCHEMA = 6

EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {
    "bounded_floats": {
        "type": "object",
        "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1},
                       "t": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 2}},
        "required": ["p", "t"],
        "additionalProperties": False,
    },
    "strings_booleans_nulls": {
        "type": "object",
        "properties": {
            "s": {"type": "string", "minLength": 2, "maxLength": 4},
            "b": {"type": "boolean"},
            "n": {"type": "null"},
            "maybe": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
        },
        "required": ["s", "b", "n", "maybe"],
        "additionalProperties": False,
    },
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 3},
                  "minItems": 0, "maxItems": 2},
        "minItems": 1,
        "maxItems": 3,
    },
    "const_and_date": {
        "type": "object",
        "properties": {"version": {"const": "v1"}, "day": {"type": "string", "format": "date"}},
        "required": ["version", "day"],
        "additionalProperties": False,
    },
}
ALL_SCHEMAS = {**SCHEMAS, **EXTRA_SCHEMAS}
ALL_REGEXES = [*REGEXES, r"^(ab|cd)+$", r"[0-9]{1,3}(\.[0-9]{1,2})?", r"\(\d{3}\) \d{3}-\d{4}", r"(true|false|maybe\?)"]
TRICKY_CHOICES = ['say "hi"', "back\\slash", "a.b*c", "(x|y)", "naïve ✓", "two words", "tab\there"]


@pytest.fixture(scope="module")
def compiler(tiny_vocab: TokenizerVocab) -> Iterator[GrammarCompiler]:
    with GrammarCompiler(tiny_vocab) as c:
        yield c


def compiled(compiler: GrammarCompiler, fmt: object, backend: str) -> CompiledGrammar:
    return compiler.submit(ResponseFormat.coerce(fmt).to_spec(), backend).result(timeout=120)


def closing_tokens(vocab: TokenizerVocab) -> frozenset[int]:
    """Tokens that close strings, objects and arrays: a walk that prefers them ends quickly."""
    return frozenset(i for i, b in enumerate(vocab.token_bytes) if b is not None and b in (b'"', b"}", b"]", b"1"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_json_schema_walk_that_ends_validates(
    compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str
) -> None:
    futures = {name: compiler.submit(ResponseFormat.coerce(s).to_spec(), backend) for name, s in ALL_SCHEMAS.items()}
    rng = random.Random(1234)
    ended = total = 0
    for name, future in futures.items():
        grammar = future.result(timeout=120)
        for _ in range(WALKS_PER_SCHEMA):
            total += 1
            text = random_walk(grammar.new_processor(), tiny_vocab, rng)
            if text is None:
                continue
            ended += 1
            value = json.loads(text)  # strict: raw control characters in strings fail here
            jsonschema.validate(value, ALL_SCHEMAS[name])
            if name in ("flat_object", "bounded_numbers", "refs", "nested_arrays"):  # no strings inside
                # one whitespace character per gap at most; two gaps meet only inside [] or {}
                assert not re.search(rb"[ \t\r\n]{3}", text) and text[:1] in b"{[", f"padded JSON: {text!r}"
    assert ended >= 0.9 * total, f"only {ended}/{total} walks ended"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_regex_walk_that_ends_matches(compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str) -> None:
    rng = random.Random(99)
    ended = total = 0
    for pattern in ALL_REGEXES:
        grammar = compiled(compiler, {"type": "regex", "regex": pattern}, backend)
        for _ in range(WALKS_PER_SCHEMA):
            total += 1
            text = random_walk(grammar.new_processor(), tiny_vocab, rng)
            if text is not None:
                ended += 1
                assert re.fullmatch(pattern, text.decode("utf-8")), (pattern, text)
    assert ended >= 0.9 * total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("choices", [CHOICES, TRICKY_CHOICES])
def test_choice_walks_end_in_one_of_the_choices(
    compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str, choices: list[str]
) -> None:
    grammar = compiled(compiler, {"type": "choice", "choice": choices}, backend)
    rng = random.Random(5)
    seen = set()
    for _ in range(40):
        text = random_walk(grammar.new_processor(), tiny_vocab, rng, eos_bias=0.9)
        assert text is not None
        assert text.decode("utf-8") in choices
        seen.add(text.decode("utf-8"))
    assert len(seen) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object_walks_are_json_objects(compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str) -> None:
    grammar = compiled(compiler, {"type": "json_object"}, backend)
    rng = random.Random(7)
    ended = 0
    for _ in range(10):
        text = random_walk(grammar.new_processor(), tiny_vocab, rng, prefer=closing_tokens(tiny_vocab),
                           prefer_bias=0.6)
        if text is not None:
            ended += 1
            assert isinstance(json.loads(text), dict)
    assert ended >= 8


def test_ebnf_grammar_on_xgrammar(compiler: GrammarCompiler, tiny_vocab: TokenizerVocab) -> None:
    ebnf = 'root ::= "(" item ("," item)* ")" | "none"\nitem ::= [a-c]+ | "x"'
    grammar = compiled(compiler, {"type": "grammar", "grammar": ebnf}, "xgrammar")
    rng = random.Random(3)
    for _ in range(10):
        text = random_walk(grammar.new_processor(), tiny_vocab, rng, prefer=closing_tokens(tiny_vocab) | frozenset(
            i for i, b in enumerate(tiny_vocab.token_bytes) if b == b")"), prefer_bias=0.3)
        assert text is not None
        assert re.fullmatch(r"\(([a-c]+|x)(,([a-c]+|x))*\)|none", text.decode()), text


@pytest.mark.parametrize(
    ("backend", "fmt", "message"),
    [
        ("xgrammar", {"type": "foo"}, "invalid JSON schema"),
        ("outlines", {"type": "foo"}, "invalid JSON schema"),
        ("xgrammar", {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "invalid JSON schema"),
        ("outlines", {"type": "integer", "minimum": 5, "maximum": 1}, "invalid JSON schema"),
        ("xgrammar", {"type": "regex", "regex": "(ab"}, "invalid regex"),
        ("outlines", {"type": "regex", "regex": "(ab"}, "invalid regex"),
        ("xgrammar", {"type": "grammar", "grammar": "root ::= undefined_rule"}, "invalid EBNF grammar"),
        ("outlines", {"type": "grammar", "grammar": 'root ::= "a"'}, "EBNF grammars need the xgrammar backend"),
        ("nonsense", {"type": "regex", "regex": "a"}, "unknown grammar backend 'nonsense'"),
    ],
)
def test_bad_formats_fail_with_a_clear_grammar_error(
    compiler: GrammarCompiler, backend: str, fmt: object, message: str
) -> None:
    with pytest.raises(GrammarError, match=r"^response_format: ") as info:
        compiler.submit(ResponseFormat.coerce(fmt).to_spec(), backend).result(timeout=120)
    assert message in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_restores_the_mask(compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str) -> None:
    grammar = compiled(compiler, SCHEMAS["pydantic_person"], backend)
    processor = grammar.new_processor()
    rng = random.Random(11)
    masks = [allowed_tokens(processor, tiny_vocab.vocab_width)]
    for _ in range(20):
        token = rng.choice([t for t in masks[-1] if t not in TINY_EOS_IDS])
        assert processor.accept_token(token)
        masks.append(allowed_tokens(processor, tiny_vocab.vocab_width))
    for back in (1, 5, 14):
        processor.rollback(back)
        masks = masks[: len(masks) - back]
        assert allowed_tokens(processor, tiny_vocab.vocab_width) == masks[-1]
    processor.rollback(0)
    assert allowed_tokens(processor, tiny_vocab.vocab_width) == masks[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_of_the_eos_un_terminates(compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str) -> None:
    processor = compiled(compiler, {"type": "choice", "choice": ["yes", "no"]}, backend).new_processor()
    for token in (tiny_vocab.token_bytes.index(b"y"), tiny_vocab.token_bytes.index(b"es")):
        assert processor.accept_token(token)
    before_eos = allowed_tokens(processor, tiny_vocab.vocab_width)
    assert set(TINY_EOS_IDS) <= set(before_eos)  # every EOS id is allowed once the text is complete
    assert processor.accept_token(4) and processor.is_terminated()
    assert not processor.accept_token(tiny_vocab.token_bytes.index(b"y"))  # nothing after the end
    processor.rollback(1)
    assert not processor.is_terminated()
    assert allowed_tokens(processor, tiny_vocab.vocab_width) == before_eos


@pytest.mark.parametrize("backend", BACKENDS)
def test_disallowed_tokens_are_rejected_without_moving(
    compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str
) -> None:
    processor = compiled(compiler, {"type": "regex", "regex": r"ab+"}, backend).new_processor()
    start = allowed_tokens(processor, tiny_vocab.vocab_width)
    assert not processor.accept_token(1)  # EOS before the text is complete
    assert not processor.accept_token(tiny_vocab.token_bytes.index(b"b"))
    assert not processor.accept_token(0)  # a special token (bos)
    assert allowed_tokens(processor, tiny_vocab.vocab_width) == start
    assert not processor.is_terminated()


@pytest.mark.parametrize("backend", BACKENDS)
def test_processors_of_one_grammar_are_independent(
    compiler: GrammarCompiler, tiny_vocab: TokenizerVocab, backend: str
) -> None:
    grammar = compiled(compiler, {"type": "regex", "regex": r"ab+"}, backend)
    first, second = grammar.new_processor(), grammar.new_processor()
    start = allowed_tokens(second, tiny_vocab.vocab_width)
    assert first.accept_token(tiny_vocab.token_bytes.index(b"a"))
    assert allowed_tokens(second, tiny_vocab.vocab_width) == start != allowed_tokens(first, tiny_vocab.vocab_width)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocab_bits_past_the_tokenizer_stay_clear(tiny_tokenizer: Any, backend: str) -> None:
    size = len(tiny_tokenizer)
    width = size + 84  # a padded lm_head; not a multiple of 32 either
    vocab = TokenizerVocab.from_tokenizer(tiny_tokenizer, width, TINY_EOS_IDS)
    rng = random.Random(2)
    with GrammarCompiler(vocab) as padded:
        spec = GrammarSpec("json_schema", json.dumps(SCHEMAS["nested_object"]))
        processor = padded.submit(spec, backend).result(timeout=120).new_processor()
        bitmask = allocate_bitmask(3, width)
        for _ in range(30):
            bitmask.fill_(-1)
            processor.fill_bitmask(bitmask, 1)
            bits = unpack_bitmask(bitmask, 32 * bitmask.shape[1])
            assert not bits[1, size:].any(), "a token past the tokenizer (or past V) is allowed"
            assert bits[0].all() and bits[2].all(), "other rows were touched"
            allowed = bits[1, :size].nonzero().flatten().tolist()
            token = rng.choice([t for t in allowed if t not in TINY_EOS_IDS] or allowed)
            assert processor.accept_token(token)
            if processor.is_terminated():
                break


def test_both_backends_allow_the_same_first_tokens(compiler: GrammarCompiler, tiny_vocab: TokenizerVocab) -> None:
    """Same output format (at most one whitespace character between JSON tokens) whichever backend
    compiled the schema."""
    schema = SCHEMAS["flat_object"]
    masks = [
        torch.tensor(allowed_tokens(compiled(compiler, schema, backend).new_processor(), tiny_vocab.vocab_width))
        for backend in BACKENDS
    ]
    assert torch.equal(masks[0], masks[1])
