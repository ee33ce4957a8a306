"""GrammarCompiler: caching, failure caching, pool recovery and a clean close."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, wait

import pytest

from kvloom.errors import GrammarError, InvalidRequestError
from kvloom.structured.compiler import CompiledGrammar, GrammarCompiler, check_backend_supports
from kvloom.structured.spec import GrammarSpec
from kvloom.structured.vocab import TokenizerVocab

REGEX = GrammarSpec("regex", r"[a-z]{2,5}")
SCHEMA = GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}')
BAD_REGEX = GrammarSpec("regex", "(unclosed")


def test_the_same_spec_compiles_once(tiny_vocab: TokenizerVocab) -> None:
    with GrammarCompiler(tiny_vocab) as compiler:
        for backend in ("xgrammar", "outlines"):
            first = compiler.submit(REGEX, backend)
            assert compiler.submit(REGEX, backend) is first
            assert compiler.submit(GrammarSpec("regex", r"[a-z]{2,5}"), backend) is first  # equal spec
            grammar = first.result(timeout=120)
            assert grammar.backend == backend and grammar.spec == REGEX
            assert compiler.submit(REGEX, backend) is first  # still cached once done
        assert compiler.submit(REGEX, "xgrammar") is not compiler.submit(REGEX, "outlines")
        assert compiler.submit(REGEX) is compiler.submit(REGEX, "xgrammar")  # the default backend


def test_concurrent_submits_share_one_compile(tiny_vocab: TokenizerVocab) -> None:
    with GrammarCompiler(tiny_vocab) as compiler:
        futures: list[Future[CompiledGrammar]] = []
        threads = [threading.Thread(target=lambda: futures.append(compiler.submit(SCHEMA))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(f) for f in futures}) == 1


def test_an_invalid_spec_fails_once_and_stays_failed(tiny_vocab: TokenizerVocab) -> None:
    with GrammarCompiler(tiny_vocab) as compiler:
        for backend in ("xgrammar", "outlines"):
            failed = compiler.submit(BAD_REGEX, backend)
            error = failed.exception(timeout=120)
            assert isinstance(error, GrammarError) and isinstance(error, InvalidRequestError)
            assert str(error).startswith("response_format: invalid regex")
            assert compiler.submit(BAD_REGEX, backend) is failed  # deterministic: not compiled again


def test_an_unexpected_failure_is_not_cached(tiny_vocab: TokenizerVocab, monkeypatch: pytest.MonkeyPatch) -> None:
    with GrammarCompiler(tiny_vocab) as compiler:
        real = compiler._compile_xgrammar
        calls = []

        def flaky(spec: GrammarSpec) -> CompiledGrammar:
            calls.append(spec)
            if len(calls) == 1:
                raise MemoryError("simulated")
            return real(spec)

        monkeypatch.setattr(compiler, "_compile_xgrammar", flaky)
        first = compiler.submit(REGEX)
        with pytest.raises(GrammarError, match=r"^response_format: compiling the grammar failed: MemoryError"):
            first.result(timeout=120)
        retry = compiler.submit(REGEX)
        assert retry is not first
        assert retry.result(timeout=120).spec == REGEX
        assert len(calls) == 2


def test_a_dead_worker_process_is_replaced(tiny_vocab: TokenizerVocab) -> None:
    with GrammarCompiler(tiny_vocab, max_workers=1) as compiler:
        compiler.submit(REGEX, "outlines").result(timeout=120)
        pool = compiler._processes
        assert pool is not None
        for process in list(pool._processes.values()):  # kill the worker like the OOM killer would
            os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        outcomes = []
        for i in range(3):  # the first compile may land in the broken pool; a retry must not
            future = compiler.submit(GrammarSpec("regex", f"x{{{i + 1}}}"), "outlines")
            outcomes.append(future.exception(timeout=max(1.0, deadline - time.monotonic())))
            if outcomes[-1] is None:
                break
        assert outcomes[-1] is None, outcomes
        assert all(isinstance(e, GrammarError) for e in outcomes[:-1])


def test_least_recently_used_entries_are_dropped(tiny_vocab: TokenizerVocab) -> None:
    with GrammarCompiler(tiny_vocab, max_cached=2) as compiler:
        a = compiler.submit(GrammarSpec("regex", "a+"))
        b = compiler.submit(GrammarSpec("regex", "b+"))
        assert compiler.submit(GrammarSpec("regex", "a+")) is a  # a is now the most recent
        compiler.submit(GrammarSpec("regex", "c+"))  # drops b
        assert compiler.submit(GrammarSpec("regex", "a+")) is a
        assert compiler.submit(GrammarSpec("regex", "b+")) is not b
        assert b.result(timeout=120).spec.text == "b+"  # a dropped future still completes


def test_close_leaves_no_thread_and_no_process(tiny_vocab: TokenizerVocab) -> None:
    threads_before = set(threading.enumerate())
    compiler = GrammarCompiler(tiny_vocab)
    wait([compiler.submit(SCHEMA, "xgrammar"), compiler.submit(SCHEMA, "outlines")], timeout=120)
    assert multiprocessing.active_children(), "the outlines pool should have started a process"
    assert set(threading.enumerate()) - threads_before, "the pools should have started threads"
    compiler.close()
    compiler.close()  # idempotent
    assert multiprocessing.active_children() == []
    assert set(threading.enumerate()) - threads_before == set()
    with pytest.raises(RuntimeError, match="closed"):
        compiler.submit(REGEX)


def test_no_pool_starts_before_the_first_compile(tiny_vocab: TokenizerVocab) -> None:
    threads_before = set(threading.enumerate())
    compiler = GrammarCompiler(tiny_vocab)
    assert set(threading.enumerate()) == threads_before and multiprocessing.active_children() == []
    compiler.submit(REGEX, "xgrammar").result(timeout=120)
    assert multiprocessing.active_children() == []  # xgrammar alone needs no process
    compiler.close()


@pytest.mark.parametrize(
    ("spec", "backend", "message"),
    [
        (GrammarSpec("grammar", 'root ::= "a"'), "outlines", "EBNF grammars need the xgrammar backend"),
        (REGEX, "llguidance", "unknown grammar backend 'llguidance'"),
    ],
)
def test_check_backend_supports_refuses_early(spec: GrammarSpec, backend: str, message: str) -> None:
    with pytest.raises(GrammarError, match=r"^response_format: ") as info:
        check_backend_supports(spec, backend)
    assert message in str(info.value)


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
@pytest.mark.parametrize("kind", ["json_schema", "json_object", "regex", "choice"])
def test_check_backend_supports_accepts_what_compiles(kind: str, backend: str) -> None:
    check_backend_supports(GrammarSpec(kind, ""), backend)
    check_backend_supports(GrammarSpec("grammar", 'root ::= "a"'), "xgrammar")


def test_bad_constructor_arguments(tiny_vocab: TokenizerVocab) -> None:
    with pytest.raises(ValueError, match="default_backend"):
        GrammarCompiler(tiny_vocab, default_backend="nope")
    with pytest.raises(ValueError, match="max_workers"):
        GrammarCompiler(tiny_vocab, max_workers=0)
