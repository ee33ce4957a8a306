"""Fuzzing the public API (issue "Reliability", item 2).

Random sampling params, prompts, token ids, chat messages, response formats, submit keyword
arguments and adapter names/paths go through ``AsyncEngine``. Each call must either produce
output or raise a validation error (``InvalidRequestError`` from the engine, pydantic's
``ValidationError`` from ``SamplingParams``) whose message names the field at fault, and a
rejected call must queue nothing. Never a hang (every call runs under a deadline), a dead
engine (a tiny valid request must still succeed) or a leaked block (``assert_idle`` after
each example).

One engine serves the whole module: it runs on its own asyncio loop in a thread, and each
hypothesis example hands it a coroutine (hypothesis drives synchronous test functions).
CI runs ``CI_EXAMPLES`` examples per test; ``KVLOOM_STRESS=1`` runs ``STRESS_FACTOR`` times more.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvloom import AsyncEngine, InvalidRequestError, SamplingParams
from kvloom.demo import TINY_DEMO_MODEL
from tests.fakes import STRESS, fake_cpu

# ---- settings (one place) ------------------------------------------------------------------
CI_EXAMPLES = 60
STRESS_FACTOR = 10
CALL_TIMEOUT_S = 30.0
"""No single call may take longer: a hang fails the example instead of the whole run."""
MAX_TOKENS = 4
"""Generated lengths are clamped to this, so each example takes milliseconds."""
MAX_N = 3
ALIVE_EVERY = 10
"""A tiny valid request every this many examples proves the engine is not dead."""

FUZZ = settings(
    max_examples=CI_EXAMPLES * (STRESS_FACTOR if STRESS else 1),
    deadline=None,
    derandomize=not STRESS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
    database=None,
)

T = TypeVar("T")


# ---- one engine on its own loop --------------------------------------------------------------
class Harness:
    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.submitted: list[str] = []
        """Request ids the engine loop was handed (its ``submit`` is wrapped): "queued"."""
        self.calls = 0
        self.companions = 0
        self.on_submit: Callable[[], None] | None = None
        """Called once right after the next request is handed to the engine loop."""

    def __repr__(self) -> str:
        return "harness"

    def run(self, fn: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        async def bounded() -> T:
            with anyio.fail_after(CALL_TIMEOUT_S):
                return await fn(self.engine)

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result(CALL_TIMEOUT_S + 10)

    def settle_and_check(self) -> None:
        """Idle with every block free; every ``ALIVE_EVERY`` calls a valid request succeeds too."""
        self.calls += 1

        async def check(engine: AsyncEngine) -> None:
            await engine.wait_idle()  # bounded by run()'s CALL_TIMEOUT_S
            stats = engine.stats()
            assert stats.healthy, f"the engine died: {stats.error}"
            engine.assert_idle()
            if self.calls % ALIVE_EVERY == 0:
                await assert_alive(engine)

        self.run(check)


async def assert_alive(engine: AsyncEngine) -> None:
    out = await engine.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert len(out.choices[0].token_ids) == 2
    await engine.wait_idle()
    engine.assert_idle()


@pytest.fixture(scope="module")
def tiny_dir(checkpoint_factory: Callable[..., Path]) -> Path:
    """The tiny demo model: a trained tokenizer, a (hermes) chat template, 512 token ids."""
    return checkpoint_factory(**TINY_DEMO_MODEL.build_kwargs)


@pytest.fixture(scope="module")
def harness(tiny_dir: Path) -> Iterator[Harness]:
    from kvloom.models.dtype_choice import CpuMatmulSupport

    mp = pytest.MonkeyPatch()  # float32 as the autouse fixture does, for the module's engine
    fake_cpu(mp, CpuMatmulSupport(amx=False, avx512_bf16=False))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = AsyncEngine.from_pretrained(tiny_dir, max_model_len=256, num_kv_blocks=64, max_waiting=64)
    asyncio.run_coroutine_threadsafe(engine.start(), loop).result(120)
    h = Harness(engine, loop)
    assert engine._loop is not None
    inner = engine._loop.submit

    def counting_submit(request: Any) -> Any:
        h.submitted.append(request.request_id)
        result = inner(request)
        hook, h.on_submit = h.on_submit, None
        if hook is not None:
            hook()
        return result

    engine._loop.submit = counting_submit  # type: ignore[method-assign]
    try:
        yield h
        h.run(assert_alive)
    finally:
        asyncio.run_coroutine_threadsafe(engine.aclose(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        mp.undo()


# ---- outcomes ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    text: str | None = None
    error: BaseException | None = None
    queued: bool = False
    """Whether the engine loop was handed the request."""


COMPANION = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


async def attempt(h: Harness, call: Callable[[AsyncEngine], Awaitable[str]]) -> Outcome:
    """Run ``call`` with a valid companion request queued in the same instant (by the wrapped
    ``submit``, with no await in between), so the engine takes both in one step: a bad value
    that passes alone can still break the scheduler's ordering or the batch. The companion must
    get all its tokens whatever ``call`` does (else the test fails)."""
    h.companions += 1
    companion_id = f"companion-{h.companions}"  # longer than any fuzzed request_id
    companion: list[Any] = []
    h.on_submit = lambda: companion.append(h.engine.stream([5, 6, 7], COMPANION, request_id=companion_id))
    outcome = Outcome()
    before = len(h.submitted)
    try:
        outcome.text = await call(h.engine)
    except Exception as exc:  # judged by the caller
        outcome.error = exc
    finally:
        h.on_submit = None
    outcome.queued = any(not rid.startswith("companion-") for rid in h.submitted[before:])
    if not companion:  # the fuzzed request never reached the queue
        companion.append(h.engine.stream([5, 6, 7], COMPANION, request_id=companion_id))
    got = [t async for chunk in companion[0] for t in chunk.token_ids]
    assert len(got) == MAX_TOKENS, f"the companion request got {len(got)} tokens"
    return outcome


def check_outcome(outcome: Outcome, fields: tuple[str, ...], *, may_fail_after_queueing: bool = False) -> None:
    """Output, or an ``InvalidRequestError`` naming one of ``fields``, raised before queueing."""
    exc = outcome.error
    if exc is None:
        assert outcome.text is not None
        return
    if not isinstance(exc, InvalidRequestError):
        raise AssertionError(f"unexpected {type(exc).__name__} (not a validation error): {exc}") from exc
    message = str(exc)
    assert any(f in message for f in fields), f"the message names none of {fields}: {message!r}"
    if not may_fail_after_queueing:
        assert not outcome.queued, f"rejected after it was queued: {message!r}"


def clamp(params: SamplingParams) -> SamplingParams:
    """Keep the fuzzed params, but generate at most ``MAX_TOKENS`` tokens and ``MAX_N`` choices."""
    max_tokens = min(params.max_tokens, MAX_TOKENS)
    return params.model_copy(update={"max_tokens": max_tokens, "min_tokens": min(params.min_tokens, max_tokens),
                                     "n": min(params.n, MAX_N)})


def collect(engine: AsyncEngine, **kwargs: Any) -> Callable[[AsyncEngine], Awaitable[str]]:
    """A call through ``stream`` or ``generate`` (chosen by the arguments), returning the text."""

    async def via_stream(e: AsyncEngine) -> str:
        parts: list[str] = []
        async for chunk in e.stream(**kwargs):
            parts.append(chunk.text)
        return "".join(parts)

    async def via_generate(e: AsyncEngine) -> str:
        completion = await e.generate(**kwargs)
        return "".join(c.text for c in completion.choices)

    return via_stream if len(repr(kwargs)) % 2 == 0 else via_generate


# ---- strategies -----------------------------------------------------------------------------------
HUGE = st.sampled_from([10**30, -(10**30), 2**63, 2**64, -(2**63) - 1])
BAD_NUMBERS = st.one_of(
    HUGE, st.sampled_from([math.nan, math.inf, -math.inf, -1, -1.5, 0, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
)
WRONG_TYPES = st.one_of(
    st.none(), st.text(max_size=5), st.binary(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()),
)


def fuzz_number(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, BAD_NUMBERS, WRONG_TYPES)


PARAM_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": fuzz_number(st.integers(1, 8)),
    "temperature": fuzz_number(st.floats(0.0, 3.0)),
    "top_p": fuzz_number(st.floats(0.0, 1.0)),
    "top_k": fuzz_number(st.integers(-2, 600)),
    "min_p": fuzz_number(st.floats(0.0, 1.0)),
    "repetition_penalty": fuzz_number(st.floats(0.0, 5.0)),
    "presence_penalty": fuzz_number(st.floats(-2.5, 2.5)),
    "frequency_penalty": fuzz_number(st.floats(-2.5, 2.5)),
    "seed": st.one_of(st.none(), st.integers(0, 2**64), fuzz_number(st.integers(0, 100))),
    "stop": st.one_of(st.none(), st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), WRONG_TYPES),
    "stop_token_ids": st.one_of(st.lists(st.one_of(st.integers(-2, 520), HUGE), max_size=3), WRONG_TYPES),
    "include_stop_str_in_output": st.one_of(st.booleans(), WRONG_TYPES),
    "ignore_eos": st.one_of(st.booleans(), WRONG_TYPES),
    "min_tokens": fuzz_number(st.integers(0, 6)),
    "n": fuzz_number(st.integers(1, 4)),
    "logprobs": st.one_of(st.none(), fuzz_number(st.integers(0, 25))),
    "skip_special_tokens": st.one_of(st.booleans(), WRONG_TYPES),
    "grammar_backend": st.one_of(st.sampled_from([None, "xgrammar", "outlines", "nope", ""]), WRONG_TYPES),
    "logits_processors": st.one_of(st.none(), st.just([]), st.lists(st.integers(), min_size=1, max_size=2),
                                   WRONG_TYPES),
    "unknown_field": st.integers(),
}
PARAM_KWARGS = st.fixed_dictionaries({}, optional=PARAM_FIELDS)

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F)
ANY_CHAR = st.one_of(st.characters(codec=None, exclude_categories=()), SURROGATES, CONTROL)
TEXT = st.one_of(
    st.just(""),
    st.text(ANY_CHAR, max_size=40),
    st.builds(lambda c, k: c * k, st.text(ANY_CHAR, min_size=1, max_size=3), st.sampled_from([500, 3000, 20_000])),
)
TOKEN_IDS = st.lists(
    st.one_of(st.integers(0, 511), st.integers(0, 511), st.integers(-5, -1), st.integers(512, 600), HUGE,
              st.sampled_from([True, 1.5, math.nan, "7", None, b"\x01"])),
    max_size=20,
)
PROMPT = st.one_of(TEXT, TOKEN_IDS, st.none(), st.integers(), st.floats(), st.binary(max_size=4),
                   st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))

ROLE = st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "bogus", 3, None])
CONTENT = st.one_of(st.text(ANY_CHAR, max_size=20), st.none(), st.integers(), st.lists(st.text(max_size=5), max_size=2),
                    st.just([{"type": "text", "text": "hi"}]), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                max_size=2))
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLE, "content": CONTENT},
                          optional={"tool_call_id": st.one_of(st.text(max_size=5), st.integers(), st.none()),
                                    "name": st.one_of(st.text(max_size=5), st.integers()),
                                    "tool_calls": st.one_of(st.none(), st.just([]), st.integers(),
                                                            st.just([{"function": {"name": "f", "arguments": "{}"}}]))}),
    st.fixed_dictionaries({"content": CONTENT}),  # missing role
    st.fixed_dictionaries({"role": ROLE}),  # missing content
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=10)}),  # tool without an id
    st.text(max_size=5), st.integers(), st.none(),
)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=4), st.just([]), st.text(max_size=5), st.integers(),
                     st.just({"role": "user", "content": "hi"}))

SCHEMA_LEAF = st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "bogus"}, {"type": 3},
                               {"enum": []}, {"minLength": -1, "type": "string"}, {"$ref": "#/nowhere"},
                               {"pattern": "[", "type": "string"}, {}])
SCHEMA = st.recursive(SCHEMA_LEAF, lambda inner: st.one_of(
    st.builds(lambda p: {"type": "object", "properties": p}, st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    st.builds(lambda i: {"type": "array", "items": i}, inner),
), max_leaves=6)
RESPONSE_FORMAT = st.one_of(
    SCHEMA,
    st.builds(lambda s: {"type": "json_schema", "json_schema": {"schema": s}}, SCHEMA),
    st.builds(lambda s: {"type": "json_schema", "json_schema": s}, SCHEMA),
    st.just({"type": "json_schema"}), st.just({"type": "json_object"}), st.just({"type": "json_object", "regex": "a"}),
    st.builds(lambda n: {"enum": [f"v{i}" for i in range(n)]}, st.sampled_from([0, 1, 5000])),
    st.just({"type": "object", "properties": {"next": {"$ref": "#"}}}),  # recursive
    st.just({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
             "$ref": "#/$defs/n"}),  # recursive and required: an infinite document
    st.builds(lambda r: {"type": "regex", "regex": r}, st.sampled_from(["", "[", "a+", "(?=a)b", "\\", "a{99999}"])),
    st.builds(lambda c: {"type": "choice", "choice": c}, st.lists(st.text(max_size=3), max_size=3)),
    st.builds(lambda g: {"type": "grammar", "grammar": g},
              st.sampled_from(["", "root ::= \"a\"", "root ::=", "x ::= \"a\"", "root ::= root"])),
    st.builds(lambda v: {"regex": v}, WRONG_TYPES),
    st.builds(lambda v: {"type": "bogus", "x": v}, st.integers()),
    WRONG_TYPES, st.integers(), st.just(int),
)

ADAPTER_NAME = st.one_of(st.text(ANY_CHAR, max_size=10), st.none(), st.integers(), st.just(["a"]),
                         st.just({"a": 1}), st.just(b"x"))


def submit_kwargs() -> st.SearchStrategy[dict[str, Any]]:
    """One or two fuzzed arguments at a time: a bad value must be caught on its own, not only
    next to another one that is refused first."""
    return st.lists(st.sampled_from(sorted(SUBMIT_ARGS)), min_size=1, max_size=2, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: SUBMIT_ARGS[k] for k in keys}))


SUBMIT_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": st.one_of(st.text(ANY_CHAR, max_size=8), WRONG_TYPES, st.integers()),
    "priority": fuzz_number(st.integers(-5, 5)),
    "timeout": st.one_of(st.floats(0.5, 30.0), fuzz_number(st.floats(5.0, 30.0))),
    "cache_salt": st.one_of(st.text(ANY_CHAR, max_size=8), WRONG_TYPES),
    "adapter": ADAPTER_NAME,
    "tools": st.one_of(st.just([]), WRONG_TYPES, st.lists(WRONG_TYPES, max_size=2),
                       st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
    "tool_choice": st.one_of(st.none(), st.sampled_from(["auto", "none", "required", "bogus"]), WRONG_TYPES),
    "parallel_tool_calls": st.one_of(st.booleans(), WRONG_TYPES),
}


GREEDY = SamplingParams(temperature=0.0, max_tokens=2)


# ---- tests --------------------------------------------------------------------------------------------
@FUZZ
@given(kwargs=PARAM_KWARGS)
def test_fuzzed_sampling_params_either_run_or_fail_naming_the_field(harness: Harness, kwargs: dict[str, Any]) -> None:
    try:
        params = SamplingParams(**kwargs)
    except ValidationError as exc:
        fields = {str(e["loc"][0]) for e in exc.errors() if e["loc"]} or {"min_tokens"}
        assert fields <= set(kwargs) | {"min_tokens", "max_tokens"}, f"{fields} are not among {sorted(kwargs)}"
        assert all(f in str(exc) for f in fields)
        return
    params = clamp(params)
    outcome = harness.run(lambda e: attempt(harness, collect(e, prompt="Hello there", params=params)))
    check_outcome(outcome, (*kwargs, "prompt"))
    harness.settle_and_check()


@FUZZ
@given(prompt=PROMPT)
def test_fuzzed_prompts_and_token_ids_either_run_or_fail_naming_prompt(harness: Harness, prompt: Any) -> None:
    outcome = harness.run(lambda e: attempt(harness, collect(e, prompt=prompt, params=GREEDY)))
    check_outcome(outcome, ("prompt",))
    harness.settle_and_check()


@FUZZ
@given(messages=MESSAGES)
def test_fuzzed_chat_messages_either_run_or_fail_naming_messages(harness: Harness, messages: Any) -> None:
    outcome = harness.run(lambda e: attempt(harness, collect(e, messages=messages, params=GREEDY)))
    check_outcome(outcome, ("messages", "prompt"))
    harness.settle_and_check()


@FUZZ
@given(response_format=RESPONSE_FORMAT)
def test_fuzzed_response_formats_either_run_or_fail_naming_response_format(
    harness: Harness, response_format: Any,
) -> None:
    try:
        params = SamplingParams(response_format=response_format, max_tokens=MAX_TOKENS, temperature=0.0)
    except ValidationError as exc:
        assert "response_format" in str(exc)
        return
    outcome = harness.run(lambda e: attempt(harness, collect(e, prompt="Hello", params=params)))
    # A schema the compiler rejects is only known once compiled (off the loop, after submit):
    # the stream then raises GrammarError ("response_format: ...") and the request is dropped.
    check_outcome(outcome, ("response_format",), may_fail_after_queueing=True)
    harness.settle_and_check()


@FUZZ
@given(kwargs=submit_kwargs())
def test_fuzzed_submit_arguments_either_run_or_fail_naming_the_argument(
    harness: Harness, kwargs: dict[str, Any],
) -> None:
    use_messages = "tools" in kwargs or "tool_choice" in kwargs
    base: dict[str, Any] = ({"messages": [{"role": "user", "content": "hi"}]} if use_messages
                            else {"prompt": "Hello"})
    outcome = harness.run(lambda e: attempt(harness, collect(e, params=GREEDY, **base, **kwargs)))
    # The tools' system prompt can outgrow max_model_len: a refusal naming the prompt length.
    check_outcome(outcome, (*kwargs, "max_tokens: prompt"))
    harness.settle_and_check()


@FUZZ
@given(name=ADAPTER_NAME, path=st.one_of(st.text(ANY_CHAR, max_size=12), st.sampled_from(
    ["", ".", "/", "/nonexistent/adapter", "/dev/null", "/etc/hostname"]), st.none(), st.integers()),
    pinned=st.one_of(st.booleans(), WRONG_TYPES))
def test_fuzzed_adapter_names_and_paths_either_load_or_fail_naming_them(
    harness: Harness, name: Any, path: Any, pinned: Any,
) -> None:
    async def load(e: AsyncEngine) -> str:
        info = await e.load_adapter(name, path, pinned=pinned)
        await e.unload_adapter(name)
        return repr(info)

    outcome = harness.run(lambda e: attempt(harness, load))
    shown = [str(path), "name", "path", "pinned", "adapter"]
    exc = outcome.error
    if exc is not None:
        assert isinstance(exc, InvalidRequestError), f"unexpected {type(exc).__name__}: {exc}"
        assert any(s in str(exc) for s in shown), f"names neither the name nor the path: {exc}"
    assert not outcome.queued
    harness.settle_and_check()


# ---- regressions: the defects the fuzzing found -------------------------------------------------------
def rejected(harness: Harness, call: Callable[[AsyncEngine], Awaitable[Any]]) -> InvalidRequestError:
    async def run(e: AsyncEngine) -> str:
        await call(e)
        return "ran"

    outcome = harness.run(lambda e: attempt(harness, run))
    assert isinstance(outcome.error, InvalidRequestError), outcome
    assert not outcome.queued
    harness.settle_and_check()
    return outcome.error


@pytest.mark.parametrize("prompt", [0, None, b"ab", {"a": 1}, [1, None], [1, "7"], [1.5], [math.nan]])
def test_a_prompt_that_is_neither_text_nor_integer_ids_is_refused_naming_prompt(harness: Harness, prompt: Any) -> None:
    """Was ``TypeError`` ("'int' object is not iterable", "int() argument must be ...") or a
    silently truncated float id."""
    assert "prompt" in str(rejected(harness, lambda e: e.generate(prompt, GREEDY)))


def test_a_prompt_with_a_lone_surrogate_runs_or_is_refused_naming_prompt(harness: Harness) -> None:
    outcome = harness.run(lambda e: attempt(harness, collect(e, prompt="a\ud800b", params=GREEDY)))
    check_outcome(outcome, ("prompt",))
    harness.settle_and_check()


@pytest.mark.parametrize("messages", [[], 3, "hi", [None], [{"content": "hi"}], [{"role": 3, "content": "hi"}],
                                      [{"role": "user", "content": 5}], {"role": "user", "content": "hi"}])
def test_malformed_messages_are_refused_naming_messages(harness: Harness, messages: Any) -> None:
    """Was ``ValueError`` from transformers (empty conversation), ``TypeError`` from ``is_long``
    or a jinja error from the template."""
    assert str(rejected(harness, lambda e: e.generate(messages=messages, params=GREEDY))).startswith("messages")



@pytest.mark.parametrize(("kwargs", "name"), [
    ({"adapter": ["a"]}, "adapter"), ({"request_id": 3}, "request_id"), ({"priority": "high"}, "priority"),
    ({"priority": 1.5}, "priority"), ({"timeout": "5"}, "timeout"), ({"timeout": math.nan}, "timeout"),
    ({"cache_salt": 1}, "cache_salt"), ({"parallel_tool_calls": None}, "parallel_tool_calls"),
])
def test_submit_arguments_of_the_wrong_type_are_refused_naming_them(
    harness: Harness, kwargs: dict[str, Any], name: str,
) -> None:
    """Was ``TypeError`` ("unhashable type: 'list'" for an adapter list, "'>' not supported" for a
    string timeout), or a request queued with a priority the scheduler cannot order."""
    assert str(rejected(harness, lambda e: e.generate("Hello", GREEDY, **kwargs))).startswith(f"{name}:")


@pytest.mark.parametrize(("name", "path", "pinned", "argument"), [
    ("a", None, False, "path"), ("a", 3, False, "path"), ("", "/nonexistent", False, "name"),
    (None, "/nonexistent", False, "name"), ("a", "/nonexistent", None, "pinned"),
])
def test_load_adapter_arguments_of_the_wrong_type_are_refused_naming_them(
    harness: Harness, name: Any, path: Any, pinned: Any, argument: str,
) -> None:
    """Was ``TypeError`` ("expected str, bytes or os.PathLike object, not NoneType") from the worker."""
    error = rejected(harness, lambda e: e.load_adapter(name, path, pinned=pinned))
    assert str(error).startswith(f"{argument}:")


@pytest.mark.parametrize("kwargs", [
    {"stop_token_ids": [10**30]}, {"stop_token_ids": [2**63]}, {"stop_token_ids": [511, 512, 10**6]},
    {"seed": 2**63 - 1, "n": 3}, {"temperature": math.inf}, {"temperature": 1e-30}, {"temperature": 1e30},
    {"repetition_penalty": math.inf}, {"repetition_penalty": 1e-30}, {"top_k": 2**31 - 1},
    {"top_p": 1e-30}, {"min_p": 1.0}, {"logprobs": 20, "n": 3}, {"presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"stop": ["\ud800"]}, {"stop": ["a" * 10_000]}, {"min_tokens": 4, "stop_token_ids": [5]},
], ids=repr)
def test_edge_values_that_sampling_params_accepts_run(harness: Harness, kwargs: dict[str, Any]) -> None:
    """Values at the edges of what ``SamplingParams`` accepts reach the engine: they must run
    (or be refused naming the field), never fail a step."""
    params = clamp(SamplingParams(**kwargs))
    outcome = harness.run(lambda e: attempt(harness, collect(e, prompt="Hello there", params=params)))
    check_outcome(outcome, tuple(kwargs))
    harness.settle_and_check()


@pytest.mark.parametrize("top_k", [2**31, 2**63, 10**30])
def test_a_top_k_too_large_for_the_sampler_is_refused_naming_top_k(top_k: int) -> None:
    """Was accepted, then killed the engine on its first step: ``ValueError('Overflow when
    unpacking long long')`` building the top-k tensor (every later request: ``EngineDeadError``)."""
    with pytest.raises(ValidationError, match="top_k"):
        SamplingParams(top_k=top_k)
