"""The synchronous engine core: one step = schedule, execute, sample, update.

Scheduling ahead (``EngineConfig.async_scheduling``): each ``step`` launches the next step (its
schedule, inputs, forward and sampling queued on the device) before it reads back the one in
flight, whose sampled tokens the new step's inputs take from the device. On CUDA the host's work
(scheduling, inputs, read-back, detokenizing) then overlaps the device's instead of alternating
with it. Each ``step`` still returns one step's outputs. A step whose sampling reads tokens on the
host (grammars and other logits processors, penalties) launches its forward ahead and its sampling
once the step before it is read back and its tokens accepted, as vLLM does for structured output.
When a step ahead could not get its blocks, the core lets the step in flight finish first.

A step returns what happened as data (``CoreStepResult``): each sequence's progress, and the
waiting sequences found unable to ever run, with the error to end each one with. Those errors
are worded here and nowhere else.

``EngineCore`` is the only door to the scheduler, the KV cache manager and the model runner:
everything above it (the driver, the facades) adds, aborts, pins and steps through the
methods below and never touches their internals. Not thread-safe: one thread drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvloom.config import EngineConfig
from kvloom.errors import ConfigError, InvalidRequestError
from kvloom.kv_cache.block_pool import BlockId
from kvloom.kv_cache.manager import KVCacheManager, KVCacheStats
from kvloom.models.config import ModelConfig, load_model_config
from kvloom.models.dtype_choice import DTypeChoice
from kvloom.outputs import FinishReason
from kvloom.runner.model_runner import LaunchedSample, ModelRunner, StepLogits
from kvloom.scheduler.output import EngineCoreOutput, SchedulerOutput, Unrunnable
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter
    from kvloom.structured.timing import ConstrainedStepTimes


def resolve_max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    limit = model.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len ({config.max_model_len}) exceeds the model's max_position_embeddings ({limit})")
    return config.max_model_len


@dataclass(slots=True)
class CoreStepResult:
    """What one ``EngineCore.step`` did. The caller ends every ``unrunnable`` sequence (they are
    still queued) and takes over the pins of ``pinned``."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    """Per sequence that progressed, in step order: new tokens, and why it finished if it did."""
    unrunnable: dict[str, InvalidRequestError] = field(default_factory=dict)
    """Sequence id -> the error to end it with: waiting, it can never start as things stand."""

    @property
    def pinned(self) -> dict[str, list[int]]:
        """``pin_prefix`` sequence id -> the blocks pinned for its prompt as it finished. The
        caller owns these pins from now on (``EngineCore.unpin_prefix``)."""
        return {o.req_id: o.pinned_block_ids for o in self.outputs if o.pinned_block_ids is not None}


@dataclass(slots=True)
class _InFlight:
    """A step launched and not yet read back."""

    sched: SchedulerOutput
    sample: LaunchedSample


class EngineCore:
    """Owns the scheduler, KV manager and runner. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = load_model_config(config.model)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self._runner = ModelRunner(config, self.max_model_len)
        self._kv = KVCacheManager(
            self._runner.num_blocks, config.cache.block_size, enable_caching=config.cache.enable_prefix_caching
        )
        self._scheduler = Scheduler(config.scheduler, self._kv, self.max_model_len, config.lora.max_loras)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self._runner.device.type == "cuda")
        """Whether steps are scheduled one ahead (see the module docstring)."""
        self._in_flight: _InFlight | None = None
        self.num_steps_ahead = 0
        """Steps launched while another was in flight."""

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._kv.num_blocks

    @property
    def max_tokens_in_pool(self) -> int:
        return self._kv.num_blocks * self._kv.block_size

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue one sequence. Raises ``InvalidRequestError`` for one that could never run."""
        lora_hash = req.lora.content_hash if req.lora is not None else None
        if not self._scheduler.can_serve_lora(lora_hash):
            raise self._unrunnable_error(Unrunnable.ADAPTER_SLOTS_PINNED)
        self._scheduler.add_request(req)

    def finish_requests(self, req_ids: Sequence[str], reason: FinishReason = "abort") -> None:
        """End sequences wherever they are (abort, stop string, deadline); frees their blocks at once."""
        self._scheduler.finish_requests(list(req_ids), reason)

    def has_unfinished(self) -> bool:
        """Requests in flight, or a step whose results have not been read back."""
        return self._scheduler.has_unfinished() or self._in_flight is not None

    # ---- prefix pins and adapter pins --------------------------------------------------------
    def unpin_prefix(self, block_ids: Sequence[int]) -> None:
        """Release blocks pinned for a prefix handle (``EngineCoreOutput.pinned_block_ids``)."""
        self._kv.unpin([BlockId(b) for b in block_ids])

    def set_pinned_adapters(self, adapters: Sequence[LoRAAdapter]) -> dict[str, InvalidRequestError]:
        """Replace the pinned adapters. Returns the waiting sequences that can now never run (every
        slot pinned to another adapter), with the error to end each one with."""
        stuck = self._scheduler.set_pinned_loras({a.content_hash for a in adapters})
        self._runner.set_pinned_loras(list(adapters))
        return {seq_id: self._unrunnable_error(reason) for seq_id, reason in stuck.items()}

    def _unrunnable_error(self, reason: Unrunnable) -> InvalidRequestError:
        """The one wording of each reason a sequence can never run, for its caller."""
        if reason is Unrunnable.ADAPTER_SLOTS_PINNED:
            return InvalidRequestError(
                f"adapter: every one of the max_loras={self.config.lora.max_loras} adapter slots is pinned to "
                "another adapter, so this request could never run; unpin one or raise max_loras")
        return InvalidRequestError(
            f"max_tokens: this request cannot start while prefix handles pin {self._kv.num_pinned} of "
            f"the {self._kv.num_blocks} KV blocks; release a handle (PrefixHandle.release), lower "
            "max_tokens or the prompt, or raise num_kv_blocks")

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> CoreStepResult:
        """Run one step and report it; with ``async_scheduling``, launch the next one first."""
        scheduled: list[SchedulerOutput] = []  # every schedule this call makes: the report gathers their findings
        outputs = self._step_ahead(scheduled) if self.async_scheduling else self._step_now(scheduled)
        unrunnable = {seq_id: reason for sched in scheduled for seq_id, reason in sched.unrunnable.items()}
        return CoreStepResult(outputs, {seq_id: self._unrunnable_error(r) for seq_id, r in unrunnable.items()})

    def _step_now(self, scheduled: list[SchedulerOutput]) -> list[EngineCoreOutput]:
        """Schedule, execute, sample, update."""
        sched = self._schedule(scheduled)
        logits = self._runner.execute(sched)
        sampled = self._runner.sample(logits)
        return self._scheduler.update(sched, sampled)

    def _schedule(self, scheduled: list[SchedulerOutput], ahead: bool = False) -> SchedulerOutput:
        sched = self._scheduler.schedule(ahead=ahead)
        scheduled.append(sched)
        return sched

    def _step_ahead(self, scheduled: list[SchedulerOutput]) -> list[EngineCoreOutput]:
        """Launch the next step, then read back the one in flight (launched now if there is none)."""
        current = self._in_flight if self._in_flight is not None else self._launch(self._schedule(scheduled))
        self._in_flight = None
        deferred: tuple[SchedulerOutput, StepLogits] | None = None
        if self._scheduler.can_schedule_ahead():
            sched = self._schedule(scheduled, ahead=True)
            logits = self._runner.execute(sched, ahead=True)
            if sched.is_empty:  # nothing to run; the runner has dropped the finished requests' state
                self._scheduler.update(sched, self._runner.collect(self._runner.launch_sample(logits)))
            elif logits.needs_host_tokens:
                deferred = sched, logits
            else:
                self._in_flight = _InFlight(sched, self._runner.launch_sample(logits))
            if not sched.is_empty:
                self.num_steps_ahead += 1
        outputs = self._scheduler.update(current.sched, self._runner.collect(current.sample))
        if deferred is not None:
            ended = frozenset(o.req_id for o in outputs if o.finish_reason is not None)
            self._in_flight = _InFlight(deferred[0], self._runner.launch_sample(deferred[1], ended))
        return outputs

    def _launch(self, sched: SchedulerOutput) -> _InFlight:
        return _InFlight(sched, self._runner.launch_sample(self._runner.execute(sched)))

    # ---- observability ---------------------------------------------------------------------
    @property
    def dtype_choice(self) -> DTypeChoice:
        """The dtype the model and its KV cache run in, and why (``dtype="auto"`` decides by device and CPU)."""
        return self._runner.dtype_choice

    @property
    def kv_cache_dtype(self) -> str:
        """What the KV cache holds: the model's dtype, or ``int8`` (``kv_cache_dtype="int8"``)."""
        return str(self._runner.kv_dtype).removeprefix("torch.")

    @property
    def weight_layout(self) -> tuple[str, str]:
        """How the linear weights are held (``int8``, ``onednn-packed``, ...) and why (``layers.weight_layout``)."""
        layout = self._runner.model.weight_layout
        return (layout.name, layout.reason) if layout is not None else ("row-major", "the checkpoint's layout")

    @property
    def attention_backend(self) -> tuple[str, str]:
        """The attention backend's name and why it runs (``"auto"`` decides by device and compiler)."""
        backend = self._runner.attn_backend
        return backend.name, backend.reason

    @property
    def cuda_graph_sizes(self) -> tuple[int, ...]:
        """Decode batch sizes captured as CUDA graphs (empty when every step runs eagerly)."""
        graphs = self._runner.decode_graphs
        return tuple(graphs.sizes) if graphs is not None else ()

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting

    @property
    def num_preemptions(self) -> int:
        return self._scheduler.num_preemptions

    @property
    def processor_time_s(self) -> float:
        return self._runner.processor_time_s

    @property
    def num_constrained_steps(self) -> int:
        return self._runner.num_constrained_steps

    @property
    def constrained_step_times(self) -> ConstrainedStepTimes:
        """The runner's per-step processor and wall times of constrained steps (snapshots carry copies)."""
        return self._runner.constrained_step_times

    @property
    def num_lora_loads(self) -> int:
        """Adapters copied into a device slot so far (0 before any adapter ran)."""
        slots = self._runner.lora_slots
        return slots.num_loads if slots is not None else 0

    def resident_adapters(self) -> set[str]:
        """Content hashes of the adapters now in a device slot."""
        slots = self._runner.lora_slots
        return slots.resident if slots is not None else set()

    def kv_cache_stats(self) -> KVCacheStats:
        return self._kv.stats()

    def close(self) -> None:
        """Stop the runner's helper thread (idempotent). A step still in flight is dropped."""
        self._in_flight = None
        self._runner.close()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix nothing holds; returns the number of blocks forgotten."""
        return self._kv.reset_prefix_cache()

    def assert_idle(self) -> None:
        """Invariant once all work is done: no request queued or running, every block free,
        every refcount zero, and the runner holds state only for requests it will drop at the
        next step (a step in flight for ended requests is allowed: the next step drops it)."""
        # A step may still be in flight (scheduling ahead) for requests that ended since: their blocks
        # are free already, and the next step drops its tokens.
        assert not self._scheduler.requests, f"requests left: {sorted(self._scheduler.requests)}"
        assert not self._scheduler.waiting and not self._scheduler.running
        self._kv.check_all_free()
        leftover = set(self._runner.states) - self._scheduler.pending_finished_ids
        assert not leftover, f"runner still holds state for {sorted(leftover)}"
