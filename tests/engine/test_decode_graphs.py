"""Decode steps through captured graphs: padded to a bucket, they give exactly the eager tokens.

On CPU nothing can be captured, so these tests hand the runner an ``EagerCapture``: every "replay"
runs the forward again over the same static buffers, with the same padding and the same metadata
(host lists claiming ``max_model_len``) that a CUDA graph is captured with. That is everything a
graph adds but the capture itself: static buffers, bucketing, padding rows (slot -1, length 0)
and the choice of which steps may replay. The attention backend is Triton's (interpreted on CPU),
the one CUDA captures. The CUDA test at the end captures for real where a GPU is present.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules:  # interpreted only if set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvloom import LLM, SamplingParams
from kvloom.runner.decode_graphs import DecodeGraphs, EagerCapture, StaticDecodeInputs, default_capture_sizes
from kvloom.runner.inputs import build_inputs
from kvloom.runner.state import CachedRequestState

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
PROMPTS = [[5, 9, 17, 3, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47],
           [8, 8, 8, 1], [60, 61, 62]]


def _llm(model: Path, **config: object) -> LLM:
    # 16 blocks of 4 tokens: sequences span several blocks and block 0 is in use (padding rows
    # point their tables at it, so a padding row that wrote or read KV would show).
    return LLM(model, device="cpu", dtype="float32", attention_backend="triton", block_size=4, num_kv_blocks=40,
               enable_prefix_caching=False, **config)


def _run(llm: LLM, prompts: list[list[int]],
         params: SamplingParams | list[SamplingParams] = GREEDY) -> list[tuple[list[int], list[float]]]:
    """Each request's tokens and the logprob of each."""
    results = llm.generate(prompts, params, use_tqdm=False)
    return [(r.token_ids, [lp.logprob for lp in r.logprobs or []]) for r in results]


