"""Where constrained decoding's time goes: compile threads sized to the CPUs, compiles on the pool's
threads (never the engine's or the event loop's), and ``stats()`` fields that tell grammar time from
step time. Behaviour only: no speed targets (those live in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvloom import AsyncEngine, SamplingParams
from kvloom.engine.messages import EngineSnapshot
from kvloom.engine.stats import StatsCollector, build_stats
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.structured import compiler as compiler_module
from kvloom.structured.compiler import GrammarCompiler
from kvloom.structured.spec import GrammarSpec
from kvloom.structured.timing import CompileSummary, ConstrainedStepTimes, StepTimesSample
from kvloom.structured.vocab import TokenizerVocab
from kvloom.structured.xgrammar_backend import XGrammarBackend

REGEX = GrammarSpec("regex", r"[a-z]{2,5}")
TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 10},
                                                        "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
                       "required": ["q"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                        "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def hermes_dir(checkpoint_factory: Callable[..., Path]) -> Path:
    """The tool-call tests' Qwen / Hermes checkpoint (``<tool_call>`` syntax)."""
    return checkpoint_factory(max_position_embeddings=2048, arch="qwen2", chat_template="hermes")


@pytest.mark.parametrize(("cpus", "workers", "threads"), [(1, 1, 1), (2, 2, 1), (3, 2, 1), (16, 2, 8)])
def test_compile_threads_never_outnumber_the_cpus(
    tiny_vocab: TokenizerVocab, monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int, threads: int,
) -> None:
    monkeypatch.setattr(compiler_module, "usable_cpus", lambda: cpus)
    passed: list[int] = []
    real_init = XGrammarBackend.__init__

    def spy(self: XGrammarBackend, vocab: TokenizerVocab, max_threads: int = 1) -> None:
        passed.append(max_threads)
        real_init(self, vocab, max_threads)

    monkeypatch.setattr(XGrammarBackend, "__init__", spy)
    with GrammarCompiler(tiny_vocab) as compiler:
        assert (compiler.max_workers, compiler.xgrammar_threads) == (workers, threads)
        assert compiler.max_workers * compiler.xgrammar_threads <= cpus
        compiler.submit(REGEX).result(timeout=120)
    assert passed == [threads]  # what xgrammar's compiler was given


def test_an_explicit_max_workers_is_kept(tiny_vocab: TokenizerVocab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiler_module, "usable_cpus", lambda: 2)
    with GrammarCompiler(tiny_vocab, max_workers=4) as compiler:
        assert (compiler.max_workers, compiler.xgrammar_threads) == (4, 1)


def test_compile_times_count_compiles_not_cache_hits(tiny_vocab: TokenizerVocab) -> None:
    with GrammarCompiler(tiny_vocab) as compiler:
        assert compiler.compile_times.summary() == CompileSummary(0, 0.0, 0.0)
        for _ in range(3):
            compiler.submit(REGEX).result(timeout=120)
        compiler.submit(GrammarSpec("regex", "(unclosed")).exception(timeout=120)  # a failed compile took time too
        summary = compiler.compile_times.summary()
    assert summary.num_compiles == 2
    assert 0.0 < summary.max_s <= summary.total_s


def test_step_times_keep_a_window_and_copy_it_once_per_change() -> None:
    with pytest.raises(ValueError, match="window"):
        ConstrainedStepTimes(window=0)
    times = ConstrainedStepTimes(window=3)
    assert times.sample() == StepTimesSample((), ())
    for i in range(5):
        times.record(0.001 * i, 0.01 * i)
    first = times.sample()
    assert first == StepTimesSample((0.002, 0.003, 0.004), (0.02, 0.03, 0.04))  # the oldest two left
    assert times.sample() is first  # nothing recorded since: the same copy
    times.record(0.005, 0.05)
    assert times.sample() is not first and first.step_s == (0.02, 0.03, 0.04)  # a handed-out copy never changes


def _snapshot(sample: StepTimesSample | None, processor_s: float = 0.0, steps: int = 0) -> EngineSnapshot:
    kv = KVCacheStats(num_blocks=8, block_size=16, used_blocks=0, tokens_held=0, peak_used_blocks=0,
                      tokens_held_at_peak=0)
    return EngineSnapshot(num_running=0, num_waiting=0, num_preemptions=0, num_timeouts=0, kv_stats=kv,
                          processor_time_s=processor_s, num_constrained_steps=steps, constrained_step_times=sample)


