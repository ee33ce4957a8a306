"""Per-engine grammar service: checks a request's ``response_format`` before it is queued and
compiles it off the event loop and off the step.

Compilation runs in the backends' pools (xgrammar: threads; outlines: processes, its index
build holds the GIL); the request waits in the driver for its grammar while the batch goes
on. Compiled grammars are cached by (spec, backend, vocabulary).

An engine with a tokenizer imports xgrammar when it is built (off the event loop, with the
weights): the first request with ``tools`` builds its structural tag and checks its schemas with
xgrammar at submit, on the event loop, where importing it (~0.25 s on a 2-core CPU, more under
load) would stall every stream of the engine. No pool starts until the first compile.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from kvloom.errors import GrammarError, InvalidRequestError
from kvloom.params import SamplingParams

if TYPE_CHECKING:
    from kvloom.structured.compiler import CompiledGrammar, GrammarCompiler
    from kvloom.structured.spec import GrammarSpec
    from kvloom.structured.timing import CompileSummary


class GrammarService:
    """Thread-safe: ``submit`` runs on the event loop, futures are polled on the engine thread."""

    def __init__(
        self, tokenizer: Any | None, vocab_width: int, eos_token_ids: tuple[int, ...], default_backend: str,
        timeout: float,
    ) -> None:
        self.default_backend = default_backend
        self.timeout = timeout
        self._compiler: GrammarCompiler | None = None
        if tokenizer is not None:
            import xgrammar  # noqa: F401  (imported here, not on the event loop: see the module docstring)

            from kvloom.structured.compiler import GrammarCompiler
            from kvloom.structured.vocab import TokenizerVocab

            vocab = TokenizerVocab.from_tokenizer(tokenizer, vocab_width, eos_token_ids)
            self._compiler = GrammarCompiler(vocab, default_backend=default_backend)  # type: ignore[arg-type]

    def check(self, params: SamplingParams) -> None:
        """Errors known without compiling (no tokenizer, EBNF on outlines): raised before queueing."""
        if params.response_format is None:
            return
        if self._compiler is None:
            raise InvalidRequestError("response_format: this checkpoint has no tokenizer, so no grammar can be built")
        from kvloom.structured.compiler import check_backend_supports

        check_backend_supports(params.response_format.to_spec(), params.grammar_backend or self.default_backend)

    def submit(self, params: SamplingParams) -> Future[CompiledGrammar] | None:
        """Start (or reuse) the compile of ``params.response_format``; None when unconstrained."""
        if params.response_format is None:
            return None
        assert self._compiler is not None, "check() first"
        return self._compiler.submit(params.response_format.to_spec(), params.grammar_backend or self.default_backend)

    def check_spec(self, spec: GrammarSpec, backend: str | None) -> None:
        """Like ``check`` for a grammar the engine built (tool calls)."""
        if self._compiler is None:
            raise InvalidRequestError("tools: this checkpoint has no tokenizer, so no grammar can be built")
        from kvloom.structured.compiler import check_backend_supports

        check_backend_supports(spec, backend or self.default_backend)

    def submit_spec(self, spec: GrammarSpec, backend: str | None) -> Future[CompiledGrammar]:
        assert self._compiler is not None, "check_spec() first"
        return self._compiler.submit(spec, backend or self.default_backend)

    def compile_summary(self) -> CompileSummary | None:
        """The compiles so far (count, times from submission to result); None without a tokenizer."""
        return self._compiler.compile_times.summary() if self._compiler is not None else None

    def timeout_error(self) -> GrammarError:
        return GrammarError(
            f"response_format: the grammar did not compile within grammar_compile_timeout={self.timeout:g}s"
        )

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.close()
