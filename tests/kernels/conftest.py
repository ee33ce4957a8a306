"""Shared fixtures for the kernel tests: Triton's CPU interpreter and paged-cache builders.

How triton reads ``TRITON_INTERPRET`` (triton 3.x): every ``triton.jit`` decoration consults it
(``triton.knobs.runtime.interpret``, a live ``getenv``) and returns an interpreted function when it
is set. triton's own jit'd library (``tl.zeros``, ``tl.sum``, ``tl.max`` ...) is decorated when
``triton.language`` is *imported*, so the variable must be set before anything imports triton:
otherwise an interpreted kernel that calls ``tl.zeros`` dies with "Cannot call @triton.jit'd outside
of the scope of a kernel". kvloom never imports triton at import time (kernels are decorated on
first launch), so setting it while pytest loads this conftest comes first. ``triton_interpret``
checks that it took effect and fails loudly (it does not skip) when triton got in earlier.
"""

import os
import sys
from collections.abc import Callable

import pytest
import torch

from tests.kernels.paged import PagedKV
from tests.kernels.paged import make_paged_kv as _make_paged_kv

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def triton_interpret() -> None:
    """Run Triton kernels on CPU through the interpreter; a visible skip when triton is missing."""
    triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")
    if isinstance(triton.language.zeros, triton.JITFunction):
        pytest.fail("triton's library was compiled for a GPU, not interpreted: run the kernel tests with "
                    f"TRITON_INTERPRET=1 (now {os.environ.get('TRITON_INTERPRET')!r}), set before triton is imported")


@pytest.fixture
def make_paged_kv() -> Callable[..., PagedKV]:
    """Factory: ``make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype=..., seed=...)``."""
    return _make_paged_kv


def _dense_causal_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 oracle: ``q`` ``[q_len, Hq, D]`` are the last ``q_len`` positions of ``key``/``value``
    ``[L, Hkv, D]``; returns ``[q_len, Hq, D]`` float64."""
    q_len, num_q_heads, _ = q.shape
    seq_len, num_kv_heads, _ = key.shape
    group = num_q_heads // num_kv_heads
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.fixture
def dense_causal_attention() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """The float64 dense oracle (see ``_dense_causal_attention``)."""
    return _dense_causal_attention
