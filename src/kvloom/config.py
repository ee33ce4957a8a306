"""Engine settings (pydantic: a bad value fails at construction, naming the field)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["auto", "float32", "bfloat16", "float16"]


class CacheConfig(BaseModel):
    """The paged KV cache.

    Its size comes from, in order: ``num_kv_blocks`` (exact), ``kv_cache_memory`` (bytes), or on
    GPU ``gpu_memory_utilization`` of the device after weights and a profiling pass; on CPU the
    default is ``DEFAULT_CPU_KV_BYTES``. The pool never holds more blocks than
    ``max_num_seqs`` full-length sequences could use.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1, le=1024)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory: int | None = Field(None, ge=1, description="Bytes for K and V of all layers.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    enable_prefix_caching: bool = Field(True, description="Reuse the KV of full blocks with the same prefix.")
    prefix_pin_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of the pool prefix handles may pin.")


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(128, ge=1, description="Most requests in one step.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Most tokens in one step (prefill chunks + decodes).")
    enable_chunked_prefill: bool = True


class LoRAConfig(BaseModel):
    """Multi-LoRA serving. Slot weights are allocated when the first adapter is loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_loras: int = Field(4, ge=1, description="Adapter slots on the device; also the most adapters in one step.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank accepted.")


class EngineConfig(BaseModel):
    """Everything ``LLM(model_dir, **config)`` and ``AsyncEngine.from_pretrained`` accept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path
    dtype: DType = "auto"
    """``auto``: on CPU bf16 with AMX / AVX512-BF16, else float32; on GPU the checkpoint's (``models/dtype_choice.py``)."""
    device: str = "auto"
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = Field(
        "auto", description="'cpu': decode attention in a C kernel compiled for this CPU on first use (cached); "
        "'torch': torch ops only; 'triton': the Triton kernels (CUDA). 'auto': triton on CUDA, cpu on CPU where "
        "a C compiler builds the kernel, torch otherwise.")
    cpu_gemm: Literal["auto", "onednn", "torch"] = Field(
        "auto", description="CPU linear layers: 'onednn' multiplies with weights prepacked for oneDNN, 'torch' "
        "calls F.linear (MKL in float32); 'auto' is oneDNN in float32 and bf16 where it can pack, torch otherwise.")
    quantization: Literal["int8"] | None = Field(
        None, description="'int8': every linear layer (the LM head included; not the embedding) holds int8 weights per "
        "output channel, quantized at load from the float checkpoint; activations stay float (dtype). CPU only, in "
        "float32 or bfloat16. None: the checkpoint's weights in dtype.")
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3"] = Field(
        "auto", description="'auto': the KV cache in the model's dtype. 'int8': each token's K and V rows per kv head "
        "quantized to int8 with a float32 scale (68 bytes a row of 64 values instead of 256 in float32): the same pool "
        "bytes hold ~3.8x the tokens (1.9x against bf16). CPU only (the C and torch attention paths). 'fp8_e4m3' is for "
        "GPUs with FP8, not built yet: refused with a message.")
    enforce_eager: bool = Field(
        False, description="Never capture CUDA graphs (on CUDA, decode-only steps otherwise replay one per batch size).")
    cuda_graph_sizes: tuple[Annotated[int, Field(ge=1, le=1024)], ...] | None = Field(
        None, min_length=1, description="Decode batch sizes to capture on CUDA; default 1, 2, 4 and multiples of 8 up to "
        "min(max_num_seqs, 256). Larger decode steps run eagerly.")
    async_scheduling: bool | None = Field(
        None, description="Schedule and launch each step while the one before it runs, one step ahead (the host's "
        "work then hides behind the device's). None: on for CUDA; off on CPU, where the forward runs on the engine "
        "thread itself and there is nothing to hide behind. A step with grammars, logits processors or penalties "
        "launches its forward ahead and samples once the step before it is read back.")
    warmup: bool = Field(
        False, description="CPU, oneDNN-packed linears: run every row-count bucket of every layer shape once at "
        "start, so no GEMM kernel is compiled on the request path and their memory is all taken before the first "
        "request (a long-running server's RSS is then flat). Costs start-up time (seconds for a 155M model on 2 "
        "cores; see docs/benchmarks.md). kvloom serve turns it on; off for scripts and notebooks.")
    max_model_len: int | None = Field(None, ge=1, description="Default: the model's max_position_embeddings.")
    seed: int = Field(0, ge=0, description="Seeds the RNG of unseeded random sampling.")
    grammar_backend: Literal["xgrammar", "outlines"] = Field(
        "xgrammar", description="Default backend of response_format (a request may pick its own)."
    )
    grammar_compile_timeout: float = Field(
        60.0, gt=0.0, description="Seconds a request may wait for its grammar to compile before it fails."
    )
    tool_call_format: Literal["hermes", "llama"] | None = Field(
        None, description="The checkpoint's tool-call syntax; default: read from its chat template and config.")
    request_timeout: float | None = Field(
        None, gt=0.0, description="Default deadline of every request in seconds from submit (None: none). "
        "A request past it is aborted, its blocks freed, and it raises RequestTimeoutError.")
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRAConfig = LoRAConfig()

    @classmethod
    def from_kwargs(cls, model: str | Path, **kwargs: object) -> EngineConfig:
        """Build from flat keyword arguments: cache, scheduler and LoRA fields may be given at top level."""
        cache = {k: kwargs.pop(k) for k in list(kwargs) if k in CacheConfig.model_fields}
        sched = {k: kwargs.pop(k) for k in list(kwargs) if k in SchedulerConfig.model_fields}
        lora = {k: kwargs.pop(k) for k in list(kwargs) if k in LoRAConfig.model_fields}
        return cls.model_validate(
            {"model": model, **kwargs, "cache": CacheConfig.model_validate(cache),
             "scheduler": SchedulerConfig.model_validate(sched), "lora": LoRAConfig.model_validate(lora)}
        )


DEFAULT_CPU_KV_BYTES = 4 * 2**30
