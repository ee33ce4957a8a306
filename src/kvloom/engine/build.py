"""One way to build an engine's parts, shared by ``LLM`` and ``AsyncEngine``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterRegistry
from kvloom.engine.core import EngineCore
from kvloom.engine.driver import EngineDriver
from kvloom.engine.grammar import GrammarService
from kvloom.engine.openmp_pool import release_calling_thread_pool
from kvloom.engine.prompts import PromptEncoder
from kvloom.engine.tokenizer import load_tokenizer
from kvloom.tools.formats import detect_format


@dataclass(slots=True)
class EngineParts:
    """Everything a facade drives. ``driver`` (and the ``core`` inside it) belongs to the
    engine thread; ``encoder``, ``grammars`` and ``adapters`` to the caller's side. The
    tokenizer is loaded once and copied, so the encoder and the driver's detokenizer never
    share one instance across threads."""

    core: EngineCore
    driver: EngineDriver
    encoder: PromptEncoder
    grammars: GrammarService
    adapters: AdapterRegistry


def build_engine(config: EngineConfig) -> EngineParts:
    """Load weights, size the KV cache, load the tokenizer and set up grammars (slow: call it
    off the event loop). Frees the calling thread's OpenMP pool at the end: the load leaves it in a
    state its first steps run slower in (measured: one int8 linear 55-65 us after two loads, 37
    after the pool was freed and rebuilt), and an engine waiting for requests should hold none
    (``engine.openmp_pool``)."""
    core = EngineCore(config)
    tokenizer = load_tokenizer(config.model)
    model = core.model_config
    sched = config.scheduler
    tool_format = detect_format(model.architecture, getattr(tokenizer, "chat_template", None), config.tool_call_format)
    encoder = PromptEncoder(
        tokenizer, model.vocab_size, core.max_model_len, core.max_tokens_in_pool,
        None if sched.enable_chunked_prefill else sched.max_num_batched_tokens, tool_format,
    )
    grammars = GrammarService(
        tokenizer, model.vocab_size, tuple(model.eos_token_ids), config.grammar_backend, config.grammar_compile_timeout,
    )
    driver = EngineDriver(core, copy.deepcopy(tokenizer), config.grammar_compile_timeout)
    adapters = AdapterRegistry(model, config.lora.max_lora_rank, config.lora.max_loras)
    release_calling_thread_pool()
    return EngineParts(core, driver, encoder, grammars, adapters)
