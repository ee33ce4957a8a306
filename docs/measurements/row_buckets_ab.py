"""The standard CPU workload with packed GEMMs at bucketed row counts (as shipped) and at exact
row counts, alternating in one process; prints each pass and the medians.

    python docs/measurements/row_buckets_ab.py 4      # 4 passes of each

Results: docs/benchmarks.md ("Packed GEMMs at bucketed row counts").
"""

import statistics
import sys
import time

import kvloom.layers.linear as linear
from kvloom import LLM, SamplingParams
from kvloom.bench.workload import Workload
from kvloom.models.checkpoints import STANDARD_MODEL, cached_checkpoint

if __name__ == "__main__":
    path, _ = cached_checkpoint(STANDARD_MODEL)
    settings = {"bucketed": linear.padded_rows, "exact": lambda rows: rows}
    llm = LLM(path, dtype="float32")
    prompts = Workload().prompts(32000)
    params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    llm.generate(prompts[:8], params)  # first-use costs out of the timed passes
    times: dict[str, list[float]] = {name: [] for name in settings}
    for i in range(int(sys.argv[1])):
        order = list(settings) if i % 2 == 0 else list(reversed(settings))
        for name in order:
            linear.padded_rows = settings[name]
            llm.reset_prefix_cache()
            began = time.perf_counter()
            llm.generate(prompts, params)
            times[name].append(time.perf_counter() - began)
            print(f"{name} {times[name][-1]:.2f} s", flush=True)
    print({name: round(statistics.median(ts), 2) for name, ts in times.items()})
