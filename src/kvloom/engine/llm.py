"""``LLM``: a synchronous facade for scripts and notebooks (no event loop needed)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from kvloom.config import EngineConfig
from kvloom.engine.core import EngineCore
from kvloom.engine.output_processor import OutputProcessor
from kvloom.engine.processor import InputProcessor, Message, Prompt
from kvloom.engine.tokenizer import load_tokenizer
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion
from kvloom.params import SamplingParams
from kvloom.scheduler.request import Request


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A single prompt (text, or token ids) becomes a list of one."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [cast(Sequence[int], prompts)]
    return list(cast(Sequence[Prompt], prompts))


class LLM:
    """Batch generation on one engine core, driven in the caller's thread.

    ``LLM(model_dir, **config)`` accepts every ``EngineConfig`` field, cache and scheduler
    fields included at top level (``block_size=16``, ``num_kv_blocks=...``, ``max_num_seqs=...``).
    """

    def __init__(self, model: str | Path, **config: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **config)
        self.core = EngineCore(self.config)
        self.tokenizer = load_tokenizer(self.config.model)
        self.inputs = InputProcessor(
            self.tokenizer, self.core.model_config.vocab_size, self.core.max_model_len, self.core.max_tokens_in_pool
        )
        self._ids = itertools.count()

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Generate for every prompt (text or token ids); results come back in prompt order.

        Every prompt is validated before any is queued, so one bad prompt queues nothing.
        """
        items = _as_prompt_list(prompts)
        return self._run([self.inputs.to_token_ids(p, None) for p in items], params)

    def chat(
        self, conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Like ``generate`` for chat messages (the tokenizer's chat template applies)."""
        convs: list[Sequence[Message]]
        if conversations and isinstance(conversations[0], dict):
            convs = [conversations]  # type: ignore[list-item]
        else:
            convs = list(conversations)  # type: ignore[arg-type]
        return self._run([self.inputs.to_token_ids(None, c) for c in convs], params)

    def _run(self, token_lists: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None) -> list[Completion]:
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(token_lists)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(token_lists):
                raise ValueError(f"params: got {len(per_prompt)} SamplingParams for {len(token_lists)} prompts")
        for ids, p in zip(token_lists, per_prompt, strict=True):
            self.inputs.validate(ids, p)

        outputs = OutputProcessor(self.tokenizer)
        order: list[str] = []
        eos = frozenset(self.core.model_config.eos_token_ids)
        for ids, p in zip(token_lists, per_prompt, strict=True):
            parent = f"llm-{next(self._ids)}"
            order.append(parent)
            now = time.monotonic()
            for i, sid in enumerate(outputs.add_request(parent, ids, p, now)):
                self.core.add_request(Request(sid, list(ids), p.for_choice(i) if p.n > 1 else p, eos, arrival_time=now))

        done: dict[str, Completion] = {}
        while self.core.has_unfinished():
            processed = outputs.process(self.core.step())
            if processed.stop_string_hits:
                self.core.finish_requests(processed.stop_string_hits, "stop")
            for completion in processed.finished:
                done[completion.request_id] = completion
        return [done[rid] for rid in order]

    def kv_cache_stats(self) -> KVCacheStats:
        return self.core.kv_cache_stats()
