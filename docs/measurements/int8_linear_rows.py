"""Which int8 kernel to take at how many rows: ms per call of one linear at M rows, for the standard model's
linear shapes, through (a) float32 on oneDNN-packed weights (kvloom's float default here), (b) kvloom's int8
C kernel (activations per block of 32, integer block sums), (c) oneDNN's int8 GEMM with activations per token
in 7 bits (``layers.int8_onednn``), (d) int8 dequantized in blocks into torch's GEMM (the bf16 plan's many-row
path) (docs/benchmarks.md, "INT8 weights: the kernels and where each pays").

    python docs/measurements/int8_linear_rows.py          # torch's thread count
    python docs/measurements/int8_linear_rows.py 1        # one thread

Each figure is the median of many calls with the weights cycled through a pool bigger than the CPU's
caches (so every call streams its weights from memory, as a decode step does). Run it on a quiet machine.
"""

import statistics
import sys
import time

import torch

from kvloom.kernels import int8_linear_cpu as k8
from kvloom.layers import int8_weights
from kvloom.layers.int8_weights import Int8Plan, Int8Weights
from kvloom.layers.linear import Linear

SHAPES = {"qkv 1024->1536": (1024, 1536), "gate_up 1024->5632": (1024, 5632), "down 2816->1024": (2816, 1024),
          "lm_head 1024->32000": (1024, 32000)}
ROWS = (1, 2, 4, 8, 16, 24, 32, 64, 256)
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
    plan = Int8Plan(0, "onednn")  # every call below names its kernel itself
    print(f"threads {torch.get_num_threads()}; ms per call (median), weights cycled through {POOL_BYTES >> 20} MiB")
    print(f"{'shape':<22}{'rows':>5}{'float32 packed':>16}{'int8 C kernel':>15}{'int8 oneDNN':>13}"
          f"{'int8 dequant+GEMM':>19}")
    for name, (k, n) in SHAPES.items():
        copies = max(2, POOL_BYTES // (4 * k * n))
        floats, int8s = [], []
        for c in range(copies):
            layer = Linear(k, n, False, torch.float32)
            layer.weight.data = torch.randn(n, k, generator=torch.Generator().manual_seed(c)) / k**0.5
            int8s.append(Int8Weights.quantize(layer.weight, None, k8, plan))
            layer.pack_onednn()
            floats.append(layer)
        for m in ROWS:
            x = torch.randn(m, k)
            reps = max(10, min(400, int(2000 / m)))
            with torch.no_grad():
                fp = median_ms([lambda layer=layer, x=x: layer(x) for layer in floats], reps)
                kernel = median_ms([lambda q=q, x=x: k8.int8_linear_cpu(x, q.packed, q.scale) for q in int8s], reps)
                onednn = median_ms([lambda q=q, x=x: q.matmul(x) for q in int8s], reps)
                deq = median_ms([lambda q=q, x=x: q._dequantized_gemm(x) for q in int8s], max(10, reps // 4))
            print(f"{name:<22}{m:>5}{fp:>16.3f}{kernel:>15.3f}{onednn:>13.3f}{deq:>19.3f}", flush=True)
    print(f"(float32 plan: the C kernel up to {int8_weights.GEMV_ROWS_FLOAT32} rows, oneDNN above; "
          f"bf16 plan: the C kernel up to {int8_weights.GEMV_ROWS_BF16} rows, dequantized blocks of "
          f"{int8_weights.CHUNK_BYTES >> 20} MiB above)")


if __name__ == "__main__":
    main()
