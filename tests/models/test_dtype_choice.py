"""``dtype="auto"``: bf16 on a CPU with bf16 matrix units, float32 on one without, the
checkpoint's dtype on a GPU; both CPU branches run here whatever this machine is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvloom import LLM, AsyncEngine, SamplingParams
from kvloom.errors import ConfigError
from kvloom.models.dtype_choice import CpuMatmulSupport, choose_dtype
from tests.fakes import fake_cpu

CPU = torch.device("cpu")
AMX = CpuMatmulSupport(amx=True, avx512_bf16=True)
AVX512_BF16 = CpuMatmulSupport(amx=False, avx512_bf16=True)
AVX2 = CpuMatmulSupport(amx=False, avx512_bf16=False)


@pytest.mark.parametrize(("cpu", "dtype", "says"), [
    (AMX, torch.bfloat16, "AMX and AVX512-BF16 multiply bf16 in hardware"),
    (AVX512_BF16, torch.bfloat16, "AVX512-BF16 multiply bf16 in hardware"),
    (AVX2, torch.float32, "no AMX or AVX512-BF16, so bf16 matmuls would be emulated"),
])
def test_auto_on_cpu_follows_the_bf16_units(cpu: CpuMatmulSupport, dtype: torch.dtype, says: str) -> None:
    choice = choose_dtype("auto", torch.float32, CPU, cpu)
    assert choice.dtype == dtype and says in choice.reason


def test_an_explicit_dtype_wins_and_a_gpu_keeps_the_checkpoints() -> None:
    assert choose_dtype("float32", torch.bfloat16, CPU, AMX).dtype == torch.float32
    assert choose_dtype("bfloat16", torch.float32, CPU, AVX2).reason == "dtype='bfloat16' was asked for"
    assert choose_dtype("auto", torch.float16, torch.device("cuda"), AVX2).dtype == torch.float16
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32"):
        choose_dtype("fp8", torch.float32, CPU, AVX2)


@pytest.mark.real_cpu_dtype
def test_the_probe_asks_torch_and_agrees_with_its_kernel_dispatch() -> None:
    support = CpuMatmulSupport.probe()
    assert isinstance(support.amx, bool) and isinstance(support.avx512_bf16, bool)
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):  # torch dispatches no AVX512 kernels here
        assert not support.fast_bf16
    expected = torch.bfloat16 if support.fast_bf16 else torch.float32
    assert choose_dtype("auto", torch.float32, CPU).dtype == expected


@pytest.mark.parametrize(("cpu", "dtype"), [(AMX, torch.bfloat16), (AVX2, torch.float32)])
def test_the_engine_runs_in_the_chosen_dtype_and_says_why(
    cpu: CpuMatmulSupport, dtype: torch.dtype, llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cpu(monkeypatch, cpu)
    llm = LLM(llama_dir, num_kv_blocks=32)
    try:
        assert llm.dtype_choice.dtype == dtype
        assert {p.dtype for p in llm.core._runner.model.parameters()} == {dtype}
        assert llm.core._runner.kv_caches[0][0].dtype == dtype
        out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4
    finally:
        llm.close()


@pytest.mark.anyio
async def test_stats_report_the_dtype_and_the_reason(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, AVX512_BF16)
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=32) as engine:
        stats = engine.stats()
    assert stats.dtype == "bfloat16" and stats.dtype_reason is not None and "AVX512-BF16" in stats.dtype_reason
