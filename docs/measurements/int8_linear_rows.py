"""Where the int8 kernel stops paying: ms per call of one linear at M rows, for the standard model's three
linear shapes, through (a) float32 on oneDNN-packed weights (kvloom's float default here), (b) the int8 C
kernel, (c) int8 dequantized in blocks into torch's GEMM (``layers.int8_weights``, many rows)
(docs/benchmarks.md, "INT8 weights: the kernel and where it stops paying").

    python docs/measurements/int8_linear_rows.py          # torch's thread count
    python docs/measurements/int8_linear_rows.py 1        # one thread

Each figure is the median of many calls with the weights cycled through a pool bigger than the CPU's
caches (so every call streams its weights from memory, as a decode step does). Run it on a quiet machine.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kvloom.kernels import int8_linear_cpu as k8
from kvloom.layers import int8_weights
from kvloom.layers.int8_weights import Int8Weights
from kvloom.layers.linear import Linear

SHAPES = {"qkv 1024->1536": (1024, 1536), "gate_up 1024->5632": (1024, 5632), "down 2816->1024": (2816, 1024),
          "lm_head 1024->32000": (1024, 32000)}
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 64)
POOL_BYTES = 256 << 20


def median_ms(fns: list, reps: int) -> float:
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    k8.load()
    print(f"threads {torch.get_num_threads()}; ms per call (median), weights cycled through {POOL_BYTES >> 20} MiB")
    print(f"{'shape':<22}{'rows':>5}{'float32 packed':>16}{'int8 kernel':>13}{'int8 dequant+GEMM':>19}")
    for name, (k, n) in SHAPES.items():
        copies = max(2, POOL_BYTES // (4 * k * n))
        floats, int8s = [], []
        for c in range(copies):
            layer = Linear(k, n, False, torch.float32)
            layer.weight.data = torch.randn(n, k, generator=torch.Generator().manual_seed(c)) / k**0.5
            q = Int8Weights.quantize(layer.weight, None, k8, gemv_rows=1 << 30)
            layer.pack_onednn()
            floats.append(layer)
            int8s.append(q)
        for m in ROWS:
            x = torch.randn(m, k)
            reps = max(20, min(400, int(2000 / m)))
            with torch.no_grad():
                fp = median_ms([lambda layer=layer, x=x: layer(x) for layer in floats], reps)
                kernel = median_ms([lambda q=q, x=x: k8.int8_linear_cpu(x, q.q, q.scale) for q in int8s], reps)
                deq = median_ms([lambda q=q, x=x: q._dequantized_gemm(x) for q in int8s], max(10, reps // 4))
            print(f"{name:<22}{m:>5}{fp:>16.3f}{kernel:>13.3f}{deq:>19.3f}", flush=True)
    print(f"(int8_weights.GEMV_ROWS = {int8_weights.GEMV_ROWS}; block of {int8_weights.CHUNK_BYTES >> 20} MiB)")
    assert torch.allclose(F.linear(x, int8s[0].dequantize()), k8.int8_linear_cpu(x, int8s[0].q, int8s[0].scale),
                          atol=1e-3)


if __name__ == "__main__":
    main()