def _assert_same(got: list[tuple[list[int], list[float]]], want: list[tuple[list[int], list[float]]]) -> None:
    """Same tokens; logprobs equal up to float32 rounding (a padded batch's GEMMs may block differently)."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, abs=1e-5)


def test_default_capture_sizes_cover_max_num_seqs_with_at_most_seven_rows_of_padding() -> None:
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(3) == [1, 2, 4]
    assert default_capture_sizes(9) == [1, 2, 4, 8, 16]
    assert default_capture_sizes(128) == [1, 2, 4, *range(8, 129, 8)]
    assert default_capture_sizes(1000)[-1] == 256  # larger decode steps run eagerly
    for n in range(1, 257):
        sizes = default_capture_sizes(n)
        bucket = next(s for s in sizes if s >= n)
        assert bucket - n <= 7 or n <= 4


def test_static_inputs_pad_every_row_past_the_step() -> None:
    static = StaticDecodeInputs.allocate(8, 5, torch.device("cpu"))
    states = [
        CachedRequestState(f"r{i}", list(range(1, 7 + i)), 3, GREEDY, [i + 1, i + 9], 5 + i, None) for i in range(3)
    ]
    inputs = build_inputs(states, {s.req_id: 1 for s in states}, 4, torch.device("cpu"))
    # A bigger step ran before: its rows must not leak into this one's padding.
    static.input_ids.fill_(99)
    static.slot_mapping.fill_(7)
    static.seq_lens.fill_(50)
    static.load(inputs.input_ids, inputs.positions, inputs.attn, bucket=4)
    assert static.input_ids[:4].tolist() == [6, 7, 8, 0]
    assert static.positions[:4].tolist() == [5, 6, 7, 0]
    assert static.slot_mapping[:4].tolist() == [9 * 4 + 1, 10 * 4 + 2, 11 * 4 + 3, -1]
    assert static.seq_lens[:4].tolist() == [6, 7, 8, 0]
    assert static.block_tables[:3, :2].tolist() == [[1, 9], [2, 10], [3, 11]]
    meta = static.metadata(4, 64)
    assert meta.num_decodes == meta.num_seqs == 4 and meta.seq_lens_cpu == [64] * 4
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]


def test_graph_steps_give_the_eager_tokens_and_logprobs(llama_dir: Path) -> None:
    # Ten requests of different lengths through at most four sequences a step: batches shrink and
    # grow (buckets 4, 2, 1 with padding rows that held a real sequence a step earlier), and finished
    # requests' blocks go to new ones, so a padding row that still wrote its old slot would show.
    prompts = PROMPTS * 2
    params = [SamplingParams(temperature=0.0, max_tokens=2 + i, ignore_eos=True, logprobs=2) for i in range(10)]
    llm = _llm(llama_dir, max_num_seqs=4)
    try:
        eager = _run(llm, prompts, params)
        runner = llm.core._runner
        assert runner.decode_graphs is None and llm.core.cuda_graph_sizes == ()  # CPU: nothing unless asked
        graphs = runner.capture_decode_graphs(EagerCapture())
        assert graphs.sizes == [1, 2, 4] and llm.core.cuda_graph_sizes == (1, 2, 4)
        replayed = _run(llm, prompts, params)
        llm.core.assert_idle()
    finally:
        llm.close()
    _assert_same(replayed, eager)
    assert graphs.num_replays >= 10


def test_steps_larger_than_the_largest_bucket_run_eagerly(llama_dir: Path) -> None:
    llm = _llm(llama_dir, max_num_seqs=8, cuda_graph_sizes=(1, 2))
    try:
        eager = _run(llm, PROMPTS)
        graphs = llm.core._runner.capture_decode_graphs(EagerCapture())
        assert graphs.sizes == [1, 2]
        _assert_same(_run(llm, PROMPTS), eager)  # 5 decoding together: eager
        assert graphs.num_replays == 0
        one = _run(llm, PROMPTS[:1])  # alone: bucket 1
        assert graphs.num_replays == GREEDY.max_tokens - 1
        _assert_same(one, eager[:1])
    finally:
        llm.close()


def test_lora_steps_run_eagerly_and_base_steps_replay(llama_dir: Path, tmp_path: Path) -> None:
    from tests.lora.peft_helpers import make_peft_adapter

    adapter = make_peft_adapter(llama_dir, tmp_path / "lora", r=4, alpha=8.0, target_modules=["q_proj", "down_proj"])
    llm = _llm(llama_dir, max_num_seqs=8)
    try:
        llm.load_adapter("a", adapter)
        with_adapter = llm.generate(PROMPTS[:2], GREEDY, adapter="a", use_tqdm=False)
        base = _run(llm, PROMPTS[:2])
        graphs = llm.core._runner.capture_decode_graphs(EagerCapture())
        assert [r.token_ids for r in llm.generate(PROMPTS[:2], GREEDY, adapter="a", use_tqdm=False)] == [
            r.token_ids for r in with_adapter
        ]
        assert graphs.num_replays == 0
        _assert_same(_run(llm, PROMPTS[:2]), base)
        assert graphs.num_replays == GREEDY.max_tokens - 1
    finally:
        llm.close()
    assert [r.token_ids for r in with_adapter] != [b[0] for b in base]  # the adapter matters


def test_a_step_that_does_not_fit_is_refused() -> None:
    graphs = DecodeGraphs(sizes=[1, 2], static=StaticDecodeInputs.allocate(2, 4, torch.device("cpu")))
    states = [CachedRequestState(f"r{i}", [1, 2, 3], 3, GREEDY, [i], 2, None) for i in range(3)]
    inputs = build_inputs(states, {s.req_id: 1 for s in states}, 4, torch.device("cpu"))
    assert not graphs.fits(inputs.attn)
    with pytest.raises(ValueError, match="does not fit"):
        graphs.run(inputs.input_ids, inputs.positions, inputs.attn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: captures real graphs")
def test_cuda_graphs_equal_eager_on_cuda(llama_dir: Path) -> None:
    def run(**config: object) -> tuple[list[list[int]], LLM]:
        llm = LLM(llama_dir, device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=8, **config)
        try:
            return [r.token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)], llm
        finally:
            llm.close()

    eager, _ = run(enforce_eager=True)
    graphed, llm = run()
    graphs = llm.core._runner.decode_graphs
    assert graphs is not None and graphs.num_replays >= GREEDY.max_tokens - 1
    assert llm.core.cuda_graph_sizes == (1, 2, 4, 8)
    assert graphed == eager
