"""CUDA graphs for decode-only steps: one captured forward per batch-size bucket.

A decode step launches a few hundred small kernels (every layer's GEMMs, norms, rotary, the
K/V store and attention) for a handful of tokens; on a GPU the launches, not the math, bound
it. A captured graph replays them all with one launch. Graphs fix shapes and addresses, so:

- The step's inputs live in static device buffers sized for the largest bucket (``StaticDecodeInputs``).
  A step of ``n`` sequences runs the graph of the smallest bucket ``B >= n``; rows ``[n, B)`` are
  padding: token 0 at position 0, slot -1 (``store_kv`` skips it) and length 0 (attention reads
  no key and writes zeros). Padding rows' hidden states are never read.
- Every graph is captured with the attention metadata's host lists at their largest
  (``max_model_len``), so kernels whose launch parameters depend on them (the decode kernel's key
  tile) take the same ones on every replay; only device tensors change between replays.
- Only backends whose every kernel reads its lengths on the device may be captured
  (``AttentionBackend.supports_cuda_graphs``); the torch backend plans on the host and never is.
- A step with LoRA tokens, a prefill, or more sequences than the largest bucket runs eagerly.

Graphs share one memory pool and are captured largest first, so smaller ones reuse its memory.

The capture itself goes through a :class:`GraphCapture`. :class:`CudaGraphCapture` is the real one;
:class:`EagerCapture` "replays" by calling the forward again on the same static buffers, which
runs the padding and buffer logic on any device (the CPU tests use it) without capturing anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvloom.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
"""``(input_ids [B], positions [B], meta) -> hidden [B, hidden]``: the model over its KV caches."""


def default_capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    """Buckets 1, 2, 4, then multiples of 8 (as vLLM: padding wastes at most 7 rows), up to the
    first that holds ``min(max_num_seqs, limit)`` sequences."""
    top = max(1, min(max_num_seqs, limit))
    sizes: list[int] = []
    for size in (1, 2, 4, *range(8, top + 8, 8)):
        sizes.append(size)
        if size >= top:
            break
    return sizes


class CapturedStep(Protocol):
    """One bucket's captured forward."""

    def replay(self) -> torch.Tensor:
        """Run the forward on the static buffers as they are now; returns ``hidden [B, hidden]``."""
        ...