def test_stats_before_any_grammar_say_none() -> None:
    for last in (None, _snapshot(None), _snapshot(StepTimesSample((), ()))):
        stats = build_stats(last, 0, StatsCollector(), True, None, CompileSummary(0, 0.0, 0.0))
        assert stats.logits_processor_ms_per_step is None
        assert stats.logits_processor_ms_p99 is stats.logits_processor_ms_max is None
        assert stats.constrained_step_ms_p50 is stats.constrained_step_ms_p99 is stats.constrained_step_ms_max is None
        assert stats.num_grammar_compiles == 0
        assert stats.grammar_compile_ms_mean is stats.grammar_compile_ms_max is None


def test_stats_report_the_tail_of_processor_and_step_times() -> None:
    processor = tuple([0.0002] * 99 + [0.004])
    step = tuple([0.005] * 99 + [0.350])  # one slow step whose processors took 4 ms of its 350
    stats = build_stats(_snapshot(StepTimesSample(processor, step), sum(processor), 100), 0, StatsCollector(),
                        True, None, CompileSummary(2, 0.030, 0.020))
    assert stats.logits_processor_ms_per_step == pytest.approx(1e3 * sum(processor) / 100)
    # p99 interpolates linearly between the 99th and 100th of 100 sorted samples (numpy's default,
    # kvloom.engine.percentile): 0.2 + 0.01 * (4.0 - 0.2) ms; the maximum is the outlier itself.
    assert stats.logits_processor_ms_p99 == pytest.approx(0.2 + 0.01 * 3.8)
    assert stats.logits_processor_ms_max == pytest.approx(4.0)
    assert stats.constrained_step_ms_p50 == pytest.approx(5.0)
    assert stats.constrained_step_ms_max == pytest.approx(350.0)
    assert stats.num_grammar_compiles == 2
    assert stats.grammar_compile_ms_mean == pytest.approx(15.0) and stats.grammar_compile_ms_max == pytest.approx(20.0)


@pytest.mark.anyio
async def test_a_tool_call_compiles_in_the_pool_and_its_stats_add_up(
    hermes_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A required, parallel tool call: its structural tag compiles once, on a compile-pool thread (never
    the event loop's or the engine's), and stats() accounts for the compile and every constrained step."""
    compiled_on: list[str] = []
    real_compile = XGrammarBackend.compile

    def spy(self: XGrammarBackend, spec: GrammarSpec) -> Any:
        compiled_on.append(threading.current_thread().name)
        return real_compile(self, spec)

    monkeypatch.setattr(XGrammarBackend, "compile", spy)
    async with AsyncEngine.from_pretrained(hermes_dir) as engine:
        before = engine.stats()
        assert before.num_grammar_compiles == 0 and before.logits_processor_ms_max is None
        for seed in (1, 2):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=64)
            out = await engine.generate(messages=USER, params=params, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=True)
            assert out.usage.completion_tokens > 0
        stats = engine.stats()
    assert compiled_on and all(name.startswith("kvloom-grammar") for name in compiled_on), compiled_on
    assert stats.num_grammar_compiles == 1  # the second call's grammar came from the cache
    assert stats.grammar_compile_ms_mean is not None and stats.grammar_compile_ms_max is not None
    assert 0.0 < stats.grammar_compile_ms_mean <= stats.grammar_compile_ms_max
    mean, p99, top = stats.logits_processor_ms_per_step, stats.logits_processor_ms_p99, stats.logits_processor_ms_max
    assert mean is not None and p99 is not None and top is not None
    assert 0.0 < mean <= top and p99 <= top  # every step of both calls is in the window
    p50, step_p99, step_max = stats.constrained_step_ms_p50, stats.constrained_step_ms_p99, stats.constrained_step_ms_max
    assert p50 is not None and step_p99 is not None and step_max is not None
    assert 0.0 < p50 <= step_p99 <= step_max
    assert top <= step_max  # a step's processors run inside the step


def test_building_a_grammar_service_imports_xgrammar(llama_dir: Path) -> None:
    """The engine imports xgrammar with its weights, off the event loop: a first request with tools
    checks its schemas and builds its structural tag with xgrammar, on the loop."""
    code = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        "from kvloom.engine.grammar import GrammarService\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(llama_dir)!r})\n"
        "assert 'xgrammar' not in sys.modules\n"
        "GrammarService(None, 512, (1,), 'xgrammar', 60.0)\n"
        "assert 'xgrammar' not in sys.modules, 'no tokenizer: no grammar, no import'\n"
        "GrammarService(tokenizer, len(tokenizer), (1,), 'xgrammar', 60.0).close()\n"
        "assert 'xgrammar' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
