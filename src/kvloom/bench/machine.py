"""The machine a benchmark ran on, and its ceilings measured in the same run.

Shared machines are noisy (BENCHMARKS.md saw ~20% between runs), so absolute numbers from
another day mean little; the ceilings measured here, next to the throughputs, give the
roofline the results can be read against (``analysis.floor`` turns them into a workload's floor).
Takes ~3-5 s, a few more where the CPU has fast bf16 and its bf16 rates are measured too.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import partial
from typing import Any

LINEAR_IN = 1024
LINEAR_OUT = 2816
"""The standard model's MLP up-projection: ``[M, 1024] x [1024, 2816]``."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    """Static facts: CPU, cores, threads torch uses, library versions, accelerator if any."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import kvloom

        info["kvloom"] = getattr(kvloom, "__version__", None) or _dist_version("kvloom")
    except Exception:  # a version string is not worth failing a benchmark for
        info["kvloom"] = None
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _best_time(fn: Callable[[], object], *, min_time: float, max_reps: int = 1000) -> float:
    """Fastest single call of ``fn`` over repeats lasting about ``min_time`` seconds (one warmup)."""
    fn()
    best = float("inf")
    spent = 0.0
    for _ in range(max_reps):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        spent += elapsed
        if spent >= min_time:
            break
    return best


def _best_gemm_time(x: Any, weight: Any, onednn: bool, *, min_time: float) -> float:
    """Fastest ``x @ weight`` (``[M, K] x [K, N]``) of torch's ``mm`` and, with ``onednn``, oneDNN's
    linear on ``weight.T`` packed once (untimed, as kvloom packs at load)."""
    import torch

    out = torch.empty(x.shape[0], weight.shape[1], dtype=x.dtype)
    seconds = _best_time(partial(torch.mm, x, weight, out=out), min_time=min_time)
    if onednn:
        ops = torch.ops.mkldnn
        packed = ops._reorder_linear_weight(weight.t().contiguous(), None)
        seconds = min(seconds, _best_time(partial(ops._linear_pointwise, x, packed, None, "none", [], ""),
                                          min_time=min_time))
    return seconds


def measure_ceilings(*, quick: bool = False, bf16: bool | None = None) -> dict[str, float]:
    """fp32 matmul GFLOP/s (2048^3 and ``[M,1024]x[1024,2816]`` at M = 1, 16, 64) and copy GB/s;
    with ``bf16``, also bf16 2048^3 and M = 64 (``matmul_2048_bf16_gflops``, ``linear_m64_bf16_gflops``).

    ``bf16`` defaults to whether the CPU has fast bf16 (``CpuMatmulSupport.probe()``, what
    ``dtype="auto"`` decides by), so the bf16 rates exist exactly where kvloom runs in bf16 by
    default. Where bf16 is emulated (AVX2) a bf16 2048^3 takes minutes: pass ``bf16=True`` there
    only knowingly. Each number is the best of repeats (the ceiling, not the typical).
    ``copy_gbps`` counts the bytes read plus the bytes written by copying a 256 MiB float32
    tensor. ``quick`` shrinks the timing budget (tests): the same measurements, fewer repeats,
    rougher numbers.

    Each GEMM rate is the better of torch's matmul and oneDNN's linear on a prepacked weight (where
    oneDNN packs that dtype here: ``layers.weight_layout.onednn_packs``), the two ways kvloom's CPU
    linears can run, so a floor timed at these rates bounds both.
    """
    import torch

    from kvloom.layers.weight_layout import onednn_packs

    if bf16 is None:
        from kvloom.models.dtype_choice import CpuMatmulSupport

        bf16 = CpuMatmulSupport.probe().fast_bf16
    budget = 0.2 if quick else 0.8
    result: dict[str, float] = {}
    with torch.inference_mode():
        for dtype, suffix in ((torch.float32, ""), *([(torch.bfloat16, "_bf16")] if bf16 else [])):
            packs = onednn_packs(dtype)
            n = 2048
            a = torch.randn(n, n, dtype=dtype)
            b = torch.randn(n, n, dtype=dtype)
            seconds = _best_gemm_time(a, b, packs, min_time=budget)
            result[f"matmul_{n}{suffix}_gflops"] = 2 * n**3 / seconds / 1e9
            weight = torch.randn(LINEAR_IN, LINEAR_OUT, dtype=dtype)
            for m in (1, 16, 64) if dtype == torch.float32 else (64,):
                x = torch.randn(m, LINEAR_IN, dtype=dtype)
                seconds = _best_gemm_time(x, weight, packs, min_time=budget / 2)
                result[f"linear_m{m}{suffix}_gflops"] = 2 * m * LINEAR_IN * LINEAR_OUT / seconds / 1e9
        numel = 256 * 2**20 // 4
        src = torch.randn(numel)
        dst = torch.empty(numel)
        seconds = _best_time(partial(dst.copy_, src), min_time=budget)
        result["copy_gbps"] = 2 * numel * 4 / seconds / 1e9
    return {k: round(v, 1) for k, v in result.items()}


def best_ceilings(first: dict[str, float], *later: dict[str, float]) -> dict[str, float]:
    """Each of ``first``'s rates at its best over every measurement. A ceiling is the best the machine
    did: a moment when a shared host was busy lowers one measurement, not the run's floor."""
    return {k: max([v, *(m[k] for m in later if k in m)]) for k, v in first.items()}


def measure_device_bandwidth(device: str, *, size_bytes: int = 2**30, repeats: int = 10) -> float:
    """GB/s of copying a ``size_bytes`` tensor on ``device`` into another: bytes read plus bytes
    written over the fastest of ``repeats`` copies (after one untimed). On CUDA each copy is timed
    by CUDA events around it (GPU time, no launch or sync overhead) and needs ~2 GiB free; elsewhere
    by the wall clock. The memory-bandwidth ceiling ``bench decode``'s roofline is timed at."""
    import torch

    dev = torch.device(device)
    src = torch.ones(size_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for rep in range(repeats + 1):
        if dev.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - began
        if rep:
            best = min(best, seconds)
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return round(2 * size_bytes / best / 1e9, 1)


def format_machine(info: dict[str, Any], ceilings: dict[str, float]) -> str:
    """Two human-readable lines: what the machine is, and what it can do."""
    cores = f"{info.get('cores_available')} cores available of {info.get('cpu_count')}"
    what = (
        f"machine: {info.get('cpu')} ({cores}, torch threads {info.get('torch_threads')}); "
        f"torch {info.get('torch')}, transformers {info.get('transformers')}"
        + (f"; GPU {info['cuda']}" if info.get("cuda") else "")
    )
    can = "ceilings: " + ", ".join(f"{k} {v:g}" for k, v in ceilings.items())
    return what + "\n" + can
