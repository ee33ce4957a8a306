"""``python -m kvloom bench throughput``: offline throughput, kvloom vs transformers, same run.

One workload (``workload.Workload``), one checkpoint, kvloom and each peer (``peers``) run
interleaved (A B C A B C with ``--repeats 2``) after an untimed warm-up each.

kvloom runs its default configuration (``dtype="auto"``: bf16 where the CPU multiplies bf16 in
hardware, float32 elsewhere), with a KV pool sized to hold the whole workload. The peers run at
their best: by default several static batch sizes and continuous-batching token budgets, in
float32 and, where the CPU has fast bf16, in bf16 too (``peers.default_peers``). The headline
is kvloom against the fastest of them all, whatever its dtype or batch size.

Greedy tokens are compared within a dtype: each peer against the kvloom run in its dtype. When
kvloom's default is not float32 and a float32 peer runs, a second kvloom system, ``kvloom@fp32``,
runs (timed and reported too) so the float32 check, where every request must agree, still holds.

Printed and written as JSON: the command, the machine and its ceilings, output tokens/s, wall
time, mean TTFT and dtype per system, kvloom's ratio to the best peer, token agreement per
dtype, kvloom's KV-cache waste at peak (allocated slots / tokens held), and the workload's GEMM
floor on this machine in kvloom's dtype (``analysis.floor``) with kvloom's share of it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from kvloom.bench import machine
from kvloom.bench.analysis.divergence import first_divergences
from kvloom.bench.analysis.floor import floor_result
from kvloom.bench.peers import (
    HfModels,
    PeerRun,
    PeerSpec,
    default_peers,
    load_hf_models,
    parse_peers,
    run_peer,
    warm_up,
)
from kvloom.bench.runner import (
    System,
    Turns,
    add_quick,
    attempt,
    refuse,
    rounded_median,
    start,
    take_turns,
    workload_prompts,
    write_result,
)
from kvloom.bench.settings import add_kvloom_config, kvloom_config, parse_config
from kvloom.bench.throughput_report import format_report
from kvloom.bench.workload import Workload

SCHEMA_VERSION = 2
INT8_SYSTEM = "kvloom@int8"
FLOAT32_PEERS = "static8,static16,static32,cb512,cb1024,cb2048"
"""The default peers in float32; ``default_peers`` adds their ``@bf16`` twins on fast-bf16 CPUs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench throughput``."""
    w = Workload()
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: the standard ~155M random checkpoint)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--num-requests", type=int, default=w.num_requests)
    parser.add_argument("--min-prompt-len", type=int, default=w.min_prompt_len)
    parser.add_argument("--max-prompt-len", type=int, default=w.max_prompt_len)
    parser.add_argument("--output-len", type=int, default=w.output_len, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=w.seed, help="seed of the prompt lengths and token ids")
    parser.add_argument("--peers", help="static<B>, cb<T>[r<R>], each optionally @fp32 (the default) or @bf16, "
                        f"comma separated; '' for none (default {FLOAT32_PEERS}, and each again @bf16 where "
                        "the CPU multiplies bf16 in hardware)")
    parser.add_argument("--repeats", type=int, default=1, help="passes per system, interleaved; medians are reported")
    parser.add_argument("--int8", action="store_true",
                        help="also run kvloom with quantization='int8' (system kvloom@int8, taking turns with the "
                             "others; its ratio to kvloom's default is printed)")
    add_kvloom_config(parser, "LLM(...) settings, e.g. max_num_batched_tokens=1024 block_size=16")
    add_quick(parser)


def resolve_peers(text: str | None) -> list[PeerSpec]:
    """``--peers``, or by default ``FLOAT32_PEERS`` plus their bf16 twins on a fast-bf16 CPU."""
    return parse_peers(default_peers(FLOAT32_PEERS) if text is None else text)


def _summary(runs: list[PeerRun], num_tokens: int) -> dict[str, Any]:
    walls = [r.wall_s for r in runs]
    ttfts = [statistics.fmean(r.ttft_s) for r in runs if r.ttft_s]
    return {
        "tokens_per_s": round(num_tokens / statistics.median(walls), 2),
        "wall_s": rounded_median(walls, 3),
        "mean_ttft_s": rounded_median(ttfts, 3) if ttfts else None,
        "runs": [{"wall_s": round(r.wall_s, 3), "tokens_per_s": round(num_tokens / r.wall_s, 2),
                  "mean_ttft_s": round(statistics.fmean(r.ttft_s), 3) if r.ttft_s else None} for r in runs],
    }


def _compare(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    mismatched = [i for i, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b]
    return {"matches_kvloom": len(reference) - len(mismatched), "mismatched_requests": mismatched[:20]}


class _KvloomSystem:
    """kvloom as a benchmarked system: one ``LLM``, one ``generate`` call per pass."""

    def __init__(self, name: str, model_dir: Path, config: dict[str, Any], output_len: int) -> None:
        import kvloom

        self.name = name
        self.config = config
        start = time.perf_counter()
        self.llm = kvloom.LLM(model_dir, **config)
        self.load_s = time.perf_counter() - start
        self.dtype = self.llm.dtype_choice.name
        """What the engine resolved ``dtype`` to (``"auto"`` decides by device and CPU)."""
        self.params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.warm_params = kvloom.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def warm_up(self, prompts: list[list[int]]) -> None:
        self.llm.generate([p[:8] for p in prompts[:2]], self.warm_params)

    def run(self, prompts: list[list[int]]) -> PeerRun:
        # Each pass starts cold: the previous pass's prompts must not be served from the prefix
        # cache (the peers recompute every pass).
        self.llm.reset_prefix_cache()
        start = time.perf_counter()
        completions = self.llm.generate(prompts, self.params)
        wall = time.perf_counter() - start
        ttft = [c.usage.time_to_first_token for c in completions]
        known = [t for t in ttft if t is not None]
        return PeerRun(wall, [list(c.token_ids) for c in completions], known if len(known) == len(ttft) else None)

    def entry(self, runs: list[PeerRun], num_tokens: int, output_len: int) -> dict[str, Any]:
        """This system's JSON entry: settings, dtype, timings, KV waste at peak."""
        stats = self.llm.kv_cache_stats()
        choice = self.llm.dtype_choice
        attention, attention_reason = self.llm.core.attention_backend
        return {"name": self.name, "dtype": choice.name, "dtype_reason": choice.reason,
                "attention_backend": attention, "attention_reason": attention_reason,
                "async_scheduling": self.llm.core.async_scheduling,
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in self.config.items()},
                "load_s": round(self.load_s, 2), **_summary(runs, num_tokens),
                "output_lens_ok": all(len(t) == output_len for t in runs[0].token_ids),
                "kv_cache": {**asdict(stats), "peak_waste": round(stats.peak_waste, 4)}}


