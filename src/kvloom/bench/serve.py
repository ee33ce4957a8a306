"""``python -m kvloom bench serve``: online serving latency, kvloom vs transformers, same arrivals.

Requests arrive as a Poisson process (``--rate`` requests/s, exponential gaps drawn once from
``--seed``; ``--rate inf`` submits them all at once). The same prompts (``workload.Workload``)
and the same arrival schedule are replayed against each system after an untimed warm-up:

- kvloom: one ``AsyncEngine``, one task per request that sleeps until its arrival time, then
  iterates ``engine.stream(...)``, stamping each chunk as it is received.
- transformers ``cb<T>[r<R>]`` peers: one ``ContinuousBatchingManager``; a driver thread calls
  ``add_request`` at each arrival time; per-token timestamps (``record_timestamps=True``, taken
  in its generation thread as each token is appended) give the first-token and end times.

All times are ``time.perf_counter`` and measured from the *scheduled* arrival, so a late submit
counts against the system. Per system: TTFT (mean, p50, p99), TPOT = (end - first token) /
(output tokens - 1), E2E, output tokens/s over (last end - first arrival), and how many requests
got exactly the greedy tokens of the kvloom run in the peer's dtype. kvloom stamps tokens where
the caller receives them, the peer where they are produced, so the comparison is, if anything,
tilted towards the peer.

kvloom runs its default configuration (``dtype="auto"``); the peers, ``cb`` only, take dtype
suffixes as in ``bench throughput`` (``cb512@bf16``), and by default are ``cb512,cb2048`` plus
their bf16 twins where the CPU has fast bf16. When kvloom's dtype is not float32 and a float32
peer runs, ``kvloom@fp32`` serves the same schedule too, for the float32 token check.

``--sweep`` replaces ``--rate`` with a ladder of rates and reports goodput under the SLOs
``--slo-ttft`` / ``--slo-tpot`` / ``--slo-attainment`` (``sweep``, ``analysis.goodput``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvloom.bench.analysis.latency import summarize
from kvloom.bench.peers import (
    DTYPE_TAGS,
    PeerSpec,
    RequestTrace,
    default_peers,
    load_hf_models,
    parse_peers,
    serve_cb,
)
from kvloom.bench.runner import add_quick, refuse, start, workload_prompts, write_result
from kvloom.bench.settings import add_kvloom_config, kvloom_config, parse_config
from kvloom.bench.workload import Workload

if TYPE_CHECKING:
    from kvloom import SamplingParams
    from kvloom.engine.async_engine import AsyncEngine
    from kvloom.engine.prefix import PrefixHandle

SCHEMA_VERSION = 2
FLOAT32_PEERS = "cb512,cb2048"
"""The default peers in float32; ``default_peers`` adds their ``@bf16`` twins on fast-bf16 CPUs."""
SLO_TTFT_S = 2.0
SLO_TPOT_S = 0.2
"""200 ms a token: about reading speed."""
SLO_ATTAINMENT = 0.9
SWEEP_LADDER = "0.5,1,1.5,2,3,4,6,8"
"""``--sweep``'s default rates, requests/s."""
SWEEP_DURATION_S = 32.0
"""``--sweep-duration``: a rate serves about this many seconds of arrivals (``sweep``)."""
SWEEP_MIN_REQUESTS = 16
LEAD_S = 0.05
"""The first arrival is this long after the clock starts, so the submitters are all in place."""
TTFT_MEASURED = {
    "kvloom": "first AsyncEngine.stream chunk carrying tokens, as received by the request's task, minus its scheduled arrival",
    "cb": "transformers' timestamp of the first generated token (add_request(record_timestamps=True), taken in its "
          "generation thread), minus the scheduled arrival; end = the request's finish time (GenerationOutput.lifespan)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench serve``."""
    w = Workload()
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: the standard ~155M random checkpoint)")
    parser.add_argument("--rate", type=float, help="Poisson arrivals, requests/s; 'inf' submits all at once "
                        "(this or --sweep)")
    parser.add_argument("--sweep", nargs="?", const=SWEEP_LADDER, metavar="RATES",
                        help="instead of --rate: serve each of these rates (comma separated, req/s; 'inf' = all at "
                             f"once; default {SWEEP_LADDER}) and report goodput, the highest rate at which "
                             "--slo-attainment of the requests meet both SLOs; plots next to --json")
    parser.add_argument("--slo-ttft", type=float, default=SLO_TTFT_S, metavar="S",
                        help=f"--sweep: SLO on time to first token, seconds (default {SLO_TTFT_S:g})")
    parser.add_argument("--slo-tpot", type=float, default=SLO_TPOT_S, metavar="S",
                        help=f"--sweep: SLO on time per output token after the first, seconds (default {SLO_TPOT_S:g})")
    parser.add_argument("--slo-attainment", type=float, default=SLO_ATTAINMENT, metavar="FRACTION",
                        help=f"--sweep: share of requests that must meet both SLOs at a rate (default {SLO_ATTAINMENT:g})")
    parser.add_argument("--sweep-duration", type=float, default=SWEEP_DURATION_S, metavar="S",
                        help="--sweep: at each rate serve the first rate x S requests of the workload (at least "
                             f"{SWEEP_MIN_REQUESTS}, at most --num-requests); 'inf' for all of them at every rate "
                             f"(default {SWEEP_DURATION_S:g})")
    parser.add_argument("--json", type=Path, help="write the results here (--sweep: and the plots next to it)")
    parser.add_argument("--num-requests", type=int, default=w.num_requests)
    parser.add_argument("--min-prompt-len", type=int, default=w.min_prompt_len)
    parser.add_argument("--max-prompt-len", type=int, default=w.max_prompt_len)
    parser.add_argument("--output-len", type=int, default=w.output_len, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=w.seed, help="seed of the prompts and of the arrival gaps")
    parser.add_argument("--peers", help="cb<T>[r<R>], each optionally @fp32 (the default) or @bf16, comma "
                        f"separated; '' for none (default {FLOAT32_PEERS}, and each again @bf16 where the CPU "
                        "multiplies bf16 in hardware)")
    add_kvloom_config(parser, "AsyncEngine settings, e.g. max_num_batched_tokens=1024 block_size=16")
    add_quick(parser)


