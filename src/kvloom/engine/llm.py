"""``LLM``: a synchronous facade for scripts and notebooks (no event loop needed).

Thread safety: any number of threads may call one ``LLM`` at once, and their requests are
batched together, as ``AsyncEngine`` batches its callers'. At any moment one of the calling
threads drives the engine (it steps until its own requests are done, routing every finished
request to the call that made it); the others wait and take over when it returns. The engine
core is only ever touched by the thread that holds that role.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterInfo
from kvloom.engine.build import build_engine
from kvloom.engine.messages import NewRequest, StepInput, StepOutput
from kvloom.engine.progress import BatchProgress, wants_bar
from kvloom.engine.prompts import Message, Prompt
from kvloom.engine.submit import Submitter, check_submission, new_request
from kvloom.errors import EngineError, InvalidRequestError, RequestTimeoutError
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


@dataclass(slots=True)
class _Call:
    """One ``generate`` / ``chat`` call: its requests, in prompt order, and what came back."""

    order: list[str]
    progress: BatchProgress
    done: dict[str, Completion] = field(default_factory=dict)
    error: BaseException | None = None
    """Set when one of its requests failed or timed out; the others were aborted then."""

    @property
    def is_over(self) -> bool:
        return self.error is not None or len(self.done) == len(self.order)


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
        self._cond = threading.Condition()
        """Guards everything below; waiting threads sleep on it."""
        self._driving = False
        """Whether a thread holds the driver role (only that thread touches ``driver`` and ``core``)."""
        self._pending = StepInput()
        """What the next step applies first: other threads' new requests, aborts and adapter pins."""
        self._calls: dict[str, _Call] = {}
        """Parent request id -> the call it belongs to, until it ends."""

    @property
    def dtype_choice(self) -> DTypeChoice:
        """The dtype the model runs in and why (``dtype="auto"``: by device and CPU)."""
        return self.core.dtype_choice

    def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> AdapterInfo:
        """Load a PEFT LoRA directory under ``name``; ``generate(..., adapter=name)`` uses it."""
        info = self.adapters.add(name, self.adapters.read(path), pinned)
        self._step_once(StepInput(pinned_adapters=self.adapters.pinned()))
        return info

    def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)
        self._step_once(StepInput(pinned_adapters=self.adapters.pinned()))

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
            call = _Call([r.request_id for r in adds], progress)
            with self._cond:
                self._pending.adds.extend(adds)
                self._calls.update((rid, call) for rid in call.order)
            try:
                self._drive_until(lambda: call.is_over)
            except BaseException:
                self._abandon(call)
                raise
        if call.error is not None:
            raise call.error
        return [call.done[rid] for rid in call.order]

    # ---- the driver role -------------------------------------------------------------------
    @contextmanager
    def _driver_role(self) -> Iterator[None]:
        """Wait for and hold the driver role (no other thread steps meanwhile)."""
        with self._cond:
            while self._driving:
                self._cond.wait()
            self._driving = True
        try:
            yield
        finally:
            with self._cond:
                self._driving = False
                self._cond.notify_all()

    def _drive_until(self, is_over: Callable[[], bool]) -> None:
        """Step (or wait while another thread steps) until ``is_over()``."""
        while True:
            with self._cond:
                while self._driving and not is_over():
                    self._cond.wait()
                if is_over():
                    return
                self._driving = True
            try:
                self._step()
            finally:
                with self._cond:
                    self._driving = False
                    self._cond.notify_all()

    def _step_once(self, extra: StepInput) -> None:
        """Apply ``extra`` (adapter pins) with one step, waiting for the driver role."""
        with self._driver_role():
            with self._cond:
                self._pending.pinned_adapters = extra.pinned_adapters
            self._step()

    def _step(self) -> None:
        """One hand-off and step; the caller holds the driver role. A failed step fails every
        call in flight and aborts all their requests, so the engine stays usable."""
        with self._cond:
            step_input, self._pending = self._pending, StepInput()
        try:
            result = self.driver.run(step_input)
        except BaseException as exc:
            error = EngineError(f"engine step failed: {exc!r}")
            error.__cause__ = exc
            with self._cond:
                for call in {id(c): c for c in self._calls.values()}.values():
                    call.error = error
                ids, self._calls = list(self._calls), {}
            for rid in ids + [r.request_id for r in step_input.adds]:
                self.driver.abort(rid)
            raise
        with self._cond:
            self._route(result)

    def _route(self, result: StepOutput) -> None:
        """Hand each ended request to its call and count progress; a call with a failed or
        timed-out request has its other requests aborted. Holds ``_cond`` and the driver role."""
        progress: dict[int, tuple[_Call, int, int]] = {}  # id(call) -> (call, finished, tokens)

        def count(request_id: str, finished: int, tokens: int) -> None:
            call = self._calls.get(request_id)
            if call is not None:
                _, f, t = progress.get(id(call), (call, 0, 0))
                progress[id(call)] = (call, f + finished, t + tokens)

        for delta in result.deltas:
            count(delta.request_id, 0, len(delta.token_ids))
        for completion in result.finished:
            count(completion.request_id, 1, 0)
        for counted, finished, tokens in progress.values():
            counted.progress.update(finished, tokens)
        for completion in result.finished:
            owner = self._calls.pop(completion.request_id, None)
            if owner is not None:
                owner.done[completion.request_id] = completion
        for completion in result.aborted:
            self._calls.pop(completion.request_id, None)
        timeout = self.config.request_timeout
        failures: list[tuple[str, BaseException]] = [(f.request_id, f.error) for f in result.failed]
        failures += [(c.request_id, RequestTimeoutError(
            f"request {c.request_id!r} passed request_timeout={timeout}s and was aborted")) for c in result.timed_out]
        for request_id, error in failures:
            failed = self._calls.pop(request_id, None)
            if failed is not None and failed.error is None:
                failed.error = error
                self._abort_call(failed)

    def _abort_call(self, call: _Call) -> None:
        """End every request of ``call`` still in the engine (the caller holds the driver role)."""
        for rid in call.order:
            if self._calls.pop(rid, None) is not None:
                self.driver.abort(rid)

    def _abandon(self, call: _Call) -> None:
        """An exception left ``call`` in this thread (Ctrl-C, a failed step): end its requests.
        If another thread drives now, the aborts wait for its next step."""
        with self._cond:
            unfinished = [rid for rid in call.order if self._calls.pop(rid, None) is not None]
            self._pending.adds = [r for r in self._pending.adds if r.request_id not in unfinished]
            if self._driving:
                self._pending.aborts.extend(unfinished)
                return
            self._driving = True
        try:
            for rid in unfinished:
                self.driver.abort(rid)
        finally:
            with self._cond:
                self._driving = False
                self._cond.notify_all()

    # ---- inspection ------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the grammar compile pools and the mask thread down (also done at interpreter exit)."""
        self.grammars.close()
        with self._driver_role():
            self.core.close()

    def assert_idle(self) -> None:
        """Raise ``AssertionError`` unless no request is left and every KV block is free."""
        with self._driver_role():
            self.core.assert_idle()

    def kv_cache_stats(self) -> KVCacheStats:
        with self._driver_role():
            return self.core.kv_cache_stats()

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache's unheld entries, so the next ``generate`` recomputes every
        prompt (benchmarks repeating a workload call it between passes). Pinned handles keep
        their blocks. Returns the number of blocks forgotten."""
        with self._driver_role():
            return self.core.reset_prefix_cache()


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    """One value for every prompt (a single value, or None), or a list / tuple of exactly ``count``."""
    if not isinstance(value, list | tuple):  # one value for all; its type is checked per request
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InvalidRequestError(f"{name}: got {len(values)} values for {count} prompts")
    return values
