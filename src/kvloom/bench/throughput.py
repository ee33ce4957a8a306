"""``python -m kvloom bench throughput``: offline throughput, kvloom vs transformers, same run.

One workload (``workload.Workload``), one checkpoint, kvloom and each peer (``peers``) run
interleaved (A B C A B C with ``--repeats 2``) after an untimed warm-up each. Printed and
written as JSON: the command, the machine and its ceilings, output tokens/s, wall time and
mean TTFT per system, kvloom's ratio to the best peer, kvloom's KV-cache waste at peak
(allocated slots / tokens held), and how many requests got exactly the same greedy tokens
from kvloom as from each peer (a correctness cross-check: float32 greedy should agree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from kvloom.bench.peers import PeerRun, PeerSpec, load_hf_model, parse_peers, run_peer, warm_up
from kvloom.bench.setup import prepare, write_result
from kvloom.bench.workload import STANDARD_MODEL, Workload

SCHEMA_VERSION = 1
DEFAULT_PEERS = "static8,static16,cb512,cb2048"


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
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"static<B>, cb<T>[r<R>], comma separated; '' for none (default {DEFAULT_PEERS})")
    parser.add_argument("--repeats", type=int, default=1, help="passes per system, interleaved; medians are reported")
    parser.add_argument("--kvloom-config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="LLM(...) settings, e.g. max_num_batched_tokens=1024 block_size=16")
    # Tests: shorter ceiling measurements (same measurements, fewer repeats).
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)


def parse_config(items: Sequence[str]) -> dict[str, Any]:
    """``["block_size=16", "dtype=float32"]`` -> ``{"block_size": 16, "dtype": "float32"}`` (JSON values, else strings)."""
    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--kvloom-config: expected KEY=VALUE, got {item!r}")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def kvloom_config(user: dict[str, Any], prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """kvloom's settings: float32 like the peers, and (unless the user sized it) a KV pool that holds
    the whole workload at once, as the continuous-batching peer's is; user settings win."""
    from kvloom.config import CacheConfig, SchedulerConfig

    config: dict[str, Any] = {"dtype": "float32"}
    if "num_kv_blocks" not in user and "kv_cache_memory" not in user:
        block = int(user.get("block_size", CacheConfig.model_fields["block_size"].default))
        config["num_kv_blocks"] = sum(-(-(len(p) + output_len) // block) + 1 for p in prompts)
    if "max_num_seqs" not in user:
        config["max_num_seqs"] = max(len(prompts), SchedulerConfig.model_fields["max_num_seqs"].default)
    return config | user


def _summary(runs: list[PeerRun], num_tokens: int) -> dict[str, Any]:
    walls = [r.wall_s for r in runs]
    ttfts = [statistics.fmean(r.ttft_s) for r in runs if r.ttft_s]
    return {
        "tokens_per_s": round(num_tokens / statistics.median(walls), 2),
        "wall_s": round(statistics.median(walls), 3),
        "mean_ttft_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "runs": [{"wall_s": round(r.wall_s, 3), "tokens_per_s": round(num_tokens / r.wall_s, 2),
                  "mean_ttft_s": round(statistics.fmean(r.ttft_s), 3) if r.ttft_s else None} for r in runs],
    }


