"""Compile grammar specs off the caller's thread, once per (spec, backend, vocabulary).

xgrammar compiles in a thread pool (its C++ compiler); outlines builds its index in a process
pool, because the build holds the GIL for up to seconds. Both pools start on first use, so an
engine that never sees a grammar (or never the outlines backend) starts no thread or process.

The process pool uses the ``spawn`` start method: the parent runs torch threads, which ``fork``
would copy mid-state, and ``forkserver`` would leave its server process alive after
:meth:`GrammarCompiler.close`. As with any spawn pool, each worker imports the main module, so a
script that uses the outlines backend needs the ``if __name__ == "__main__":`` guard, and a main
module that cannot be imported (``python - < script``) kills the workers. Each task carries the
pickled ``outlines_core.Vocabulary`` (~0.4 MB and ~6 ms at 32k tokens) and returns the pickled
``Index``; the workers keep no state.

Threads: at most ``max_workers`` compiles run at once (default: 2, or 1 on a one-CPU machine),
and each xgrammar compile uses ``usable_cpus() // max_workers`` threads (at least 1), so with the
default all compile threads together never outnumber the CPUs this process may run on: a 2-CPU
machine runs each compile on one thread (more would only preempt the model's threads in the
steps that run meanwhile, and torch's OpenMP barriers spin while a member waits for a CPU).
Each compile's time from submission to result is recorded in ``compile_times``
(``engine.stats()`` reports it).

Cache: ``(spec, backend, vocab.fingerprint)`` -> the future of the compile, least recently used
entries dropped past ``max_cached``. A spec that is invalid (:class:`~kvloom.errors.GrammarError`
from the backend) stays cached: compiling it again would fail the same way. Any other failure
(a worker process died, an unexpected exception, the compile was cancelled) leaves the cache,
so a retry compiles again.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import (
    CancelledError,
    Future,
    InvalidStateError,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from kvloom.errors import GrammarError
from kvloom.structured.logits_processor import LogitsProcessor
from kvloom.structured.spec import GrammarSpec
from kvloom.structured.timing import CompileTimes
from kvloom.structured.vocab import TokenizerVocab

if TYPE_CHECKING:
    import outlines_core

    from kvloom.structured.xgrammar_backend import XGrammarBackend

DEFAULT_MAX_WORKERS = 2
"""Compiles that may run at once by default (fewer on a machine with fewer CPUs)."""

BackendName = Literal["xgrammar", "outlines"]
BACKENDS: tuple[BackendName, ...] = ("xgrammar", "outlines")

_T = TypeVar("_T")
_CacheKey = tuple[GrammarSpec, str, str]
_Outcome = tuple["CompiledGrammar | None", GrammarError | None, bool]
"""(result, error, cacheable): exactly one of result and error, or neither when cancelled."""
_Started = tuple["Future[Any]", "Callable[[Any], CompiledGrammar]", "Callable[[], None] | None"]
"""A compile running in a pool: (its future, result -> CompiledGrammar, what to do if the pool broke)."""


class CompiledGrammar(Protocol):
    """A compiled grammar, shared by every sequence that uses it (immutable)."""

    @property
    def spec(self) -> GrammarSpec: ...

    @property
    def backend(self) -> str: ...

    def new_processor(self) -> LogitsProcessor:
        """A processor at the grammar's start, for one sequence (fresh state on every call)."""
        ...


def check_backend_supports(spec: GrammarSpec, backend: str) -> None:
    """Raise :class:`GrammarError` for what is wrong before compiling: an unknown backend, EBNF on outlines."""
    if backend not in BACKENDS:
        raise GrammarError(f"response_format: unknown grammar backend {backend!r}; expected one of {list(BACKENDS)}")
    if spec.kind == "structural_tag" and backend == "outlines":
        raise GrammarError(
            "tools: constrained tool calls need xgrammar's structural tags, which the outlines backend does not "
            "have; use grammar_backend='xgrammar' (the default) for requests with tools")
    if spec.kind == "grammar" and backend == "outlines":
        from kvloom.structured.outlines_worker import EBNF_ERROR

        raise GrammarError(f"response_format: {EBNF_ERROR} (the request asked for grammar_backend='outlines')")