class GraphCapture(Protocol):
    """Turns a forward over static buffers into something replayable."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedStep:
        """Capture ``fn`` (which reads only the static buffers); ``fn`` may run while capturing."""
        ...


@dataclass(slots=True)
class _CudaStep:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class CudaGraphCapture:
    """``torch.cuda.CUDAGraph`` capture into one pool shared by every bucket (capture largest first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedStep:
        # Warm up on a side stream first (Triton compiles and autotunes, cuBLAS picks its kernels
        # and allocates its workspace): none of that may happen inside the capture.
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        return _CudaStep(graph, output)


@dataclass(slots=True)
class _EagerStep:
    fn: Callable[[], torch.Tensor]

    def replay(self) -> torch.Tensor:
        return self.fn()


class EagerCapture:
    """Captures nothing: each replay calls the forward again over the same static buffers."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedStep:
        return _EagerStep(fn)


@dataclass(slots=True)
class StaticDecodeInputs:
    """The device buffers every graph reads, sized for ``max_batch`` sequences.

    Invariant after :meth:`load` of ``n`` rows for bucket ``B``: rows ``[0, n)`` hold the step's
    inputs and rows ``[n, B)`` are padding (id 0, position 0, slot -1, length 0). Block-table rows
    are written only up to the step's widest table; entries past a row's
    ``ceil(seq_len / block_size)`` are never read.
    """

    input_ids: torch.Tensor
    """``[max_batch]`` int64."""
    positions: torch.Tensor
    """``[max_batch]`` int64."""
    slot_mapping: torch.Tensor
    """``[max_batch]`` int64."""
    seq_lens: torch.Tensor
    """``[max_batch]`` int32."""
    block_tables: torch.Tensor
    """``[max_batch, max_blocks_per_seq]`` int32."""
    query_start_loc: torch.Tensor
    """``[max_batch + 1]`` int32, ``arange``: every row is one query token."""

    @classmethod
    def allocate(cls, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> StaticDecodeInputs:
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            input_ids=zeros(max_batch, dtype=torch.int64),
            positions=zeros(max_batch, dtype=torch.int64),
            slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
            seq_lens=zeros(max_batch, dtype=torch.int32),
            block_tables=zeros(max_batch, max_blocks_per_seq, dtype=torch.int32),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
        )

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def metadata(self, batch: int, max_seq_len: int) -> AttentionMetadata:
        """Metadata over rows ``[0, batch)`` of the buffers; host lists claim every row is ``max_seq_len`` long."""
        return AttentionMetadata(
            num_decodes=batch,
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            max_query_len=1,
            max_seq_len=max_seq_len,
            query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=[max_seq_len] * batch,
        )

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, bucket: int) -> None:
        """Copy a decode-only step of ``n = len(input_ids)`` rows in, and pad rows ``[n, bucket)``."""
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if n < bucket:
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.slot_mapping[n:bucket].fill_(-1)
            self.seq_lens[n:bucket].zero_()


@dataclass(slots=True)
class DecodeGraphs:
    """Captured decode forwards by bucket, and the static inputs they read.

    ``run`` takes any decode-only step that :meth:`fits`; the caller keeps the other steps eager.
    """

    sizes: list[int]
    """Captured buckets, ascending."""
    static: StaticDecodeInputs
    steps: dict[int, CapturedStep] = field(default_factory=dict)
    capture_s: float = 0.0
    """Seconds the capture took (warm-ups included)."""
    num_replays: int = 0
    """Steps run through a graph so far."""

    @classmethod
    def capture(cls, forward: DecodeForward, sizes: Sequence[int], *, max_model_len: int, block_size: int,
                device: torch.device, capturer: GraphCapture) -> DecodeGraphs:
        """Capture ``forward`` for every bucket in ``sizes``, largest first, over fresh static buffers.

        Every row is padding while capturing (slot -1, length 0), so capture writes no KV.
        """
        if not sizes or min(sizes) < 1:
            raise ValueError(f"capture sizes must be positive, got {list(sizes)}")
        ordered = sorted(set(sizes))
        max_blocks = -(-max_model_len // block_size)
        static = StaticDecodeInputs.allocate(ordered[-1], max_blocks, device)
        graphs = cls(sizes=ordered, static=static)
        start = time.perf_counter()
        for batch in reversed(ordered):
            meta = static.metadata(batch, max_model_len)
            ids, pos = static.input_ids[:batch], static.positions[:batch]

            def step(ids: torch.Tensor = ids, pos: torch.Tensor = pos, meta: AttentionMetadata = meta) -> torch.Tensor:
                return forward(ids, pos, meta)

            graphs.steps[batch] = capturer.capture(step)
        graphs.capture_s = time.perf_counter() - start
        logger.info("kvloom: captured decode graphs for batch sizes %s in %.2f s", ordered, graphs.capture_s)
        return graphs

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured batch size holding ``num_seqs`` rows; ``None`` if none does."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def fits(self, meta: AttentionMetadata) -> bool:
        """Whether the step is decode-only (one token a sequence) and a bucket holds it."""
        return (
            meta.num_decodes == meta.num_seqs
            and 0 < meta.num_seqs <= self.max_batch
            and meta.block_tables.shape[1] <= self.static.max_blocks_per_seq
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the step's bucket over its inputs; returns ``hidden [n, hidden]`` (a view of the
        graph's output, valid until the next replay). The step must :meth:`fit`."""
        n = meta.num_seqs
        bucket = self.bucket(n)
        if bucket is None or not self.fits(meta):
            raise ValueError(f"a step of {n} sequences ({meta.num_decodes} decodes) does not fit the decode graphs")
        self.static.load(input_ids, positions, meta, bucket)
        hidden = self.steps[bucket].replay()
        self.num_replays += 1
        return hidden[:n]