def poisson_arrivals(num_requests: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets in seconds, non-decreasing: the first at 0, then exponential gaps of mean
    ``1 / rate``; all 0 when ``rate`` is infinite. Same ``seed``, same schedule, on any platform
    (``random.Random`` with a string seed, independent of the prompts' stream)."""
    if not rate > 0:
        raise ValueError(f"--rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(f"kvloom-serve-arrivals-{seed}")
    offsets = [0.0]
    for _ in range(num_requests - 1):
        offsets.append(offsets[-1] + rng.expovariate(rate))
    return offsets[:num_requests]


async def serve_kvloom(model_dir: Path, config: dict[str, Any], prompts: list[list[int]], offsets: list[float],
                       output_len: int) -> tuple[list[RequestTrace], dict[str, Any]]:
    """kvloom's timed pass on a fresh engine (after a warm-up request) and its engine stats afterwards
    (``stats["dtype"]``: what ``dtype`` resolved to)."""
    import kvloom

    params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine = kvloom.AsyncEngine.from_pretrained(model_dir, **config)
    async with engine:
        warm = kvloom.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        await engine.generate(prompts[0][:8], warm)
        start = time.perf_counter() + LEAD_S

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(stream_trace(engine, prompts[i], params, start + offsets[i], f"serve-{i}"))
                     for i in range(len(prompts))]
        return [t.result()[0] for t in tasks], jsonable(engine.stats())


async def stream_trace(engine: AsyncEngine, prompt: list[int], params: SamplingParams, arrival: float,
                       request_id: str, prefix: PrefixHandle | None = None) -> tuple[RequestTrace, int]:
    """Sleep until ``arrival`` (a ``perf_counter`` time), stream one request stamping each chunk as
    received; the trace and the request's ``Usage.cached_tokens`` (0 if no usage came)."""
    await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
    trace = RequestTrace(arrival, time.perf_counter(), math.nan, math.nan)
    cached = 0
    async for chunk in engine.stream(prompt, params, request_id=request_id, prefix=prefix):
        now = time.perf_counter()
        if chunk.token_ids:
            if not trace.token_ids:
                trace.first_token = now
            trace.token_ids.extend(chunk.token_ids)
            trace.num_chunks += 1
        if chunk.usage is not None:
            cached = chunk.usage.cached_tokens
    trace.end = time.perf_counter()
    return trace, cached


def jsonable(value: Any) -> Any:
    """Stats as plain JSON: mappings and dataclasses become dicts, other objects their ``str``."""
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _peer_entry(spec: PeerSpec, traces: list[RequestTrace] | None, error: str | None,
                reference: tuple[str, list[list[int]]] | None) -> dict[str, Any]:
    """A peer's entry; its tokens compared with ``reference`` (the kvloom system of its dtype: name,
    tokens), or not at all (``compared_with`` None) when kvloom did not run in its dtype."""
    entry: dict[str, Any] = {"name": spec.name, "dtype": spec.dtype, "description": spec.describe(), "error": error,
                             "ttft_measured": TTFT_MEASURED["cb"], "compared_with": reference[0] if reference else None}
    if traces is None:
        return entry | {"output_tokens_per_s": None, "ttft_s": None, "tpot_s": None, "e2e_s": None,
                        "matches_kvloom": None, "mismatched_requests": []}
    if reference is None:
        return entry | summarize(traces) | {"matches_kvloom": None, "mismatched_requests": []}
    mismatched = [i for i, (t, ref) in enumerate(zip(traces, reference[1], strict=True)) if t.token_ids != ref]
    return entry | summarize(traces) | {"matches_kvloom": len(traces) - len(mismatched),
                                        "mismatched_requests": mismatched[:20]}


def run_peers(specs: list[PeerSpec], model_dir: Path, prompts: list[list[int]], offsets: list[float],
              output_len: int, references: dict[str, tuple[str, list[list[int]]]]) -> list[dict[str, Any]]:
    """Each peer's entry, its tokens compared with ``references[its dtype]`` (kvloom system's name,
    its tokens); a peer that fails to load or run is an entry with ``error`` set. Each dtype the
    peers need is loaded once."""
    models = load_hf_models(model_dir, specs)
    entries = []
    for spec in specs:
        model, error = models.get(spec)
        traces = None
        if error is None:
            print(f"  {spec.name} ...", file=sys.stderr, flush=True)
            try:
                traces = serve_cb(spec, model, prompts, offsets, output_len, LEAD_S)
            except Exception as exc:  # transformers' APIs move; report, don't crash the whole bench
                error = f"{type(exc).__name__}: {exc}"
        entries.append(_peer_entry(spec, traces, error, references.get(spec.dtype)))
    return entries


def kvloom_entry(name: str, config: dict[str, Any], traces: list[RequestTrace], stats: dict[str, Any],
                 output_len: int) -> dict[str, Any]:
    """A kvloom system's entry (``dtype``: what its engine resolved ``dtype`` to)."""
    return {"name": name, "dtype": stats.get("dtype"), "dtype_reason": stats.get("dtype_reason"),
            "attention_backend": stats.get("attention_backend"),
            "config": jsonable(config), "ttft_measured": TTFT_MEASURED["kvloom"], **summarize(traces),
            "output_lens_ok": all(len(t.token_ids) == output_len for t in traces), "engine_stats": stats}


def resolve_peers(text: str | None) -> list[PeerSpec]:
    """``--peers`` (default: ``FLOAT32_PEERS`` plus bf16 twins on fast-bf16 CPUs), ``cb`` only."""
    specs = parse_peers(default_peers(FLOAT32_PEERS) if text is None else text)
    if static := [s.name for s in specs if s.kind != "cb"]:
        raise ValueError(f"--peers {','.join(static)}: only cb<T>[r<R>] peers can serve requests as they arrive")
    return specs


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark: 0 when it ran (peer failures are reported in the results), 2 on bad arguments."""
    if args.sweep is not None:
        from kvloom.bench import sweep  # the ladder builds on this module's one-rate machinery

        return sweep.run(args, argv)
    try:
        if args.rate is None:
            raise ValueError("give --rate R (one rate) or --sweep [RATES] (a ladder of rates)")
        workload = Workload(args.num_requests, args.min_prompt_len, args.max_prompt_len, args.output_len, args.seed)
        offsets = poisson_arrivals(workload.num_requests, args.rate, workload.seed)
        specs = resolve_peers(args.peers)
        user_config = parse_config(args.kvloom_config)
    except ValueError as exc:
        return refuse("serve", exc)
    bench = start("serve", argv, args.model, args.quick)
    model_dir = bench.model_dir
    prompts = workload_prompts(model_dir, workload, f"Poisson arrivals at {args.rate:g} req/s over {offsets[-1]:.2f} s; "
                               f"peers {','.join(s.name for s in specs) or 'none'}")
    prompt_tokens = sum(len(p) for p in prompts)

    config = kvloom_config(user_config, prompts, workload.output_len)
    if "max_waiting" not in user_config:  # --rate inf queues every request at once: none may be refused
        config["max_waiting"] = workload.num_requests
    print("  kvloom ...", file=sys.stderr, flush=True)
    kv_traces, stats = asyncio.run(serve_kvloom(model_dir, config, prompts, offsets, workload.output_len))
    systems = [kvloom_entry("kvloom", config, kv_traces, stats, workload.output_len)]
    references = {str(stats.get("dtype")): ("kvloom", [t.token_ids for t in kv_traces])}
    if "float32" not in references and any(s.dtype == "float32" for s in specs):
        print("  kvloom@fp32 ...", file=sys.stderr, flush=True)
        fp32 = config | {"dtype": "float32"}
        traces, fp32_stats = asyncio.run(serve_kvloom(model_dir, fp32, prompts, offsets, workload.output_len))
        systems.append(kvloom_entry("kvloom@fp32", fp32, traces, fp32_stats, workload.output_len))
        references["float32"] = ("kvloom@fp32", [t.token_ids for t in traces])
    peers = run_peers(specs, model_dir, prompts, offsets, workload.output_len, references)
    kv = systems[0]

    ok = [p for p in peers if p["error"] is None]
    fastest = min(ok, key=lambda p: p["ttft_s"]["p50"], default=None)
    busiest = max(ok, key=lambda p: p["output_tokens_per_s"], default=None)
    summary = {  # ttft_p50_ratio > 1: kvloom answers sooner; throughput_ratio > 1: kvloom is faster
        "kvloom_dtype": kv["dtype"],
        "best_ttft_peer": fastest["name"] if fastest else None,
        "ttft_p50_ratio": round(fastest["ttft_s"]["p50"] / kv["ttft_s"]["p50"], 3) if fastest else None,
        "best_throughput_peer": busiest["name"] if busiest else None,
        "throughput_ratio": round(kv["output_tokens_per_s"] / busiest["output_tokens_per_s"], 3) if busiest else None,
        "float32_all_match": _all_match([p for p in ok if p["dtype"] == "float32"], workload.num_requests),
        "all_tokens_match": all(p["matches_kvloom"] in (None, workload.num_requests) for p in ok),
    }
    result = {
        **bench.envelope("serve", SCHEMA_VERSION),
        "workload": {**asdict(workload), "rate": None if math.isinf(args.rate) else args.rate,
                     "prompt_tokens": prompt_tokens, "arrival_offsets_s": [round(o, 4) for o in offsets]},
        "kvloom": kv, "kvloom_fp32": systems[1] if len(systems) > 1 else None, "peers": peers, "summary": summary,
    }
    print(format_report(result))
    write_result(args.json, result)
    return 0


def _all_match(peers: list[dict[str, Any]], num_requests: int) -> bool | None:
    """Whether every compared peer got kvloom's tokens for every request (None: none compared)."""
    compared = [p["matches_kvloom"] for p in peers if p["matches_kvloom"] is not None]
    return all(m == num_requests for m in compared) if compared else None


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a result dict (the JSON ``run`` writes)."""
    n = result["workload"]["num_requests"]
    head = (f"{'system':<12} {'dtype':<5} {'tok/s':>7} | {'TTFT s: mean':>12} {'p50':>7} {'p99':>7} | "
            f"{'TPOT ms: p50':>12} {'p99':>7} | {'E2E s: p50':>10} {'p99':>7} | same tokens as kvloom (same dtype)")
    lines = [head]

    def row(r: dict[str, Any], same: str) -> str:
        ms = {k: v * 1000 if v is not None else math.nan for k, v in r["tpot_s"].items()}
        return (f"{r['name']:<12} {DTYPE_TAGS.get(r['dtype'], r['dtype']):<5} {r['output_tokens_per_s']:>7.1f} | "
                f"{r['ttft_s']['mean']:>12.3f} {r['ttft_s']['p50']:>7.3f} {r['ttft_s']['p99']:>7.3f} | "
                f"{ms['p50']:>12.1f} {ms['p99']:>7.1f} | {r['e2e_s']['p50']:>10.3f} {r['e2e_s']['p99']:>7.3f} | {same}")

    kvloom = [k for k in (result["kvloom"], result.get("kvloom_fp32")) if k]
    lines.extend(row(k, f"-  ({k['dtype_reason']}; attention: {k.get('attention_backend')})") for k in kvloom)
    for p in result["peers"]:
        if p["error"]:
            lines.append(f"{p['name']:<12} {'':<5} {'error':>7} | {p['error'][:200]}")
        else:
            same = f"{p['matches_kvloom']}/{n}" if p["matches_kvloom"] is not None else "not compared"
            lines.append(row(p, f"{same}  ({p['description']})"))
    lines.append("TTFT, kvloom: " + TTFT_MEASURED["kvloom"])
    lines.append("TTFT, peers: " + TTFT_MEASURED["cb"])
    s = result["summary"]
    if s["best_ttft_peer"]:
        lines.append(f"best-peer p50 TTFT / kvloom p50 TTFT ({s['best_ttft_peer']}): {s['ttft_p50_ratio']:.2f}x")
        lines.append(f"kvloom tok/s / best-peer tok/s ({s['best_throughput_peer']}): {s['throughput_ratio']:.2f}x")
    if not all(k["output_lens_ok"] for k in kvloom):
        lines.append("WARNING: some kvloom requests did not generate exactly --output-len tokens")
    if s["float32_all_match"] is False:
        lines.append("WARNING: in float32, kvloom's greedy tokens differ from a peer's (see mismatched_requests)")
    elif not s["all_tokens_match"]:
        lines.append("note: in a reduced-precision dtype greedy tokens may differ at near-ties (see mismatched_requests)")
    return "\n".join(lines)
