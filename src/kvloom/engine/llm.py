"""``LLM``: a synchronous facade for scripts and notebooks (no event loop needed)."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterInfo
from kvloom.engine.build import build_engine
from kvloom.engine.messages import NewRequest, StepInput
from kvloom.engine.progress import BatchProgress, wants_bar
from kvloom.engine.prompts import Message, Prompt
from kvloom.errors import InvalidRequestError, RequestTimeoutError
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.models.dtype_choice import DTypeChoice
from kvloom.outputs import Completion
from kvloom.params import SamplingParams
from kvloom.tools.request import ToolRequest

if TYPE_CHECKING:
    from concurrent.futures import Future

    from kvloom.structured.compiler import CompiledGrammar


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
        parts = build_engine(self.config)
        self.core = parts.core
        self.driver = parts.driver
        self.inputs = parts.encoder
        self.tokenizer = parts.encoder.tokenizer
        self.grammars = parts.grammars
        self.adapters = parts.adapters
        self._ids = itertools.count()

    @property
    def dtype_choice(self) -> DTypeChoice:
        """The dtype the model runs in and why (``dtype="auto"``: by device and CPU)."""
        return self.core.dtype_choice

    def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> AdapterInfo:
        """Load a PEFT LoRA directory under ``name``; ``generate(..., adapter=name)`` uses it."""
        info = self.adapters.add(name, self.adapters.read(path), pinned)
        self.driver.run(StepInput(pinned_adapters=self.adapters.pinned()))
        return info

    def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)
        self.driver.run(StepInput(pinned_adapters=self.adapters.pinned()))

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
        *, adapter: str | Sequence[str | None] | None = None, use_tqdm: bool | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (text or token ids); results come back in prompt order.

        ``adapter``: one LoRA adapter name (or None, the base model) for every prompt, or one per
        prompt. Every prompt is validated before any is queued, so one bad prompt queues nothing.
        ``use_tqdm``: a progress bar on stderr (requests done, output tokens/s); None (default)
        shows it only when stderr is a terminal, False never writes anything.
        """
        items = _as_prompt_list(prompts)
        return self._run([self.inputs.to_token_ids(p, None) for p in items], params, adapter, use_tqdm=use_tqdm)

    def chat(
        self, conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None, *,
        tools: Sequence[Any] | None = None, tool_choice: Any = None, parallel_tool_calls: bool = True,
        use_tqdm: bool | None = None,
    ) -> list[Completion]:
        """Like ``generate`` for chat messages (the tokenizer's chat template applies; the same
        ``use_tqdm`` progress bar).

        ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` as in ``AsyncEngine.generate``:
        the same tools for every conversation; calls come back in ``Completion.tool_calls``.
        """
        convs: list[Sequence[Message]]
        if conversations and isinstance(conversations[0], dict):
            convs = [conversations]  # type: ignore[list-item]
        else:
            convs = list(conversations)  # type: ignore[arg-type]
        if tools is None and tool_choice is not None:
            raise InvalidRequestError("tool_choice: given without `tools`")
        first = params if params is None or isinstance(params, SamplingParams) else (params[0] if params else None)
        tool_request = None if tools is None else ToolRequest.build(
            tools, tool_choice, parallel_tool_calls, self.inputs.tool_call_format, True,
            first is not None and first.response_format is not None)
        return self._run([self.inputs.to_token_ids(None, c, tools=tool_request) for c in convs], params,
                         tools=tool_request, use_tqdm=use_tqdm)

    def _run(
        self, token_lists: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None,
        adapter: str | Sequence[str | None] | None = None, tools: ToolRequest | None = None,
        use_tqdm: bool | None = None,
    ) -> list[Completion]:
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(token_lists)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(token_lists):
                raise ValueError(f"params: got {len(per_prompt)} SamplingParams for {len(token_lists)} prompts")
        names = [adapter] * len(token_lists) if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(names) != len(token_lists):
            raise ValueError(f"adapter: got {len(names)} adapter names for {len(token_lists)} prompts")
        loras = [self.adapters.resolve_for_request(name) for name in names]
        for ids, p in zip(token_lists, per_prompt, strict=True):
            self.inputs.validate(ids, p)
            self.grammars.check(p)
        spec = tools.grammar_spec() if tools is not None else None
        grammars: list[Future[CompiledGrammar] | None]
        if spec is not None:
            if any(p.response_format is not None for p in per_prompt):
                raise InvalidRequestError("tools: cannot be combined with `response_format` in one request")
            self.grammars.check_spec(spec, per_prompt[0].grammar_backend if per_prompt else None)
            grammars = [self.grammars.submit_spec(spec, p.grammar_backend) for p in per_prompt]
        else:
            grammars = [self.grammars.submit(p) for p in per_prompt]
        for future in grammars:  # a grammar that does not compile raises here, before anything is queued
            if future is not None:
                future.result(timeout=self.config.grammar_compile_timeout)

        now = time.monotonic()
        timeout = self.config.request_timeout
        adds = [
            NewRequest(f"llm-{next(self._ids)}", ids, p, 0, now, now + timeout if timeout is not None else None,
                       grammar=grammar, lora=lora, tools=tools)
            for ids, p, grammar, lora in zip(token_lists, per_prompt, grammars, loras, strict=True)
        ]
        order = [r.request_id for r in adds]
        stderr = sys.stderr  # looked up per call: the bar follows a redirected stderr
        with BatchProgress(len(order), enabled=wants_bar(use_tqdm, stderr), stream=stderr) as progress:
            done = self._drive(StepInput(adds=adds), order, progress)
        return [done[rid] for rid in order]

    def _drive(self, step_input: StepInput, order: list[str], progress: BatchProgress) -> dict[str, Completion]:
        """Step until every request of ``order`` has finished; on a failure or a timeout abort
        them all (nothing stays queued) and raise."""
        done: dict[str, Completion] = {}
        while True:
            result = self.driver.run(step_input)
            step_input = StepInput()
            for completion in result.finished:
                done[completion.request_id] = completion
            progress.update(len(result.finished), sum(len(d.token_ids) for d in result.deltas))
            failure: Exception | None = result.failed[0].error if result.failed else None
            if failure is None and result.timed_out:
                failure = RequestTimeoutError(f"request {result.timed_out[0].request_id!r} passed request_timeout="
                                              f"{self.config.request_timeout}s and was aborted")
            if failure is not None:  # end the whole call cleanly: nothing stays queued
                for rid in order:
                    self.driver.abort(rid)
                raise failure
            if not result.has_unfinished:
                return done

    def close(self) -> None:
        """Shut the grammar compile pools and the mask thread down (also done at interpreter exit)."""
        self.grammars.close()
        self.core.close()

    def assert_idle(self) -> None:
        """Raise ``AssertionError`` unless no request is left and every KV block is free."""
        self.core.assert_idle()

    def kv_cache_stats(self) -> KVCacheStats:
        return self.core.kv_cache_stats()

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache's unheld entries, so the next ``generate`` recomputes every
        prompt (benchmarks repeating a workload call it between passes). Pinned handles keep
        their blocks. Returns the number of blocks forgotten."""
        return self.core.reset_prefix_cache()
