"""``python -m kvloom bench prefix``: shared-prefix workloads, prefix caching off / auto / handles.

Two workloads of random token ids (``random.Random`` seeded from ``--seed`` and the workload's
name), every request submitted at once (like ``bench serve --rate inf``), greedy, EOS ignored:

- ``agent``: one 2,000-token system prompt shared by 64 requests, each + a 50-token user turn;
- ``rag``: 8 documents of 1,000 tokens, 8 questions (30 tokens) each: 64 requests, document + question.

``--scale`` multiplies the prefix lengths and the request counts (at least 1 of each). Systems,
each on a fresh engine (after one untimed warm-up request shorter than a block, so it caches
nothing): kvloom ``off`` (``enable_prefix_caching=False``), ``auto`` (automatic prefix caching,
the default engine), ``handles`` (``cache_prefix`` of every distinct prefix first, timed and
reported as setup, then each request as ``stream(suffix, prefix=handle)``), and the
transformers continuous-batching peers of ``--peers`` (``serve_cb``, all arrivals at 0).
TTFT is measured from each request's submission, as in ``bench serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvloom.bench.analysis.latency import summarize
from kvloom.bench.peers import PeerSpec, parse_peers
from kvloom.bench.runner import add_quick, refuse, start, write_result
from kvloom.bench.serve import LEAD_S, TTFT_MEASURED, jsonable, run_peers, stream_trace
from kvloom.bench.settings import kvloom_config
from kvloom.bench.workload import read_vocab_size
from kvloom.models.checkpoints import STANDARD_MODEL, ModelSpec

SCHEMA_VERSION = 1
KVLOOM_SYSTEMS = ("off", "auto", "handles")
SHAPES: dict[str, tuple[int, int, int, int]] = {"agent": (1, 2000, 64, 50), "rag": (8, 1000, 64, 30)}
"""Workload -> (distinct prefixes, prefix tokens, requests in all, suffix tokens each), at ``--scale 1``."""
PREFIX_MODEL = ModelSpec(STANDARD_MODEL.name, STANDARD_MODEL.version,
                         {**STANDARD_MODEL.build_kwargs, "max_position_embeddings": 4096})
"""The standard checkpoint (same weights: same seed) with room for the agent's 2,066-token requests."""


@dataclass(frozen=True, slots=True)
class PrefixWorkload:
    """Requests sharing prefixes: request ``i`` is ``prefixes[owner[i]] + suffixes[i]``."""

    name: str
    prefixes: list[list[int]]
    owner: list[int]
    suffixes: list[list[int]]

    @property
    def prompts(self) -> list[list[int]]:
        """Each request's whole prompt (prefix + suffix)."""
        return [self.prefixes[k] + s for k, s in zip(self.owner, self.suffixes, strict=True)]

    def describe(self) -> dict[str, Any]:
        """Sizes, for the header and the JSON."""
        return {"name": self.name, "num_requests": len(self.suffixes), "num_prefixes": len(self.prefixes),
                "prefix_len": len(self.prefixes[0]), "suffix_len": len(self.suffixes[0]),
                "prompt_tokens": sum(map(len, self.prompts))}