class GrammarCompiler:
    """Compiles :class:`GrammarSpec` s for one vocabulary. Thread-safe.

    ``submit`` never blocks on a compile and never raises for a bad spec: the future fails with
    a :class:`GrammarError` whose message starts with ``response_format:``.
    """

    def __init__(
        self, vocab: TokenizerVocab, default_backend: BackendName = "xgrammar", max_workers: int | None = None,
        max_cached: int = 256,
    ) -> None:
        if default_backend not in BACKENDS:
            raise ValueError(f"default_backend must be one of {list(BACKENDS)}, got {default_backend!r}")
        cpus = usable_cpus()
        if max_workers is None:
            max_workers = min(DEFAULT_MAX_WORKERS, cpus)
        if max_workers < 1 or max_cached < 1:
            raise ValueError(f"max_workers and max_cached must be >= 1, got {max_workers} and {max_cached}")
        self.vocab = vocab
        self.default_backend: BackendName = default_backend
        self.max_workers = max_workers
        self.xgrammar_threads = max(1, cpus // max_workers)
        """Threads of one xgrammar compile: ``max_workers`` compiles at once use at most the usable CPUs
        (unless ``max_workers`` alone exceeds them)."""
        self.max_cached = max_cached
        self.compile_times = CompileTimes()
        """Each compile's time from ``submit`` to its result or error (cache hits are not compiles)."""
        self._lock = threading.Lock()  # guards the cache, the pools and _closed
        self._cache: OrderedDict[_CacheKey, Future[CompiledGrammar]] = OrderedDict()
        self._threads: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None
        self._closed = False
        self._backend_lock = threading.Lock()  # guards the lazily built backend state below
        self._xgrammar: XGrammarBackend | None = None
        self._outlines_vocabulary: outlines_core.Vocabulary | None = None

    # ---- public ---------------------------------------------------------------------------
    def submit(self, spec: GrammarSpec, backend: str | None = None) -> Future[CompiledGrammar]:
        """The compile of ``spec`` with ``backend`` (default: ``default_backend``), shared if cached.

        Raises ``RuntimeError`` only after :meth:`close`.
        """
        name = backend or self.default_backend
        try:
            check_backend_supports(spec, name)
        except GrammarError as exc:
            failed: Future[CompiledGrammar] = Future()
            failed.set_exception(exc)
            return failed
        key: _CacheKey = (spec, name, self.vocab.fingerprint)
        with self._lock:
            if self._closed:
                raise RuntimeError("the GrammarCompiler is closed")
            cached = self._cache.get(key)
            if cached is not None and not cached.cancelled():
                self._cache.move_to_end(key)
                return cached
            future: Future[CompiledGrammar] = Future()
            self._cache[key] = future
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)  # whoever holds that future still gets its result
            started = time.perf_counter()
            inner, wrap, on_broken = self._start_xgrammar(spec) if name == "xgrammar" else self._start_outlines(spec)

        def settle(done: Future[Any]) -> None:
            outcome = _outcome(done, wrap, on_broken)
            if outcome[0] is not None or outcome[1] is not None:  # a cancelled compile waited for nothing
                self.compile_times.record(time.perf_counter() - started)
            self._settle(key, future, outcome)

        # Outside the lock: a compile that already ended runs the callback right here.
        inner.add_done_callback(settle)
        return future

    def close(self) -> None:
        """Cancel queued compiles, wait for running ones, stop every pool thread and process. Idempotent."""
        with self._lock:
            self._closed = True
            pools: list[ThreadPoolExecutor | ProcessPoolExecutor | None] = [self._threads, self._processes]
            self._threads = self._processes = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> GrammarCompiler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- xgrammar: threads ----------------------------------------------------------------
    def _start_xgrammar(self, spec: GrammarSpec) -> _Started:
        """Called with ``_lock`` held."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.max_workers, thread_name_prefix="kvloom-grammar")
        return self._threads.submit(self._compile_xgrammar, spec), _identity, None

    def _compile_xgrammar(self, spec: GrammarSpec) -> CompiledGrammar:
        with self._backend_lock:  # the first compile builds xgrammar's tokenizer info
            if self._xgrammar is None:
                from kvloom.structured.xgrammar_backend import XGrammarBackend

                self._xgrammar = XGrammarBackend(self.vocab, max_threads=self.xgrammar_threads)
            backend = self._xgrammar
        return backend.compile(spec)

    # ---- outlines: processes --------------------------------------------------------------
    def _start_outlines(self, spec: GrammarSpec) -> _Started:
        """Called with ``_lock`` held."""
        from kvloom.structured.outlines_backend import OutlinesCompiled, make_vocabulary
        from kvloom.structured.outlines_worker import build_index

        with self._backend_lock:
            if self._outlines_vocabulary is None:
                self._outlines_vocabulary = make_vocabulary(self.vocab)
            vocabulary = self._outlines_vocabulary
        pool = self._process_pool()
        try:
            inner = pool.submit(build_index, spec.kind, spec.text, vocabulary)
        except BrokenProcessPool:  # a worker died earlier (killed, out of memory): start afresh
            self._drop_process_pool(pool)
            pool = self._process_pool()
            inner = pool.submit(build_index, spec.kind, spec.text, vocabulary)

        def wrap(index: Any) -> CompiledGrammar:
            return OutlinesCompiled(spec, index, self.vocab)

        def on_broken() -> None:
            with self._lock:
                self._drop_process_pool(pool)

        return inner, wrap, on_broken

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._processes is None:
            import multiprocessing

            self._processes = ProcessPoolExecutor(self.max_workers, mp_context=multiprocessing.get_context("spawn"))
        return self._processes

    def _drop_process_pool(self, pool: ProcessPoolExecutor) -> None:
        """Forget ``pool`` if it is still the current one (called with ``_lock`` held)."""
        if self._processes is pool:
            self._processes = None
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- completion -----------------------------------------------------------------------
    def _settle(self, key: _CacheKey, future: Future[CompiledGrammar], outcome: _Outcome) -> None:
        """Runs where the compile ended (a pool thread): settle ``future``, evict transient failures."""
        result, error, cacheable = outcome
        if not cacheable or future.cancelled():
            with self._lock:
                if self._cache.get(key) is future:
                    del self._cache[key]
        try:
            if result is not None:
                future.set_result(result)
            elif error is not None:
                future.set_exception(error)
            else:
                future.cancel()
        except InvalidStateError:  # a caller cancelled the future meanwhile
            pass


def _outcome(done: Future[_T], wrap: Callable[[_T], CompiledGrammar], on_broken: Callable[[], None] | None) -> _Outcome:
    """Turn a finished pool future into an outcome; only an invalid spec is a cacheable failure."""
    try:
        return wrap(done.result()), None, True
    except CancelledError:
        return None, None, False
    except ValueError as exc:  # the backends' message for a spec they cannot compile
        return None, GrammarError(f"response_format: {exc}"), True
    except BrokenProcessPool as exc:
        if on_broken is not None:
            on_broken()
        error = GrammarError(
            "response_format: the outlines compile process died: killed (out of memory?), or it could not "
            "start (spawned workers import the main module: guard scripts with `if __name__ == '__main__':`)"
        )
        error.__cause__ = exc
        return None, error, False
    except Exception as exc:
        error = GrammarError(f"response_format: compiling the grammar failed: {exc!r}")
        error.__cause__ = exc
        return None, error, False


def _identity(value: CompiledGrammar) -> CompiledGrammar:
    return value


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return max(1, os.cpu_count() or 1)
