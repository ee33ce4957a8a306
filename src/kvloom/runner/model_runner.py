"""Owns the model, the KV tensors and the runner-side request states; runs one forward per step."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvloom.config import EngineConfig
from kvloom.layers.attention import CpuAttentionBackend, get_attention_backend
from kvloom.layers.cpu_fusion import FusesOnCpu
from kvloom.layers.gemm_warmup import warm_up_packed_linears
from kvloom.layers.host_copy import tensor_on
from kvloom.layers.linear import Linear
from kvloom.layers.sampler import Sampler, SamplerOutput
from kvloom.models.config import load_model_config
from kvloom.models.dtype_choice import DTypeChoice, choose_dtype
from kvloom.models.loader import load_model
from kvloom.outputs import FinishReason
from kvloom.runner.decode_graphs import (
    CudaGraphCapture,
    DecodeGraphs,
    GraphCapture,
    default_capture_sizes,
)
from kvloom.runner.inputs import ModelInputs, build_inputs
from kvloom.runner.kv_tensors import KVCaches, allocate_kv_caches, choose_kv_dtype, choose_num_blocks
from kvloom.runner.logits_processing import (
    FilledMasks,
    accept_tokens,
    apply_processors,
    fill_masks,
    has_masks,
)
from kvloom.runner.sampling import build_sampling_metadata, needs_host_tokens, to_token_logprobs
from kvloom.runner.state import PENDING_TOKEN, CachedRequestState, make_generator
from kvloom.scheduler.output import SampledTokens, SchedulerOutput
from kvloom.structured.timing import ConstrainedStepTimes

if TYPE_CHECKING:
    from kvloom.layers.attention_metadata import AttentionMetadata
    from kvloom.lora.adapter import LoRAAdapter
    from kvloom.lora.slots import LoRASlots

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(slots=True)
class StepLogits:
    """A forward's result: logits of the sampling rows, and who they belong to."""

    logits: torch.Tensor
    """``[num_sampling, vocab]`` float32."""
    states: list[CachedRequestState]
    masks: Future[FilledMasks] | None = None
    """The sampling rows' grammar bitmask, filled on the mask thread while the forward ran."""
    needs_host_tokens: bool = False
    """Sampling reads the sequences' tokens on the host (processors, penalties: ``needs_host_tokens``)."""
    started: float = 0.0
    """``time.perf_counter()`` when ``execute`` began this step."""


@dataclass(slots=True)
class LaunchedSample:
    """A step's sampling, queued on the device; ``ModelRunner.collect`` reads it back.

    Until then each sampling row's sequence holds a ``PENDING_TOKEN`` at ``slots[i]`` of its
    ``token_ids``, and the next step's inputs take that token from ``token_ids`` here.
    """

    states: list[CachedRequestState]
    out: SamplerOutput | None
    """``token_ids`` ``[len(states)]`` int64 on the device, plus logprobs when asked for."""
    slots: list[int]
    """Per row, the index of its placeholder in its sequence's ``token_ids``."""
    reasons: dict[str, FinishReason]
    constrained: bool
    ended: frozenset[str] = frozenset()
    """Sequences that had ended before this sampling launched (it was scheduled ahead of their end):
    their processors are left alone, and the scheduler drops their tokens."""
    started: float = 0.0
    """When the step's ``execute`` began (``time.perf_counter()``)."""
    processor_s: float = 0.0
    """Seconds this step has spent in logits processors so far (mask fill and apply; ``collect`` adds the accepts)."""