def build_workload(name: str, scale: float, vocab_size: int, seed: int) -> PrefixWorkload:
    """``name``'s requests at ``scale``; request order is shuffled (documents interleaved)."""
    num_prefixes, prefix_len, num_requests, suffix_len = SHAPES[name]
    num_prefixes = max(1, round(num_prefixes * scale))
    per_prefix = max(1, round(num_requests * scale / num_prefixes))
    rng = random.Random(f"kvloom-prefix-{name}-{seed}")

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    prefixes = [ids(max(1, round(prefix_len * scale))) for _ in range(num_prefixes)]
    owner = [k for k in range(num_prefixes) for _ in range(per_prefix)]
    rng.shuffle(owner)
    return PrefixWorkload(name, prefixes, owner, [ids(suffix_len) for _ in owner])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench prefix``."""
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: the standard ~155M random checkpoint, "
                        "4096 positions)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workload", default="agent,rag", help="comma separated, of: agent, rag")
    parser.add_argument("--output-len", type=int, default=16, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids and the request order")
    parser.add_argument("--peers", default="cb512", help="cb<T>[r<R>], comma separated; '' for none")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies prefix lengths and request counts")
    add_quick(parser)


async def _run_kvloom(system: str, model_dir: Path, config: dict[str, Any], wl: PrefixWorkload,
                      output_len: int) -> dict[str, Any]:
    """One kvloom system's pass over ``wl`` on a fresh engine: traces, cached tokens, setup time, cache stats."""
    import kvloom

    params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine = kvloom.AsyncEngine.from_pretrained(model_dir, enable_prefix_caching=system != "off", **config)
    async with engine:
        block = engine.config.cache.block_size
        warm = kvloom.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        await engine.generate(wl.prompts[0][: max(1, block - 1)], warm)
        setup_s, handles = None, []
        if system == "handles":
            t0 = time.perf_counter()
            handles = list(await asyncio.gather(*(engine.cache_prefix(p) for p in wl.prefixes)))
            setup_s = time.perf_counter() - t0
        start = time.perf_counter() + LEAD_S
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(stream_trace(engine, s if handles else p, params, start, f"{system}-{i}",
                                                    handles[k] if handles else None))
                     for i, (k, s, p) in enumerate(zip(wl.owner, wl.suffixes, wl.prompts, strict=True))]
        stats = engine.prefix_cache_stats()
        for handle in handles:
            handle.release()
    traces = [t.result()[0] for t in tasks]
    cached = [t.result()[1] for t in tasks]
    return {"traces": traces, "cached": cached, "setup_s": setup_s, "block_size": block,
            "prefix_cache": None if stats is None else jsonable(stats) | {"hit_rate": round(stats.hit_rate, 4)}}


def _system_entry(name: str, run: dict[str, Any], reference: list[list[int]]) -> dict[str, Any]:
    traces = run["traces"]
    mismatched = [i for i, (t, ref) in enumerate(zip(traces, reference, strict=True)) if t.token_ids != ref]
    return {"name": name, "ttft_measured": TTFT_MEASURED["kvloom"], **summarize(traces),
            "setup_s": None if run["setup_s"] is None else round(run["setup_s"], 4),
            "mean_cached_tokens": round(statistics.fmean(run["cached"]), 2), "cached_tokens": run["cached"],
            "matches_off": len(traces) - len(mismatched), "mismatched_requests": mismatched[:20],
            "block_size": run["block_size"], "prefix_cache": run["prefix_cache"]}


