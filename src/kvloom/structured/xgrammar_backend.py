"""The xgrammar backend: JSON schema, JSON object, regex, choice and EBNF grammars.

Compiling runs in the compiler's thread pool (xgrammar's C++ compiler); matching runs on the
engine thread, one :class:`XGrammarProcessor` per sequence.

Output format of JSON grammars: at most one whitespace character (space, tab or newline) between
JSON tokens, and none before or after the document: ``{"a": 1, "b": [1, 2]}`` as ``json.dumps``
writes it and most models were trained on, or compact ``{"a":1}``, the same text the outlines backend
allows. Forcing compact JSON pushed a model that writes ``", "`` off its distribution (the trained demo
model wrote garbage into 20% of its constrained extractions, 3% unconstrained); unbounded whitespace
(xgrammar's default) would let a weak (or random) model emit whitespace forever and never close the
object. JSON schemas compile in xgrammar's
strict mode: no properties or items the schema does not name (as if ``additionalProperties``
and ``unevaluatedItems`` were false). Every output still validates against the schema; the
language is a subset of what the schema accepts, which keeps models from inventing keys.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, ClassVar

from kvloom.structured.bitmask import fill_row_from_token_ids
from kvloom.structured.logits_processor import LogitsProcessor
from kvloom.structured.spec import GrammarSpec
from kvloom.structured.vocab import TokenizerVocab

if TYPE_CHECKING:
    import torch
    import xgrammar

WHITESPACE_LIMIT = 1
"""Whitespace characters allowed between JSON tokens (xgrammar's ``max_whitespace_cnt``)."""
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'  # xgrammar's character class for length-bounded strings
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'  # ... and for other JSON strings
_SAFE_STRING_CHAR = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'
_CPP_LOCATION = re.compile(r"\[[0-9:]+\]\s*\S+\.(?:cc|h):\d+:\s*")
_MAX_DETAIL_CHARS = 400


def _error_detail(exc: BaseException) -> str:
    """xgrammar's message without its C++ log prefix (``[12:00:00] /project/cpp/x.cc:83: ``)."""
    text = _CPP_LOCATION.sub("", str(exc)).strip()
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "..."


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF whose language is exactly ``choices``: ``root ::= "a" | "b"``.

    JSON string escaping is xgrammar's EBNF literal syntax (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX``);
    non-ASCII characters stay literal (UTF-8), which avoids surrogate pairs for emoji.
    """
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def make_tokenizer_info(vocab: TokenizerVocab) -> xgrammar.TokenizerInfo:
    """xgrammar's view of ``vocab``: a RAW (already decoded) vocabulary of ``vocab_width`` tokens.

    ``None`` entries become ``b""``, which xgrammar classifies as special tokens: never allowed by
    a grammar, like the padding ids past the tokenizer that it also marks special.
    """
    import xgrammar

    encoded = [b if b is not None else b"" for b in vocab.token_bytes]
    return xgrammar.TokenizerInfo(
        encoded, xgrammar.VocabType.RAW, vocab_size=vocab.vocab_width, stop_token_ids=list(vocab.eos_token_ids)
    )


class XGrammarCompiled:
    """One compiled grammar; hands out a fresh matcher per sequence. Immutable, shareable."""

    def __init__(self, spec: GrammarSpec, compiled: xgrammar.CompiledGrammar, vocab: TokenizerVocab) -> None:
        self.spec = spec
        self.backend = "xgrammar"
        self._compiled = compiled
        self._vocab_width = vocab.vocab_width
        self._eos_token_ids = vocab.eos_token_ids

    def new_processor(self) -> LogitsProcessor:
        """A processor at the start of the grammar (its own matcher state)."""
        import xgrammar

        return XGrammarProcessor(xgrammar.GrammarMatcher(self._compiled), self._eos_token_ids, self._vocab_width)


class XGrammarBackend:
    """Compiles specs against one vocabulary. Thread-safe (xgrammar's compiler is)."""

    def __init__(self, vocab: TokenizerVocab, max_threads: int = 1) -> None:
        import xgrammar

        self.vocab = vocab
        # kvloom caches compiled grammars itself (LRU); a second, unbounded cache would pin memory.
        self._compiler = xgrammar.GrammarCompiler(
            make_tokenizer_info(vocab), max_threads=max_threads, cache_enabled=False
        )

    def compile(self, spec: GrammarSpec) -> XGrammarCompiled:
        """Compile ``spec``; raises ``ValueError`` whose message says what is wrong with it."""
        what = {"json_schema": "invalid JSON schema", "json_object": "cannot build the JSON object grammar",
                "regex": "invalid regex", "choice": "invalid choice list", "grammar": "invalid EBNF grammar",
                "structural_tag": "invalid tool-call structural tag"}[spec.kind]
        try:
            compiled = self._compile(spec)
        except Exception as exc:  # xgrammar raises RuntimeError for every kind of bad input
            raise ValueError(f"{what}: {_error_detail(exc)}") from exc
        return XGrammarCompiled(spec, compiled, self.vocab)

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        c = self._compiler
        if spec.kind == "json_schema":
            return self._compile_json_schema(spec.text)
        if spec.kind == "json_object":
            # A schema rather than the builtin JSON grammar: the builtin one allows any JSON value
            # and unbounded whitespace. Non-strict, so the object may hold any keys.
            return c.compile_json_schema('{"type": "object"}', any_whitespace=True,
                                         max_whitespace_cnt=WHITESPACE_LIMIT, strict_mode=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.text)
        if spec.kind == "choice":
            return c.compile_grammar(choice_ebnf(json.loads(spec.text)))
        if spec.kind == "structural_tag":
            import xgrammar

            return c.compile_grammar(_safe_strings(str(xgrammar.Grammar.from_structural_tag(spec.text))))
        return c.compile_grammar(spec.text)

    def _compile_json_schema(self, schema: str) -> xgrammar.CompiledGrammar:
        import xgrammar

        grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=True, max_whitespace_cnt=WHITESPACE_LIMIT,
                                                    strict_mode=True)
        return self._compiler.compile_grammar(_safe_strings(str(grammar)))


def _safe_strings(ebnf: str) -> str:
    """JSON string characters that decode as what the grammar counted. xgrammar lets
    length-bounded strings hold raw control characters (JSON forbids them: ``json.loads``
    raises), and every string hold UTF-8-encoded surrogates (``ED A0 80``), which it counts as
    one character but which decode as three U+FFFD, so ``maxLength`` fails after decoding.
    Exclude both everywhere."""
    return ebnf.replace(_BOUNDED_STRING_CHAR, _SAFE_STRING_CHAR).replace(_JSON_STRING_CHAR, _SAFE_STRING_CHAR)


class XGrammarProcessor(LogitsProcessor):
    """One sequence's grammar state: an xgrammar ``GrammarMatcher``.

    Terminates when the grammar is complete and an EOS id was accepted (EOS is allowed only
    then). Rollback is unlimited (xgrammar >= 0.2 keeps the whole history).
    """

    uses_bitmask: ClassVar[bool] = True

    def __init__(self, matcher: xgrammar.GrammarMatcher, eos_token_ids: tuple[int, ...], vocab_width: int) -> None:
        self._matcher = matcher
        self._eos_token_ids = eos_token_ids
        # The bits of the last word that name ids < vocab_width (-1, all of them, when V % 32 == 0).
        self._tail_keep = (1 << (vocab_width % 32)) - 1 if vocab_width % 32 else -1

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Overwrite ``bitmask[row]`` (``int32``, ``ceil(V / 32)`` words, CPU) with the allowed tokens.

        Ids past the tokenizer (padding) and the bits past ``V`` end up 0.
        """
        if self._matcher.is_terminated():  # never asked in practice; allow only EOS rather than nothing
            fill_row_from_token_ids(bitmask[row], list(self._eos_token_ids))
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._tail_keep != -1:  # xgrammar leaves the bits past V as it found them in some states
            bitmask[row, -1] &= self._tail_keep

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