def _compare(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    mismatched = [i for i, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b]
    return {"matches_kvloom": len(reference) - len(mismatched), "mismatched_requests": mismatched[:20]}


class _KvloomSystem:
    """kvloom as a benchmarked system: one ``LLM``, one ``generate`` call per pass."""

    def __init__(self, model_dir: Path, config: dict[str, Any], output_len: int) -> None:
        import kvloom

        start = time.perf_counter()
        self.llm = kvloom.LLM(model_dir, **config)
        self.load_s = time.perf_counter() - start
        self.params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.warm_params = kvloom.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def warm_up(self, prompts: list[list[int]]) -> None:
        self.llm.generate([p[:8] for p in prompts[:2]], self.warm_params)

    def run(self, prompts: list[list[int]]) -> PeerRun:
        start = time.perf_counter()
        completions = self.llm.generate(prompts, self.params)
        wall = time.perf_counter() - start
        ttft = [c.usage.time_to_first_token for c in completions]
        known = [t for t in ttft if t is not None]
        return PeerRun(wall, [list(c.token_ids) for c in completions], known if len(known) == len(ttft) else None)


def _measure(
    kv: _KvloomSystem, specs: list[PeerSpec], model_dir: Path, prompts: list[list[int]], output_len: int, repeats: int
) -> tuple[list[PeerRun], dict[str, list[PeerRun]], dict[str, str | None]]:
    """Warm every system up, then run them interleaved ``repeats`` times: kvloom's runs, each
    peer's runs, and each peer's error (None when it ran; a failed peer is skipped afterwards)."""
    hf_model: Any = None
    load_error: str | None = None
    if specs:
        try:
            hf_model = load_hf_model(model_dir)
        except Exception as exc:  # a peer failing to load is a result, not a crash
            load_error = f"{type(exc).__name__}: {exc}"
    peer_runs: dict[str, list[PeerRun]] = {s.name: [] for s in specs}
    peer_errors: dict[str, str | None] = {s.name: load_error for s in specs}
    for spec in specs:
        if peer_errors[spec.name] is None:
            peer_errors[spec.name] = _try(partial(warm_up, spec, hf_model, prompts))

    kv_runs: list[PeerRun] = []
    for rep in range(1, repeats + 1):
        print(f"  pass {rep}: kvloom ...", file=sys.stderr, flush=True)
        kv_runs.append(kv.run(prompts))
        for spec in specs:
            if peer_errors[spec.name] is not None:
                continue
            print(f"  pass {rep}: {spec.name} ...", file=sys.stderr, flush=True)
            try:
                peer_runs[spec.name].append(run_peer(spec, hf_model, prompts, output_len))
            except Exception as exc:  # transformers' APIs move; report, don't crash the whole bench
                peer_errors[spec.name] = f"{type(exc).__name__}: {exc}"
    return kv_runs, peer_runs, peer_errors


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark: 0 when it ran (peer failures are reported in the results), 2 on bad arguments.

    kvloom failing raises: the benchmark has nothing to measure without it.
    """
    command = "python -m kvloom " + shlex.join(argv)
    try:
        workload = Workload(args.num_requests, args.min_prompt_len, args.max_prompt_len, args.output_len, args.seed)
        specs = parse_peers(args.peers)
        user_config = parse_config(args.kvloom_config)
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as exc:
        print(f"bench throughput: {exc}", file=sys.stderr)
        return 2
    setup = prepare(command, args.model, args.quick, workload, f"repeats {args.repeats}")
    info, ceilings, model_dir, prompts = setup.info, setup.ceilings, setup.model_dir, setup.prompts
    num_tokens = workload.num_requests * workload.output_len
    prompt_tokens = sum(len(p) for p in prompts)

    config = kvloom_config(user_config, prompts, workload.output_len)
    kv = _KvloomSystem(model_dir, config, workload.output_len)
    kv.warm_up(prompts)
    kv_runs, peer_runs, peer_errors = _measure(kv, specs, model_dir, prompts, workload.output_len, args.repeats)

    stats = kv.llm.kv_cache_stats()
    reference = kv_runs[0].token_ids
    kvloom_result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
                     "load_s": round(kv.load_s, 2), **_summary(kv_runs, num_tokens),
                     "output_lens_ok": all(len(t) == workload.output_len for t in reference),
                     "kv_cache": {**asdict(stats), "peak_waste": round(stats.peak_waste, 4)}}
    peers_result = [_peer_entry(s, peer_runs[s.name], peer_errors[s.name], reference, num_tokens) for s in specs]
    ok_peers = [p for p in peers_result if p["error"] is None]
    best = max(ok_peers, key=lambda p: p["tokens_per_s"], default=None)
    summary = {
        "kvloom_tokens_per_s": kvloom_result["tokens_per_s"],
        "best_peer": best["name"] if best else None,
        "best_peer_tokens_per_s": best["tokens_per_s"] if best else None,
        "ratio_to_best_peer": round(kvloom_result["tokens_per_s"] / best["tokens_per_s"], 3) if best else None,
        "kv_peak_waste": kvloom_result["kv_cache"]["peak_waste"],
        "all_tokens_match": all(p["matches_kvloom"] == workload.num_requests for p in ok_peers),
    }
    result = {
        "benchmark": "throughput", "schema_version": SCHEMA_VERSION, "command": command, "argv": list(argv),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**info, "ceilings": ceilings},
        "model": {"path": str(model_dir), "spec": None if args.model else STANDARD_MODEL.cache_key},
        "workload": {**asdict(workload), "prompt_tokens": prompt_tokens, "output_tokens": num_tokens},
        "kvloom": kvloom_result, "peers": peers_result, "summary": summary,
    }
    print(format_report(result))
    write_result(args.json, result)
    return 0


def _try(fn: Callable[[], object]) -> str | None:
    try:
        fn()
    except Exception as exc:  # transformers' APIs move; report, don't crash the whole bench
        return f"{type(exc).__name__}: {exc}"
    return None


def _peer_entry(spec: PeerSpec, runs: list[PeerRun], error: str | None, reference: list[list[int]],
                num_tokens: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": spec.name, "description": spec.describe(), "error": error}
    if error is None and runs:
        entry |= _summary(runs, num_tokens) | _compare(reference, runs[0].token_ids)
    else:
        entry |= {"tokens_per_s": None, "wall_s": None, "mean_ttft_s": None, "runs": [],
                  "matches_kvloom": None, "mismatched_requests": []}
    return entry


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a result dict (the JSON ``run`` writes)."""
    n = result["workload"]["num_requests"]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    kv = result["kvloom"]
    lines = [f"{'system':<10} {'tok/s':>8} {'wall s':>8} {'TTFT s':>8}  same tokens as kvloom",
             f"{'kvloom':<10} {kv['tokens_per_s']:>8.1f} {kv['wall_s']:>8.2f} {fmt(kv['mean_ttft_s'], '.2f'):>8}  -"]
    for p in result["peers"]:
        if p["error"]:
            lines.append(f"{p['name']:<10} {'error':>8}  {p['error'][:200]}")
            continue
        lines.append(f"{p['name']:<10} {p['tokens_per_s']:>8.1f} {p['wall_s']:>8.2f} "
                     f"{fmt(p['mean_ttft_s'], '.2f'):>8}  {p['matches_kvloom']}/{n}  ({p['description']})")
    s = result["summary"]
    if s["best_peer"]:
        lines.append(f"kvloom / best peer ({s['best_peer']}): {s['ratio_to_best_peer']:.2f}x")
    lines.append(f"kvloom KV waste at peak (allocated slots / tokens held): {s['kv_peak_waste']:.3f}")
    if not kv["output_lens_ok"]:
        lines.append("WARNING: some kvloom requests did not generate exactly --output-len tokens")
    if not s["all_tokens_match"]:
        lines.append("WARNING: kvloom's greedy tokens differ from a peer's (see mismatched_requests)")
    return "\n".join(lines)
