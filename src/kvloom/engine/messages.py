"""What crosses between the event loop and the engine thread: plain data, at step boundaries.

The loop gathers everything the application did since the last step into one ``StepInput``;
the engine thread applies it through ``EngineCore`` (its only door to the scheduler, the KV
manager and the runner), runs one step if there is work, and answers with a ``StepOutput``.
Neither side touches the other's live state: a ``NewRequest`` is owned by the engine thread
once handed over, and a ``StepOutput`` by the loop once returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvloom.errors import EngineError, InvalidRequestError
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion, StreamChunk
from kvloom.params import SamplingParams
from kvloom.tools.request import ToolRequest

if TYPE_CHECKING:
    from concurrent.futures import Future

    from kvloom.lora.adapter import LoRAAdapter
    from kvloom.structured.compiler import CompiledGrammar
    from kvloom.structured.timing import StepTimesSample


@dataclass(slots=True)
class NewRequest:
    """A validated, tokenized request on its way to the engine thread."""

    request_id: str
    """The parent id; its ``n`` sequences are ``request_id`` (n == 1) or ``request_id#i``."""
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    """Smaller is more important (vLLM's convention); ties go first come, first served."""
    arrival_time: float = 0.0
    """``time.monotonic()`` at submit: TTFT, ordering and the deadline count from here."""
    deadline: float | None = None
    """``time.monotonic()`` after which the request is aborted as timed out; None: never."""
    cache_salt: str | None = None
    """Requests with different salts never share cached KV."""
    pin_prefix: bool = False
    """A ``cache_prefix`` request: when its prefill finishes, the whole cached blocks of its
    prompt are pinned (before its own blocks are freed) and reported in ``StepOutput.pinned``."""
    grammar: Future[CompiledGrammar] | None = None
    """Its ``response_format``, compiling: the request waits on the engine thread until it is ready."""
    lora: LoRAAdapter | None = None
    """Its LoRA adapter object (None: the base model). Captured at submit, so unloading or
    reloading the name never changes a request already submitted."""
    tools: ToolRequest | None = None
    """Its tools (``tools=``): the output's calls are parsed out when it finishes."""


@dataclass(slots=True)
class StepInput:
    """Everything to apply before the next step, in this order: adapters, unpins, adds, aborts
    (adds before aborts, so an abort may follow its own add in the same hand-off)."""

    adds: list[NewRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    """Parent request ids to end with ``finish_reason="abort"``; unknown or finished ids are ignored."""
    unpins: list[list[int]] = field(default_factory=list)
    """Block lists of released prefix handles: each becomes ordinary (evictable) cached blocks."""
    pinned_adapters: list[LoRAAdapter] | None = None
    """The new set of pinned adapters; None leaves it unchanged."""

    def is_empty(self) -> bool:
        return not (self.adds or self.aborts or self.unpins or self.pinned_adapters is not None)


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """The engine's counters as of the end of a step (for ``stats()`` and admission control)."""

    num_running: int
    num_waiting: int
    """Sequences that hold no slot yet: queued, preempted, waiting for a grammar, or forks
    waiting for their first choice's prompt."""
    num_preemptions: int
    num_timeouts: int
    """Requests ended by their deadline so far."""
    kv_stats: KVCacheStats
    processor_time_s: float
    """Total time in logits processors so far (grammar masks and accepts)."""
    num_constrained_steps: int
    """Steps so far in which some sequence had a logits processor."""
    constrained_step_times: StepTimesSample | None = None
    """Per-step processor and wall times of the last constrained steps (a copy)."""


@dataclass(slots=True)
class RequestFailure:
    """A request that ended in an error before or while running; nothing of it stays in the engine."""

    request_id: str
    error: InvalidRequestError | EngineError


@dataclass(slots=True)
class StepOutput:
    """What one ``EngineDriver.run`` produced. Every request id appears in at most one of
    ``finished``, ``aborted``, ``timed_out`` and ``failed``, once, when it ends."""

    snapshot: EngineSnapshot
    has_unfinished: bool
    """Whether the engine thread still holds work (another step is due without new input)."""
    deltas: list[StreamChunk] = field(default_factory=list)
    """New tokens and text per sequence, in step order, as its request's stream gets them
    (``request_id`` the parent's id, ``index`` the choice, no ``usage``)."""
    finished: list[Completion] = field(default_factory=list)
    aborted: list[Completion] = field(default_factory=list)
    """What the requests aborted this step had produced (``finish_reason="abort"``)."""
    timed_out: list[Completion] = field(default_factory=list)
    """What the requests whose deadline passed had produced; their blocks are freed."""
    pinned: dict[str, list[int]] = field(default_factory=dict)
    """``pin_prefix`` request id -> the blocks pinned for it. The loop owns these pins from
    now on: it must unpin them (a later ``StepInput.unpins``) even if nobody claims them."""
    failed: list[RequestFailure] = field(default_factory=list)
    """Requests that failed (grammar did not compile, a processor factory raised, an adapter
    that can never get a slot, the detokenizer raised on its output), with the error for their caller."""
