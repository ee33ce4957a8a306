"""Constrained decoding end to end on a tiny random model: outputs always validate.

A random model never produces JSON unaided, so every valid output here is the grammar's doing.
Outputs cut at ``max_tokens`` are checked too: each must be a prefix of some valid output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvloom import LLM, Completion, SamplingParams
from kvloom.errors import GrammarError, InvalidRequestError
from kvloom.structured import LogitsProcessor
from tests.structured.grammar_helpers import assert_valid, assert_valid_or_prefix, assert_valid_prefix
from tests.structured.schemas import CHOICES, REGEXES, SCHEMAS, Person

BACKENDS = ("xgrammar", "outlines")
PROMPTS = ["Give me JSON:", "The answer is", "hello world", "def f(x):"]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> Iterator[LLM]:
    engine = LLM(llama_dir, max_model_len=512)
    yield engine
    engine.close()


def _sampled(backend: str, fmt: object, seed: int, **kw: object) -> SamplingParams:
    settings: dict[str, object] = {"temperature": 1.0, "max_tokens": 160} | kw
    return SamplingParams(seed=seed, response_format=fmt, grammar_backend=backend, **settings)  # type: ignore[arg-type]


def halfway(params: list[SamplingParams], results: list[Completion]) -> list[SamplingParams]:
    """The same requests stopped at half the tokens each produced: cut mid-output ("length")."""
    return [p.model_copy(update={"max_tokens": max(1, len(c.token_ids) // 2)})
            for p, c in zip(params, results, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_json_schema_output_that_stops_validates(llm: LLM, backend: str) -> None:
    names = list(SCHEMAS)
    prompts, params = [], []
    for i, name in enumerate(names):
        for seed in range(3):
            prompts.append(PROMPTS[(i + seed) % len(PROMPTS)])
            params.append(_sampled(backend, SCHEMAS[name], seed=100 * i + seed))
    results = llm.generate(prompts, params)
    request_schemas = [name for name in names for _ in range(3)]
    stopped = 0
    for name, completion in zip(request_schemas, results, strict=True):
        assert completion.finish_reason in ("stop", "length")
        stopped += completion.finish_reason == "stop"
        # Whole outputs validate (jsonschema); outputs cut at max_tokens are a prefix of a valid one.
        assert_valid_or_prefix(completion.text, completion.finish_reason, SCHEMAS[name])
        if name == "pydantic_person" and completion.finish_reason == "stop":
            Person.model_validate_json(completion.text)
    assert stopped >= 0.8 * len(results), f"only {stopped}/{len(results)} outputs completed"
    # Nearly every output above stops: cut the same requests halfway through, mid-document, so
    # that outputs ending at max_tokens are checked on every schema (a prefix of a valid document).
    cut = llm.generate(prompts, halfway(params, results))
    for name, completion, full in zip(request_schemas, cut, results, strict=True):
        assert completion.finish_reason == ("length" if len(full.token_ids) > 1 else full.finish_reason)
        assert_valid_or_prefix(completion.text, completion.finish_reason, SCHEMAS[name])
    llm.core.assert_idle()


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_and_choice_outputs_match(llm: LLM, backend: str) -> None:
    fmts: list[object] = [{"type": "regex", "regex": r} for r in REGEXES] + [{"type": "choice", "choice": CHOICES}]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(fmts) * 2)]
    params = [_sampled(backend, fmts[i // 2], seed=i) for i in range(len(fmts) * 2)]
    results = llm.generate(prompts, params)
    for i, completion in enumerate(results):
        assert completion.finish_reason == "stop", completion
        assert_valid(completion.text, fmts[i // 2])  # re.fullmatch, or one of the choices
    # The same requests cut halfway: a partial match of the regex, the start of a choice.
    for i, completion in enumerate(llm.generate(prompts, halfway(params, results))):
        assert_valid_or_prefix(completion.text, completion.finish_reason, fmts[i // 2])


def test_pydantic_model_as_response_format_and_json_object(llm: LLM) -> None:
    out = llm.generate(PROMPTS[:2], [_sampled("xgrammar", Person, seed=3), _sampled("xgrammar", {"type": "json_object"}, seed=4, max_tokens=300)])
    assert out[0].finish_reason == "stop"
    assert_valid(out[0].text, Person)  # Person.model_validate_json too
    assert_valid_or_prefix(out[1].text, out[1].finish_reason, {"type": "json_object"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_come_out_in_the_schema_order(llm: LLM, backend: str) -> None:
    """Not alphabetical: a model told to write "reasoning" before "answer" must be let to."""
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha", "mid"],
              "properties": {"zeta": {"type": "integer"}, "alpha": {"enum": ["a", "b"]}, "mid": {"type": "boolean"}}}
    outs = llm.generate(PROMPTS, [_sampled(backend, schema, seed=i) for i in range(len(PROMPTS))])
    for o in outs:  # a prefix in another order would fail here: the schema's grammar fixes the order
        assert_valid_or_prefix(o.text, o.finish_reason, schema)
    done = [json.loads(o.text) for o in outs if o.finish_reason == "stop"]
    assert done, "no output completed"
    assert all(list(obj) == ["zeta", "alpha", "mid"] for obj in done), done


def test_unconstrained_greedy_outputs_are_unchanged_by_constrained_neighbours(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [c.token_ids for c in llm.generate(PROMPTS, greedy)]
    mixed_prompts: list[str] = []
    mixed_params: list[SamplingParams] = []
    for i, prompt in enumerate(PROMPTS):
        mixed_prompts += [prompt, prompt]
        mixed_params += [greedy, _sampled(BACKENDS[i % 2], SCHEMAS["nested_object"], seed=i)]
    mixed = llm.generate(mixed_prompts, mixed_params)
    assert [c.token_ids for c in mixed[::2]] == alone
    for c in mixed[1::2]:  # and the constrained neighbours stay constrained
        assert_valid_or_prefix(c.text, c.finish_reason, SCHEMAS["nested_object"])


def test_grammar_state_survives_preemption(llama_dir: Path) -> None:
    """A pool too small for the batch forces preemption by recompute; seeded constrained
    outputs must equal the same requests run one at a time."""
    roomy = LLM(llama_dir, max_model_len=512)
    tight = LLM(llama_dir, max_model_len=512, num_kv_blocks=14, block_size=16)
    try:
        params = [_sampled(BACKENDS[i % 2], SCHEMAS["refs"], seed=i, max_tokens=64) for i in range(6)]
        prompts = [PROMPTS[i % len(PROMPTS)] * 3 for i in range(6)]
        batched = tight.generate(prompts, params)
        assert tight.core.num_preemptions > 0
        for prompt, p, got in zip(prompts, params, batched, strict=True):
            assert roomy.generate([prompt], p)[0].token_ids == got.token_ids
            assert_valid_or_prefix(got.text, got.finish_reason, SCHEMAS["refs"])
        tight.core.assert_idle()
    finally:
        roomy.close()
        tight.close()


def test_n_choices_stop_strings_and_max_tokens(llm: LLM) -> None:
    many = llm.generate(["x"], _sampled("xgrammar", SCHEMAS["enums"], seed=5, n=4))[0]
    assert len(many.choices) == 4
    for choice in many.choices:
        assert choice.finish_reason == "stop"
        assert_valid(choice.text, SCHEMAS["enums"])
    truncated = llm.generate(["x"], _sampled("xgrammar", SCHEMAS["pydantic_person"], seed=1, max_tokens=3))[0]
    assert truncated.finish_reason == "length" and len(truncated.token_ids) == 3
    assert_valid_or_prefix(truncated.text, truncated.finish_reason, SCHEMAS["pydantic_person"])
    # A stop string that every output of this schema contains ends the request early.
    cut = llm.generate(["x"], _sampled("outlines", SCHEMAS["flat_object"], seed=2, stop=['"ok"']))[0]
    assert cut.finish_reason == "stop" and '"ok"' not in cut.text
    assert re.match(r'\{\s?"id"\s?:', cut.text), cut.text
    assert_valid_prefix(cut.text, SCHEMAS["flat_object"])  # "stop" here is the stop string: a cut document


class BanTokens(LogitsProcessor):
    """A user-written processor: these tokens may never be sampled."""

    def __init__(self, banned: list[int]) -> None:
        self.banned = banned
        self.seen: list[int] = []

    def process_logits(self, logits: torch.Tensor) -> None:
        logits[self.banned] = float("-inf")

    def accept_token(self, token_id: int) -> bool:
        self.seen.append(token_id)
        return token_id not in self.banned


def test_user_logits_processor_alongside_a_grammar(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    free = llm.generate([PROMPTS[0]], greedy)[0].token_ids
    banned = sorted(set(free[:4]))
    ban = greedy.model_copy(update={"logits_processors": [lambda: BanTokens(banned)]})
    # The grammar's request also bans a token its output would otherwise use.
    choice = _sampled("xgrammar", {"type": "choice", "choice": ["aa", "bb"]}, seed=0)
    both = choice.model_copy(update={"logits_processors": [lambda: BanTokens(llm.tokenizer.encode("aa"))]})
    out = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[1]], [ban, both, both])
    assert not set(out[0].token_ids) & set(banned)
    assert out[0].token_ids != free
    assert [c.text for c in out[1:]] == ["bb", "bb"]


def test_bad_formats_are_refused_before_anything_is_queued(llm: LLM) -> None:
    with pytest.raises(GrammarError, match="response_format"):
        llm.generate(["x", "y"], [_sampled("xgrammar", SCHEMAS["enums"], 0),
                                  _sampled("xgrammar", {"type": "regex", "regex": "(unclosed"}, 0)])
    with pytest.raises(GrammarError, match="response_format"):
        llm.generate(["x"], _sampled("xgrammar", {"type": "object", "properties": {"a": {"type": "nonsense"}}}, 0))
    with pytest.raises(InvalidRequestError, match=r"(?i)ebnf|xgrammar"):
        llm.generate(["x"], _sampled("outlines", {"type": "grammar", "grammar": 'root ::= "a"'}, 0))
    llm.core.assert_idle()
    # The engine still serves.
    ok = llm.generate(["x"], _sampled("xgrammar", {"type": "grammar", "grammar": 'root ::= "ab" | "cd"'}, 0))[0]
    assert ok.text in ("ab", "cd")
