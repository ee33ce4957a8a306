"""``LLM``: a synchronous facade for scripts and notebooks (no event loop needed)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from kvloom.config import EngineConfig
from kvloom.engine.core import EngineCore
from kvloom.engine.driver import EngineDriver, NewRequest
from kvloom.engine.processor import InputProcessor, Message, Prompt
from kvloom.engine.tokenizer import load_tokenizer
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion
from kvloom.params import SamplingParams


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
        self.driver = EngineDriver(self.core, self.tokenizer)
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

        order: list[str] = []
        now = time.monotonic()
        for ids, p in zip(token_lists, per_prompt, strict=True):
            order.append(f"llm-{next(self._ids)}")
            self.driver.add(NewRequest(order[-1], ids, p, 0, now))
        done: dict[str, Completion] = {}
        while self.core.has_unfinished():
            for completion in self.driver.run([], []).finished:
                done[completion.request_id] = completion
        return [done[rid] for rid in order]

    def kv_cache_stats(self) -> KVCacheStats:
        return self.core.kv_cache_stats()
