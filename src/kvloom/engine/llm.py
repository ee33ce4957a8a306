"""``LLM``: a synchronous facade for scripts and notebooks (no event loop needed).

Thread safety: any number of threads may call one ``LLM`` at once, and their requests are
batched together, as ``AsyncEngine`` batches its callers' (``shared_driver.SharedDriver``: one
calling thread steps the engine at a time and routes every ended request to its call).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterInfo
from kvloom.engine.build import build_engine
from kvloom.engine.messages import NewRequest, StepInput
from kvloom.engine.progress import BatchProgress, wants_bar
from kvloom.engine.prompts import Message, Prompt
from kvloom.engine.shared_driver import SharedDriver
from kvloom.engine.submit import Submitter, check_submission, new_request
from kvloom.errors import InvalidRequestError
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.models.dtype_choice import DTypeChoice
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
    """Batch generation on one engine core, driven by the calling threads (see the module doc).

    ``LLM(model_dir, **config)`` accepts every ``EngineConfig`` field, cache and scheduler
    fields included at top level (``block_size=16``, ``num_kv_blocks=...``, ``max_num_seqs=...``).
    """

    def __init__(self, model: str | Path, **config: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **config)
        self._parts = parts = build_engine(self.config)
        self.core = parts.core
        self.driver = parts.driver
        self.inputs = parts.encoder
        self.tokenizer = parts.encoder.tokenizer
        self.grammars = parts.grammars
        self.adapters = parts.adapters
        self._ids = itertools.count()
        self._shared = SharedDriver(self.driver, self.config.request_timeout)
        """Steps the engine from whichever calling thread needs it (``shared_driver``)."""

    @property
    def dtype_choice(self) -> DTypeChoice:
        """The dtype the model runs in and why (``dtype="auto"``: by device and CPU)."""
        return self.core.dtype_choice

    @property
    def weight_layout(self) -> tuple[str, str]:
        """How the linear weights are held (``"int8"`` with ``quantization="int8"``) and why."""
        return self.core.weight_layout

    @property
    def kv_cache_dtype(self) -> str:
        """What the KV cache holds: the model's dtype, or ``int8``."""
        return self.core.kv_cache_dtype

    def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> AdapterInfo:
        """Load a PEFT LoRA directory under ``name``; ``generate(..., adapter=name)`` uses it."""
        info = self.adapters.add(name, self.adapters.read(path), pinned)
        self._shared.step_once(StepInput(pinned_adapters=self.adapters.pinned()))
        return info

    def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)
        self._shared.step_once(StepInput(pinned_adapters=self.adapters.pinned()))

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
        per_prompt = _per_prompt(params, len(items), "params")
        names = _per_prompt(adapter, len(items), "adapter")
        return self._run([self._request(p, None, sp, adapter=name)
                          for p, sp, name in zip(items, per_prompt, names, strict=True)], use_tqdm)

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
        per_prompt = _per_prompt(params, len(convs), "params")
        return self._run([self._request(None, c, sp, tools=tools, tool_choice=tool_choice,
                                        parallel_tool_calls=parallel_tool_calls)
                          for c, sp in zip(convs, per_prompt, strict=True)], use_tqdm)

    # ---- requests ------------------------------------------------------------------------
    def _request(
        self, prompt: Prompt | None, messages: Sequence[Message] | None, params: SamplingParams | None, **kwargs: Any,
    ) -> NewRequest:
        """Check and tokenize one request (the same checks as ``AsyncEngine``'s); its grammar
        starts compiling."""
        sub = check_submission(self._parts, request_id=None, make_id=lambda: f"llm-{next(self._ids)}", params=params,
                               request_timeout=self.config.request_timeout, has_messages=messages is not None,
                               **kwargs)
        token_ids, salt = Submitter.encode_with(self.inputs, sub, prompt, messages)
        return new_request(self._parts, sub, token_ids, salt)

    def _run(self, adds: list[NewRequest], use_tqdm: bool | None) -> list[Completion]:
        """Queue ``adds`` (all checked: one bad prompt queued nothing), drive until they are
        done, and return their completions in order. On a failure or a timeout of one of them,
        the others are aborted and the error raised; an exception in this thread (Ctrl-C)
        aborts them too: nothing of the call stays queued."""
        for req in adds:  # a grammar that does not compile raises here, before anything is queued
            if req.grammar is not None:
                req.grammar.result(timeout=self.config.grammar_compile_timeout)
        stderr = sys.stderr  # looked up per call: the bar follows a redirected stderr
        with BatchProgress(len(adds), enabled=wants_bar(use_tqdm, stderr), stream=stderr) as progress:
            call = self._shared.run(adds, progress)
        if call.error is not None:
            raise call.error
        return [call.done[rid] for rid in call.order]

    # ---- inspection ------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the grammar compile pools and the mask thread down (also done at interpreter exit)."""
        self.grammars.close()
        with self._shared.driver_role():
            self.core.close()

    def assert_idle(self) -> None:
        """Raise ``AssertionError`` unless no request is left and every KV block is free."""
        with self._shared.driver_role():
            self.core.assert_idle()

    def kv_cache_stats(self) -> KVCacheStats:
        with self._shared.driver_role():
            return self.core.kv_cache_stats()

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache's unheld entries, so the next ``generate`` recomputes every
        prompt (benchmarks repeating a workload call it between passes). Pinned handles keep
        their blocks. Returns the number of blocks forgotten."""
        with self._shared.driver_role():
            return self.core.reset_prefix_cache()


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    """One value for every prompt (a single value, or None), or a list / tuple of exactly ``count``."""
    if not isinstance(value, list | tuple):  # one value for all; its type is checked per request
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InvalidRequestError(f"{name}: got {len(values)} values for {count} prompts")
    return values