def kvloom_systems(model_dir: Path, config: dict[str, Any], specs: list[PeerSpec],
                   output_len: int, int8: bool = False) -> list[_KvloomSystem]:
    """kvloom in ``config`` (its default dtype), then ``kvloom@fp32`` when that dtype is not
    float32 and a float32 peer runs: each peer's tokens are checked against kvloom in its dtype;
    then ``kvloom@int8`` (``quantization="int8"``) when asked, compared with nothing (its tokens
    are its own)."""
    systems = [_KvloomSystem("kvloom", model_dir, config, output_len)]
    if systems[0].dtype != "float32" and any(s.dtype == "float32" for s in specs):
        systems.append(_KvloomSystem("kvloom@fp32", model_dir, config | {"dtype": "float32"}, output_len))
    if int8:
        systems.append(_KvloomSystem(INT8_SYSTEM, model_dir, config | {"quantization": "int8"}, output_len))
    return systems


def _measure(
    systems: list[_KvloomSystem], specs: list[PeerSpec], models: HfModels, prompts: list[list[int]],
    output_len: int, repeats: int,
) -> Turns[PeerRun]:
    """Warm every system up, then run them interleaved ``repeats`` times (the kvloom systems, then
    the peers): each system's runs, and each peer's error (None when it ran; a peer that fails to
    load, warm up or run is skipped afterwards)."""
    errors: dict[str, str | None] = {s.name: models.get(s)[1] for s in specs}
    for system in systems:
        system.warm_up(prompts)
    for spec in specs:
        if errors[spec.name] is None:
            errors[spec.name] = attempt(partial(warm_up, spec, models.get(spec)[0], prompts))
    contenders = [System(s.name, partial(s.run, prompts)) for s in systems] + [
        System(s.name, partial(run_peer, s, models.get(s)[0], prompts, output_len), fallible=True) for s in specs]
    return take_turns(contenders, repeats, errors=errors)