class ModelRunner:
    """Loads weights, sizes and allocates the paged KV cache, executes scheduled steps.

    Engine-thread only. ``execute`` then ``sample`` once per step.
    """

    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.block_size = config.cache.block_size
        self.attn_backend = get_attention_backend(config.attention_backend, self.device)
        checkpoint_dtype = load_model_config(config.model).torch_dtype
        self.dtype_choice: DTypeChoice = choose_dtype(config.dtype, checkpoint_dtype, self.device)
        logger.info("kvloom: running in %s (%s)", self.dtype_choice.name, self.dtype_choice.reason)
        self.model, self.model_config = load_model(
            config.model, attn_backend=self.attn_backend, dtype=self.dtype_choice.name, device=self.device,
            cpu_gemm=config.cpu_gemm, quantization=config.quantization,
        )
        if self.model.weight_layout is not None:
            logger.info("kvloom: linear weights %s (%s)", self.model.weight_layout.name, self.model.weight_layout.reason)
        if isinstance(self.attn_backend, CpuAttentionBackend):
            self._fuse_elementwise_on_cpu()
        if config.warmup:
            self._warm_up_gemms()
        self.dtype = self.model_config.torch_dtype
        self.kv_dtype = choose_kv_dtype(config.kv_cache_dtype, self.dtype, self.device)
        """The KV tensors' dtype: the model's, or int8 (``kv_cache_dtype``)."""
        available = self._profile_available_bytes(max_model_len) if self.device.type == "cuda" else None
        self.num_blocks = choose_num_blocks(
            config.cache, self.model_config, self.kv_dtype, self.device, max_model_len,
            config.scheduler.max_num_seqs, available,
        )
        self.kv_caches: KVCaches = allocate_kv_caches(
            self.model_config, self.num_blocks, self.block_size, self.kv_dtype, self.device
        )
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.sampler = Sampler()
        # Unseeded sampling draws from the engine's own RNG, never torch's global one.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.states: dict[str, CachedRequestState] = {}
        self.processor_time_s = 0.0
        """Time spent in logits processors (masks, on the mask thread or not; accepts) over all steps; with
        ``num_constrained_steps``, the cost of grammars per step."""
        self.num_constrained_steps = 0
        self.constrained_step_times = ConstrainedStepTimes()
        """Per constrained step (the last 1000): time in processors and the step's wall time, execute to
        collect; read by ``engine.stats()`` from the event loop (thread-safe)."""
        self.lora_slots: LoRASlots | None = None
        """Adapter slots, allocated when the first adapter is needed (base-only engines never pay)."""
        self._last_sample: LaunchedSample | None = None
        """The latest sampling launched: a step scheduled ahead reads its placeholders' tokens from it."""
        self._mask_thread: ThreadPoolExecutor | None = None
        """Fills grammar bitmasks alongside the forward; started by the first constrained step."""
        logger.info("kvloom: %d KV blocks of %d tokens on %s, in %s", self.num_blocks, self.block_size, self.device,
                    str(self.kv_dtype).removeprefix("torch."))
        self.max_model_len = max_model_len
        self.decode_graphs: DecodeGraphs | None = None
        """Captured decode steps (CUDA, unless ``enforce_eager``); ``None``: every step runs eagerly."""
        if self.device.type == "cuda" and not config.enforce_eager:
            if self.attn_backend.supports_cuda_graphs:
                self.capture_decode_graphs(CudaGraphCapture(self.device))
            else:
                logger.info("kvloom: no CUDA graphs: the %r attention backend plans on the host", self.attn_backend.name)

    def _warm_up_gemms(self) -> None:
        """``EngineConfig.warmup``: compile every row-count kernel of the packed linears now, not on
        the request path (the LM head up to ``max_num_seqs`` rows, the rest up to the step's tokens)."""
        began = time.perf_counter()
        sched = self.config.scheduler
        step_rows = max(sched.max_num_batched_tokens, sched.max_num_seqs)
        head = getattr(self.model, "lm_head", None)
        layers = [(m, sched.max_num_seqs if m is head else step_rows)
                  for m in self.model.modules() if isinstance(m, Linear)]
        count = warm_up_packed_linears(layers)
        logger.info("kvloom: warmed up %d packed GEMM shapes in %.2f s", count, time.perf_counter() - began)

    def _fuse_elementwise_on_cpu(self) -> None:
        """With the C attention kernel built, the norms, the gated activation and the rotary embedding take
        their C kernels too (same compiler, same cache); where those cannot be built, they stay on torch,
        and the log says why."""
        from kvloom.kernels.native import NativeBuildError

        try:
            for module in self.model.modules():
                if isinstance(module, FusesOnCpu):
                    module.fuse_on_cpu()
        except NativeBuildError as exc:
            logger.warning("kvloom: norms, activations and rotary embeddings stay on torch: %s", exc)

    # ---- decode graphs -------------------------------------------------------------------
    @torch.inference_mode()
    def capture_decode_graphs(self, capturer: GraphCapture) -> DecodeGraphs:
        """Capture the decode forward for the configured batch sizes (after the KV caches exist:
        graphs record their addresses). CUDA does this at start-up; tests pass an ``EagerCapture``."""
        sizes = self.config.cuda_graph_sizes or default_capture_sizes(self.config.scheduler.max_num_seqs)
        self.decode_graphs = DecodeGraphs.capture(
            self._model_forward, sizes, max_model_len=self.max_model_len, block_size=self.block_size,
            device=self.device, capturer=capturer,
        )
        return self.decode_graphs

    def _model_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids, positions, self.kv_caches, meta)
        return hidden

    # ---- state ---------------------------------------------------------------------------
    def _apply(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            self.states.pop(rid, None)
        for new in sched.new_reqs:
            self.states[new.req_id] = CachedRequestState(
                req_id=new.req_id, token_ids=list(new.token_ids), num_prompt_tokens=new.num_prompt_tokens,
                params=new.params, block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                generator=make_generator(new.params.seed, self.device), processors=new.processors,
                lora=new.lora,
            )
        for cached in sched.cached_reqs:
            state = self.states[cached.req_id]
            if cached.resumed:
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ---- one step ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, ahead: bool = False) -> StepLogits:
        """Run the forward over every scheduled token; return logits of the sampling rows.

        ``ahead``: the step before it is still in flight, so its sequences' processors have not yet
        accepted their last tokens: their masks are filled when its sampling launches, not now."""
        started = time.perf_counter()
        self._apply(sched)
        if sched.is_empty:
            return StepLogits(torch.empty(0, 0), [], started=started)
        self._copy_blocks(sched.blocks_to_copy)
        states = [self.states[rid] for rid in sched.num_scheduled_tokens]
        inputs = build_inputs(states, sched.num_scheduled_tokens, self.block_size, self.device)
        sampling = [inputs.req_order[r] for r in inputs.sample_rows]
        masks = None if ahead else self._fill_masks_async(sampling)
        try:
            self._fill_pending(inputs)
            self._route_lora(inputs.req_order, sched.num_scheduled_tokens)
            logits = self._forward(inputs)
        except BaseException:
            if masks is not None:
                masks.result()  # the mask thread must be done with these processors before they go
            raise
        for s in states:
            s.num_computed_tokens += sched.num_scheduled_tokens[s.req_id]
        return StepLogits(logits, sampling, masks, needs_host_tokens(sampling), started)

    def _fill_pending(self, inputs: ModelInputs) -> None:
        """Write the previous step's sampled tokens, still on the device, into this step's inputs
        where the sequences' placeholders stand: no wait for that step to finish."""
        if not inputs.pending_states:
            return
        last = self._last_sample
        assert last is not None and last.out is not None, "a placeholder with no sampling in flight"
        row_of = {id(s): i for i, s in enumerate(last.states)}
        rows = [row_of[id(s)] for s in inputs.pending_states]
        index = tensor_on(inputs.pending_index, torch.int64, self.device)
        inputs.input_ids.index_copy_(0, index, last.out.token_ids[tensor_on(rows, torch.int64, self.device)])

    def _fill_masks_async(self, sampling: list[CachedRequestState]) -> Future[FilledMasks] | None:
        """Start filling the sampling rows' grammar bitmask on the mask thread (it depends only on
        the tokens accepted so far), so it overlaps the forward instead of following it."""
        if not has_masks(sampling):
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="kvloom-masks")
        return self._mask_thread.submit(fill_masks, sampling, self.model_config.vocab_size)

    def close(self) -> None:
        """Stop the mask thread (idempotent); the runner may still run steps afterwards, without it."""
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=True)
            self._mask_thread = None

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        graphs = self.decode_graphs
        lora_active = self.lora_slots is not None and self.lora_slots.context.mapping is not None
        if graphs is not None and not lora_active and graphs.fits(inputs.attn):
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.attn)
        else:
            hidden = self._model_forward(inputs.input_ids, inputs.positions, inputs.attn)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def sample(self, step: StepLogits) -> SampledTokens:
        """Sample one token per sampling row and append it to the runner's own state."""
        return self.collect(self.launch_sample(step))

    @torch.inference_mode()
    def launch_sample(self, step: StepLogits, ended: frozenset[str] = frozenset()) -> LaunchedSample:
        """Queue the sampling of one token per sampling row; each row's sequence gets a placeholder
        until ``collect``. Steps with logits processors or penalties read the sequences' tokens on
        the host (``needs_host_tokens``): a step scheduled ahead launches its sampling only after the
        step before it is collected, and ``ended`` names the sequences that ended meanwhile."""
        if not step.states:
            return LaunchedSample([], None, [], {}, False)
        meta = build_sampling_metadata(step.states, self.eos_token_ids, self.device, self.generator)
        constrained = any(s.processors for s in step.states)
        reasons: dict[str, FinishReason] = {}
        raw_logprobs = None
        spent = 0.0
        if constrained:
            # Logprobs are of the model's own distribution, before masks and user processors.
            if meta.max_num_logprobs is not None:
                raw_logprobs = step.logits.float().log_softmax(dim=-1)
            masks = step.masks.result() if step.masks is not None else None
            start = time.perf_counter()
            reasons = apply_processors(step.logits, step.states, masks, ended)
            spent = time.perf_counter() - start + (masks.seconds if masks is not None else 0.0)
            self.processor_time_s += spent
        out = self.sampler(step.logits, meta, raw_logprobs)
        slots = []
        for s in step.states:
            slots.append(len(s.token_ids))
            s.token_ids.append(PENDING_TOKEN)
        self._last_sample = LaunchedSample(step.states, out, slots, reasons, constrained, ended, step.started, spent)
        return self._last_sample

    @torch.inference_mode()
    def collect(self, launched: LaunchedSample) -> SampledTokens:
        """Read a launched sampling back (waits for its step on the device) and put each token in
        place of its placeholder. Launches are collected in order."""
        if launched.out is None:
            return SampledTokens([], [])
        token_ids: list[int] = launched.out.token_ids.tolist()
        for s, slot, tok in zip(launched.states, launched.slots, token_ids, strict=True):
            s.token_ids[slot] = tok
        if self._last_sample is launched:
            self._last_sample = None
        if launched.constrained:
            start = time.perf_counter()
            accept_tokens(launched.states, token_ids, launched.reasons, launched.ended)
            end = time.perf_counter()
            self.processor_time_s += end - start
            self.num_constrained_steps += 1
            self.constrained_step_times.record(launched.processor_s + end - start, end - launched.started)
        return SampledTokens(
            req_ids=[s.req_id for s in launched.states],
            token_ids=token_ids,
            logprobs=to_token_logprobs(launched.states, launched.out),
            finish_reasons=launched.reasons,
        )

    # ---- LoRA ----------------------------------------------------------------------------
    def _slots(self) -> LoRASlots:
        if self.lora_slots is None:
            from kvloom.lora.slots import LoRASlots

            lora = self.config.lora
            self.lora_slots = LoRASlots(self.model, lora.max_loras, lora.max_lora_rank)
        return self.lora_slots

    def set_pinned_loras(self, adapters: list[LoRAAdapter]) -> None:
        """Keep these adapters resident: loaded now where a slot is free, never evicting an
        adapter a request in flight runs with (those keep their slot until they end)."""
        if adapters or self.lora_slots is not None:
            in_use = {s.lora.content_hash for s in self.states.values() if s.lora is not None}
            self._slots().set_pinned({a.content_hash: a for a in adapters}, in_use)

    def _route_lora(self, order: list[CachedRequestState], num_scheduled: dict[str, int]) -> None:
        """Put this step's adapters in slots and route each token to its request's slot.
        A step without adapter requests sets no mapping: the forward does no LoRA work."""
        adapters = {s.lora.content_hash: s.lora for s in order if s.lora is not None}
        if not adapters:
            if self.lora_slots is not None:
                self.lora_slots.set_mapping(None)
            return
        from kvloom.lora.mapping import LoRAMapping

        slots = self._slots()
        slot_of = slots.activate(list(adapters), adapters)
        mapping = LoRAMapping.from_request_slots(
            [slot_of[s.lora.content_hash] if s.lora is not None else -1 for s in order],
            [num_scheduled[s.req_id] for s in order], self.device,
        )
        slots.set_mapping(mapping)

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = tensor_on([p[0] for p in pairs], torch.int64, self.device)
        dst = tensor_on([p[1] for p in pairs], torch.int64, self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    # ---- sizing --------------------------------------------------------------------------
    @torch.inference_mode()
    def _profile_available_bytes(self, max_model_len: int) -> int:
        """GPU: run the largest step once, then what ``gpu_memory_utilization`` leaves is for KV."""
        from kvloom.params import SamplingParams

        num_tokens = self.config.scheduler.max_num_batched_tokens
        seq_len = min(num_tokens, max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        tmp_caches = allocate_kv_caches(
            self.model_config, num_seqs * blocks_per_seq, self.block_size, self.dtype, self.device
        )
        states = [
            CachedRequestState(
                f"profile-{i}", [0] * seq_len, seq_len, SamplingParams(),
                list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), 0, None,
            )
            for i in range(num_seqs)
        ]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        inputs = build_inputs(states, {s.req_id: seq_len for s in states}, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, tmp_caches, inputs.attn)
        self.model.compute_logits(hidden[inputs.logits_indices])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        tmp_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in tmp_caches)
        del tmp_caches, hidden, inputs
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        budget = int(total * self.config.cache.gpu_memory_utilization) - used_by_others - (peak - tmp_bytes)
        from kvloom.lora.slots import slot_bytes

        # LoRA slots are allocated on first use; their memory is set aside now.
        budget -= slot_bytes(self.model_config, self.config.lora.max_loras, self.config.lora.max_lora_rank, self.dtype)
        return max(0, budget)