def _run_workload(wl: PrefixWorkload, model_dir: Path, specs: list[PeerSpec], output_len: int) -> dict[str, Any]:
    prompts = wl.prompts
    # float32, as the peers: their tokens are compared with 'off's (other benchmarks run kvloom's default dtype).
    config = kvloom_config({"dtype": "float32"}, prompts + wl.prefixes, output_len) | {
        "max_waiting": len(prompts) + len(wl.prefixes)}
    systems: list[dict[str, Any]] = []
    reference: list[list[int]] = []
    for name in KVLOOM_SYSTEMS:
        print(f"  {wl.name} / {name} ...", file=sys.stderr, flush=True)
        run = asyncio.run(_run_kvloom(name, model_dir, config, wl, output_len))
        reference = reference or [t.token_ids for t in run["traces"]]
        systems.append(_system_entry(name, run, reference))
    for peer in run_peers(specs, model_dir, prompts, [0.0] * len(prompts), output_len, {"float32": ("off", reference)}):
        peer["matches_off"] = peer.pop("matches_kvloom")
        systems.append(peer)
    by = {s["name"]: s for s in systems}

    def ratio(a: str, b: str) -> float | None:
        if a not in by or b not in by or by[a].get("ttft_s") is None:
            return None
        num: float = by[a]["ttft_s"]["p50"] / by[b]["ttft_s"]["p50"]
        return round(num, 3)

    return {"workload": wl.describe(), "kvloom_config": jsonable(config), "systems": systems,
            "ttft_p50_off_over_handles": ratio("off", "handles"), "ttft_p50_off_over_auto": ratio("off", "auto"),
            "ttft_p50_peer_over_handles": {s.name: ratio(s.name, "handles") for s in specs},
            "prefix_whole_block_tokens": [len(p) // by["handles"]["block_size"] * by["handles"]["block_size"]
                                          for p in wl.prefixes]}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark: 0 when it ran (peer failures are reported in the results), 2 on bad arguments."""
    try:
        names = [n.strip() for n in args.workload.split(",") if n.strip()]
        if not names or any(n not in SHAPES for n in names):
            raise ValueError(f"--workload: expected some of {', '.join(SHAPES)}, got {args.workload!r}")
        if not args.scale > 0 or args.output_len < 1:
            raise ValueError("--scale must be > 0 and --output-len >= 1")
        specs = parse_peers(args.peers)
        if static := [s.name for s in specs if s.kind != "cb"]:
            raise ValueError(f"--peers {','.join(static)}: only cb<T>[r<R>] peers serve requests")
    except ValueError as exc:
        return refuse("prefix", exc)
    bench = start("prefix", argv, args.model, args.quick, PREFIX_MODEL)
    model_dir = bench.model_dir
    vocab = read_vocab_size(model_dir)
    workloads = [build_workload(n, args.scale, vocab, args.seed) for n in names]
    print(f"model: {model_dir}")
    for wl in workloads:
        d = wl.describe()
        print(f"workload {wl.name}: {d['num_requests']} requests over {d['num_prefixes']} prefix(es) of "
              f"{d['prefix_len']} tokens + {d['suffix_len']}-token suffixes, {args.output_len} output tokens each, "
              "greedy, EOS ignored, all submitted at once")
    results = {wl.name: _run_workload(wl, model_dir, specs, args.output_len) for wl in workloads}
    agent = results.get("agent", {}).get("ttft_p50_off_over_handles")
    summary = {
        "ttft_p50_off_over_handles": {n: r["ttft_p50_off_over_handles"] for n, r in results.items()},
        "ttft_p50_off_over_auto": {n: r["ttft_p50_off_over_auto"] for n, r in results.items()},
        "agent_target": 5.0, "agent_target_met": None if agent is None else agent >= 5.0,
        "all_kvloom_tokens_match_off": all(s["matches_off"] == r["workload"]["num_requests"] for r in results.values()
                                           for s in r["systems"] if s["name"] in KVLOOM_SYSTEMS),
    }
    result = {
        **bench.envelope("prefix", SCHEMA_VERSION),
        "settings": {"output_len": args.output_len, "seed": args.seed, "scale": args.scale, "peers": args.peers},
        "workloads": {n: r["workload"] for n, r in results.items()},
        "systems": {n: r["systems"] for n, r in results.items()},
        "details": {n: {k: v for k, v in r.items() if k not in ("workload", "systems")} for n, r in results.items()},
        "summary": summary,
    }
    print(format_report(result))
    write_result(args.json, result)
    return 0


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a result dict (the JSON ``run`` writes)."""
    lines = [f"{'workload':<8} {'system':<8} {'tok/s':>8} {'wall s':>7} | {'TTFT s: p50':>11} {'p99':>7} | "
             f"{'setup s':>7} {'cached':>7} | same tokens as off"]
    for name, systems in result["systems"].items():
        n = result["workloads"][name]["num_requests"]
        for s in systems:
            if s.get("error"):
                lines.append(f"{name:<8} {s['name']:<8} {'error':>8} | {s['error'][:200]}")
                continue
            setup = "-" if s.get("setup_s") is None else f"{s['setup_s']:.3f}"
            cached = "-" if s.get("mean_cached_tokens") is None else f"{s['mean_cached_tokens']:.1f}"
            lines.append(f"{name:<8} {s['name']:<8} {s['output_tokens_per_s']:>8.1f} {s['duration_s']:>7.3f} | "
                         f"{s['ttft_s']['p50']:>11.3f} {s['ttft_s']['p99']:>7.3f} | {setup:>7} {cached:>7} | "
                         f"{s['matches_off']}/{n}" + (f"  ({s['description']})" if "description" in s else ""))
    lines.append("TTFT: from each request's submission (kvloom: first chunk with tokens as received; peers: "
                 "transformers' first-token timestamp); setup: cache_prefix of every distinct prefix, not in TTFT")
    summary = result["summary"]
    if (agent := summary["ttft_p50_off_over_handles"].get("agent")) is not None:
        lines.append(f"TTFT p50 off / handles on agent: {agent:.1f}x (target >= 5x)")
    if not summary["all_kvloom_tokens_match_off"]:
        lines.append("WARNING: a kvloom system's greedy tokens differ from 'off' (see mismatched_requests)")
    return "\n".join(lines)