def agreement(kvloom: list[dict[str, Any]], peers: list[dict[str, Any]], num_requests: int) -> dict[str, Any]:
    """Token agreement per dtype: which kvloom system the dtype's peers were compared with, each
    peer's count of identical requests, and whether all of them matched every request (None
    when nothing in that dtype was compared)."""
    by_dtype: dict[str, Any] = {}
    for dtype in dict.fromkeys([k["dtype"] for k in kvloom] + [p["dtype"] for p in peers]):
        ran = {p["name"]: p["matches_kvloom"] for p in peers if p["dtype"] == dtype and p["error"] is None}
        compared = {name: m for name, m in ran.items() if m is not None}
        by_dtype[dtype] = {
            "compared_with": next((k["name"] for k in kvloom if k["dtype"] == dtype), None),
            "requests": num_requests, "peers": ran,
            "all_match": all(m == num_requests for m in compared.values()) if compared else None,
        }
    return by_dtype


def float32_divergences(specs: list[PeerSpec], peer_runs: dict[str, list[PeerRun]],
                        reference: tuple[str, list[list[int]]] | None, model: Any,
                        peers: list[dict[str, Any]], prompts: list[list[int]]) -> list[dict[str, Any]]:
    """Each float32 request where kvloom's greedy tokens differ from a float32 peer's: where they part
    and how far apart the transformers model's logits for the two tokens are there (``analysis.divergence``),
    once per request (the first peer that differs on it). Empty when everything agrees."""
    if reference is None or model is None:
        return []
    found: list[dict[str, Any]] = []
    seen: set[int] = set()
    for spec, entry in zip(specs, peers, strict=True):
        if spec.dtype != "float32" or entry["error"] is not None or not peer_runs[spec.name]:
            continue
        todo = [r for r in entry["mismatched_requests"] if r not in seen]
        seen.update(todo)
        for d in first_divergences(model, prompts, peer_runs[spec.name][0].token_ids, reference[1], todo):
            found.append({"peer": spec.name, **d.to_json(), "description": d.describe()})
    return found


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark: 0 when it ran (peer failures are reported in the results), 2 on bad arguments.

    kvloom failing raises: the benchmark has nothing to measure without it.
    """
    try:
        workload = Workload(args.num_requests, args.min_prompt_len, args.max_prompt_len, args.output_len, args.seed)
        specs = resolve_peers(args.peers)
        user_config = parse_config(args.kvloom_config)
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as exc:
        return refuse("throughput", exc)
    bench = start("throughput", argv, args.model, args.quick)
    model_dir = bench.model_dir
    prompts = workload_prompts(model_dir, workload,
                               f"repeats {args.repeats}; peers {','.join(s.name for s in specs) or 'none'}")
    num_tokens = workload.num_requests * workload.output_len
    prompt_tokens = sum(len(p) for p in prompts)

    systems = kvloom_systems(model_dir, kvloom_config(user_config, prompts, workload.output_len), specs,
                             workload.output_len, int8=args.int8)
    models = load_hf_models(model_dir, specs)
    turns = _measure(systems, specs, models, prompts, workload.output_len, args.repeats)
    runs, errors = turns.runs, turns.errors
    # Measured again after the runs: the floor takes each ceiling at its best of the two.
    ceilings = machine.best_ceilings(bench.ceilings, machine.measure_ceilings(quick=args.quick))
    print("ceilings, best of before and after the runs: " + ", ".join(f"{k} {v:g}" for k, v in ceilings.items()))

    entries = {s.name: s.entry(runs[s.name], num_tokens, workload.output_len) for s in systems}
    int8_entry = entries.pop(INT8_SYSTEM, None)
    kvloom = list(entries.values())
    references = {s.dtype: (s.name, runs[s.name][0].token_ids) for s in systems if s.name != INT8_SYSTEM}
    peers_result = [_peer_entry(s, runs[s.name], errors[s.name], references.get(s.dtype), num_tokens) for s in specs]
    ok_peers = [p for p in peers_result if p["error"] is None]
    best = max(ok_peers, key=lambda p: p["tokens_per_s"], default=None)
    default = kvloom[0]
    floor = floor_result(model_dir, ceilings, default["dtype"], prompt_tokens=prompt_tokens,
                         num_requests=workload.num_requests, output_len=workload.output_len,
                         wall_s=default["wall_s"])
    by_dtype = agreement(kvloom, peers_result, workload.num_requests)
    divergences = float32_divergences(specs, runs, references.get("float32"), models.models.get("float32"),
                                      peers_result, prompts)
    summary = {
        "kvloom_tokens_per_s": default["tokens_per_s"],
        "kvloom_dtype": default["dtype"],
        "best_peer": best["name"] if best else None,
        "best_peer_dtype": best["dtype"] if best else None,
        "best_peer_tokens_per_s": best["tokens_per_s"] if best else None,
        "ratio_to_best_peer": round(default["tokens_per_s"] / best["tokens_per_s"], 3) if best else None,
        "kv_peak_waste": default["kv_cache"]["peak_waste"],
        "agreement": by_dtype,
        "float32_all_match": by_dtype.get("float32", {}).get("all_match"),
        "float32_divergences": divergences,
        "all_tokens_match": all(p["matches_kvloom"] in (None, workload.num_requests) for p in ok_peers),
        "floor_s": floor["floor_s"],
        "floor_tokens_per_s": floor.get("floor_tokens_per_s"),
        "kvloom_pct_of_floor": floor.get("kvloom_pct_of_floor"),
        "int8_tokens_per_s": int8_entry["tokens_per_s"] if int8_entry else None,
        "int8_ratio_to_kvloom": round(int8_entry["tokens_per_s"] / default["tokens_per_s"], 3) if int8_entry else None,
    }
    result = {
        **bench.envelope("throughput", SCHEMA_VERSION, ceilings=ceilings),
        "workload": {**asdict(workload), "prompt_tokens": prompt_tokens, "output_tokens": num_tokens},
        "kvloom": default, "kvloom_fp32": kvloom[1] if len(kvloom) > 1 else None, "kvloom_int8": int8_entry,
        "peers": peers_result, "floor": floor, "summary": summary,
    }
    print(format_report(result))
    write_result(args.json, result)
    return 0


def _peer_entry(spec: PeerSpec, runs: list[PeerRun], error: str | None,
                reference: tuple[str, list[list[int]]] | None, num_tokens: int) -> dict[str, Any]:
    """A peer's JSON entry; its tokens compared with ``reference`` (the kvloom system of its dtype:
    name, tokens), or not at all (``compared_with`` None) when kvloom did not run in its dtype."""
    entry: dict[str, Any] = {"name": spec.name, "dtype": spec.dtype, "description": spec.describe(),
                             "error": error, "compared_with": reference[0] if reference else None}
    if error is None and runs:
        entry |= _summary(runs, num_tokens)
        entry |= (_compare(reference[1], runs[0].token_ids) if reference
                  else {"matches_kvloom": None, "mismatched_requests": []})
    else:
        entry |= {"tokens_per_s": None, "wall_s": None, "mean_ttft_s": None, "runs": [],
                  "matches_kvloom": None, "mismatched_requests": []}
    return entry
