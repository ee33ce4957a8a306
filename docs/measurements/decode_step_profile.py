"""Where a decode step at one stream spends its time (docs/benchmarks.md, "One stream: where a step goes").

    python docs/measurements/decode_step_profile.py            # float32 (kvloom's default on CPUs without bf16 units)
    python docs/measurements/decode_step_profile.py int8       # quantization="int8"

``LLM.generate`` of one 256-token prompt of random ids (the standard ~155M checkpoint), 129 greedy tokens;
the second call is profiled (cProfile, wall clock) and its time per decode step split into: the linear
layers' kernels (oneDNN's GEMM, or the int8 kernel), the C attention and elementwise kernels, torch ops,
and everything else (Python: the engine, the runner, the modules). Prints the split and the top functions
by their own time. Run it on a quiet machine; the process's wall time is what the split adds up to.
"""

import cProfile
import pstats
import random
import sys
import time

from kvloom import LLM, SamplingParams
from kvloom.models.checkpoints import STANDARD_MODEL, cached_checkpoint

CATEGORIES = {
    "linear kernels": ("mkldnn._linear_pointwise", "int8_linear_cpu", "int8_dequant_cpu", "qlinear_pointwise",
                       "int8_onednn.py"),
    "attention (C)": ("paged_attention_rows_cpu",),
    "norm, activation, rotary (C)": ("add_rms_norm_cpu", "silu_and_mul_cpu", "rotary_cpu"),
}


def main() -> None:
    quantization = sys.argv[1] if len(sys.argv) > 1 else None
    model = cached_checkpoint(STANDARD_MODEL)[0]
    llm = LLM(model, dtype="float32", quantization=quantization, enable_prefix_caching=False)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 32000) for _ in range(256)]
    steps = 128
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    done = llm.generate([prompt], params, use_tqdm=False)[0]
    u = done.usage
    assert u.time_to_first_token is not None and u.total_time is not None
    print(f"{quantization or 'float32'}: decode {steps / (u.total_time - u.time_to_first_token):.1f} tok/s "
          f"(unprofiled), prefill {256 / u.time_to_first_token:.0f} tok/s")
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    llm.generate([prompt], params, use_tqdm=False)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    own: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{filename}:{name}"
        category = next((c for c, marks in CATEGORIES.items() if any(m in key for m in marks)), None)
        if category is None:
            category = "other torch ops" if filename == "~" and "torch" in name else "Python and the rest"
        own[category] = own.get(category, 0.0) + tottime
    print(f"profiled: {wall:.2f} s for the prefill and {steps} decode steps; per decode step, ms (prefill included):")
    for category, seconds in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"  {category:<32} {1e3 * seconds / steps:6.2f}")
    print(f"  {'total':<32} {1e3 * sum(own.values()) / steps:6.2f}")
    stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
