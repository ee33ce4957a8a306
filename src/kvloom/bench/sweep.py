"""``python -m kvloom bench serve --sweep``: goodput under an SLO, kvloom vs transformers.

A ladder of Poisson rates (``--sweep``, default ``serve.SWEEP_LADDER``), climbed in ascending
order. At each rate every system still climbing serves the same schedule with the machinery
of one ``bench serve --rate`` pass (``serve.serve_kvloom`` on a fresh engine, so no prefix
cache carries over from the rate before; ``peers.serve_cb`` on a fresh manager, its model loaded
once per dtype). Per system and rate: the SLO attainment (``analysis.goodput.slo_attainment``), TTFT and
TPOT p50/p90/p99, output tokens/s, and for a peer how many requests got the tokens of kvloom
when it runs in the peer's dtype (no ``kvloom@fp32`` here: it would double the sweep's time).

Goodput of a system: the highest rate at which ``--slo-attainment`` of its requests meet both
``--slo-ttft`` and ``--slo-tpot`` (``analysis.goodput.goodput``). A system below the target at two
consecutive rates (or failing) stops climbing: it would only miss again, slowly. The headline
is kvloom's goodput over the best peer's (``analysis.goodput.goodput_ratio``).

Run time. Arrivals at rate ``r`` take ``n / r`` seconds whatever the system does, so serving
all 64 requests at 0.5 req/s takes 128 s per system. A rate therefore serves the first
``ceil(r x --sweep-duration)`` requests of the workload (default 32 s: 16 at 0.5 req/s, 32 at 1
req/s, all 64 from 2 req/s), never fewer than ``serve.SWEEP_MIN_REQUESTS`` (an attainment of 90%
must be able to miss a request) nor more than ``--num-requests``; ``--sweep-duration inf`` serves
every request at every rate. The schedule of a rate (its first ``n`` prompts and the first ``n``
arrivals of ``poisson_arrivals(seed)``: a prefix of the full schedule) is the same for every
system. Low rates leave a system mostly idle, so fewer requests there lose little.

Written next to ``--json`` (when matplotlib is installed): ``<stem>-ttft.png`` and
``<stem>-tpot.png``, latency against rate per system with the SLO drawn (``analysis.plots``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from kvloom.bench.analysis.goodput import (
    STOP_AFTER_MISSES,
    Goodput,
    RatePoint,
    format_rate,
    goodput,
    goodput_ratio,
    rate_json,
    should_stop,
    slo_attainment,
)
from kvloom.bench.analysis.latency import summarize
from kvloom.bench.analysis.plots import write_sweep_plots
from kvloom.bench.peers import DTYPE_TAGS, PeerSpec, RequestTrace, load_hf_models, serve_cb
from kvloom.bench.runner import BenchRun, refuse, start, workload_prompts, write_result
from kvloom.bench.serve import (
    LEAD_S,
    SWEEP_MIN_REQUESTS,
    TTFT_MEASURED,
    jsonable,
    poisson_arrivals,
    resolve_peers,
    serve_kvloom,
)
from kvloom.bench.settings import kvloom_config, parse_config
from kvloom.bench.workload import Workload

SCHEMA_VERSION = 1


def parse_ladder(text: str) -> list[float]:
    """``"2,0.5,inf"`` -> ``[0.5, 2.0, inf]``: ascending, each rate once, all > 0 (``inf`` allowed)."""
    rates: set[float] = set()
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        try:
            rate = float(raw)
        except ValueError:
            raise ValueError(f"--sweep: {raw!r} is not a rate (requests/s, or inf)") from None
        if not rate > 0:
            raise ValueError(f"--sweep: rates must be > 0 (or inf), got {raw}")
        rates.add(rate)
    if not rates:
        raise ValueError("--sweep: no rates given")
    return sorted(rates)


def requests_at(rate: float, duration_s: float, num_requests: int) -> int:
    """How many of the workload's requests a rate serves: ``ceil(rate x duration_s)``, at least
    ``SWEEP_MIN_REQUESTS``, at most ``num_requests`` (all of them at ``inf`` either way)."""
    if math.isinf(rate) or math.isinf(duration_s):
        return num_requests
    return min(num_requests, max(SWEEP_MIN_REQUESTS, math.ceil(rate * duration_s)))


def _check(args: argparse.Namespace) -> tuple[list[float], list[PeerSpec], dict[str, Any], Workload]:
    if args.rate is not None:
        raise ValueError("--sweep and --rate: give one of them (--sweep serves a ladder of rates)")
    ladder = parse_ladder(args.sweep)
    if not args.sweep_duration > 0:
        raise ValueError(f"--sweep-duration must be > 0 seconds (or inf), got {args.sweep_duration}")
    if not (args.slo_ttft > 0 and args.slo_tpot > 0):
        raise ValueError("--slo-ttft and --slo-tpot must be > 0 seconds")
    if not 0 < args.slo_attainment <= 1:
        raise ValueError(f"--slo-attainment must be in (0, 1], got {args.slo_attainment}")
    workload = Workload(args.num_requests, args.min_prompt_len, args.max_prompt_len, args.output_len, args.seed)
    return ladder, resolve_peers(args.peers), parse_config(args.kvloom_config), workload


def _point(rate: float, traces: list[RequestTrace], slo: tuple[float, float]) -> dict[str, Any]:
    s = summarize(traces)
    keep = ("p50", "p90", "p99")
    return {"rate": rate_json(rate), "num_requests": len(traces), "error": None,
            "attainment": round(slo_attainment(traces, *slo), 4),
            "ttft_s": {k: s["ttft_s"][k] for k in keep}, "tpot_s": {k: s["tpot_s"][k] for k in keep},
            "output_tokens_per_s": s["output_tokens_per_s"], "max_submit_lag_s": s["max_submit_lag_s"]}


def _error_point(rate: float, num_requests: int, error: str) -> dict[str, Any]:
    return {"rate": rate_json(rate), "num_requests": num_requests, "error": error, "attainment": None,
            "ttft_s": None, "tpot_s": None, "output_tokens_per_s": None, "max_submit_lag_s": None}


def _rate_points(points: list[dict[str, Any]]) -> list[RatePoint]:
    return [RatePoint(float(p["rate"]), p["attainment"]) for p in points]


def _goodput_json(g: Goodput) -> dict[str, Any]:
    return {"rate": rate_json(g.rate), "lower_bound": g.lower_bound,
            "stopped_after": None if g.stopped_after is None else rate_json(g.stopped_after),
            "misses_below": [rate_json(r) for r in g.misses_below]}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Climb the ladder; 0 when it ran (peer failures are results), 2 on bad arguments."""
    try:
        ladder, specs, user_config, workload = _check(args)
    except ValueError as exc:
        return refuse("serve", exc)
    slo = (args.slo_ttft, args.slo_tpot)
    target = args.slo_attainment
    counts = {rate: requests_at(rate, args.sweep_duration, workload.num_requests) for rate in ladder}
    bench = start("serve", argv, args.model, args.quick)
    prompts = workload_prompts(
        bench.model_dir, workload,
        f"a sweep of Poisson rates {','.join(format(r, 'g') for r in ladder)} req/s serving "
        f"{'/'.join(str(counts[r]) for r in ladder)} requests; SLO: TTFT <= {slo[0]:g} s and TPOT <= "
        f"{slo[1] * 1000:g} ms for {target:.0%} of requests; peers {','.join(s.name for s in specs) or 'none'}")
    config = kvloom_config(user_config, prompts, workload.output_len)
    if "max_waiting" not in user_config:  # high rates queue many requests at once: none may be refused
        config["max_waiting"] = workload.num_requests
    models = load_hf_models(bench.model_dir, specs)

    names = ["kvloom", *(s.name for s in specs)]
    points: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    climbing = dict.fromkeys(names, True)
    kv_dtype: str | None = None
    for rate in ladder:
        n = counts[rate]
        offsets = poisson_arrivals(n, rate, workload.seed)
        print(f"rate {rate:g} req/s: {n} requests over {offsets[-1]:.1f} s", file=sys.stderr, flush=True)
        reference: list[list[int]] | None = None
        if climbing["kvloom"]:
            print("  kvloom ...", file=sys.stderr, flush=True)
            traces, stats = asyncio.run(serve_kvloom(bench.model_dir, config, prompts[:n], offsets,
                                                     workload.output_len))
            kv_dtype = str(stats.get("dtype"))
            reference = [t.token_ids for t in traces]
            points["kvloom"].append(_point(rate, traces, slo)
                                    | {"output_lens_ok": all(len(r) == workload.output_len for r in reference)})
        for spec in specs:
            if not climbing[spec.name]:
                continue
            model, error = models.get(spec)
            peer_traces: list[RequestTrace] = []
            if error is None:
                print(f"  {spec.name} ...", file=sys.stderr, flush=True)
                try:
                    peer_traces = serve_cb(spec, model, prompts[:n], offsets, workload.output_len, LEAD_S)
                except Exception as exc:  # transformers' APIs move; report, don't crash the whole sweep
                    error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                points[spec.name].append(_error_point(rate, n, error))
                continue
            point = _point(rate, peer_traces, slo)
            if reference is not None and spec.dtype == kv_dtype:
                point["matches_kvloom"] = sum(t.token_ids == r for t, r in zip(peer_traces, reference, strict=True))
            points[spec.name].append(point)
        for name in names:
            if climbing[name] and should_stop(_rate_points(points[name]), target) and rate != ladder[-1]:
                climbing[name] = False
                why = "failed" if points[name][-1]["error"] else f"below the target at {STOP_AFTER_MISSES} rates in a row"
                print(f"  {name} stops climbing after {rate:g} req/s: {why}", file=sys.stderr, flush=True)
        if not any(climbing.values()):
            break

    result = _result(args, bench, workload, prompts, ladder, slo, target, config, kv_dtype, specs, points)
    print(format_report(result))
    if args.json is not None:
        written, skipped = write_sweep_plots(result, args.json)
        result["plots"] = [str(p) for p in written]
        print(f"plots skipped: {skipped}" if skipped else "plots: " + ", ".join(map(str, written)))
    write_result(args.json, result)
    return 0


def _result(args: argparse.Namespace, bench: BenchRun, workload: Workload, prompts: list[list[int]],
            ladder: list[float], slo: tuple[float, float], target: float, config: dict[str, Any],
            kv_dtype: str | None, specs: list[PeerSpec], points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    goodputs = {name: goodput(_rate_points(p), target, ladder) for name, p in points.items()}
    systems: list[dict[str, Any]] = [{
        "name": "kvloom", "dtype": kv_dtype, "description": "kvloom AsyncEngine, default settings",
        "config": jsonable(config), "ttft_measured": TTFT_MEASURED["kvloom"], "compared_with": None,
        "points": points["kvloom"], "goodput": _goodput_json(goodputs["kvloom"]),
    }]
    for spec in specs:
        systems.append({"name": spec.name, "dtype": spec.dtype, "description": spec.describe(),
                        "ttft_measured": TTFT_MEASURED["cb"],
                        "compared_with": "kvloom" if spec.dtype == kv_dtype else None,
                        "points": points[spec.name], "goodput": _goodput_json(goodputs[spec.name])})
    peer_goodputs = [(s.name, goodputs[s.name]) for s in specs
                     if any(p["error"] is None for p in points[s.name])]
    best = max(peer_goodputs, key=lambda item: (item[1].rate, item[1].lower_bound), default=None)
    ratio, note = goodput_ratio(goodputs["kvloom"], best[1] if best else None)
    compared = [(p["matches_kvloom"], p["num_requests"]) for s in specs for p in points[s.name]
                if p.get("matches_kvloom") is not None and s.dtype == "float32"]
    summary = {
        "kvloom_dtype": kv_dtype,
        "kvloom_goodput": rate_json(goodputs["kvloom"].rate),
        "best_peer": best[0] if best else None,
        "best_peer_goodput": rate_json(best[1].rate) if best else None,
        "goodput_ratio": None if ratio is None else round(ratio, 3),
        "goodput_ratio_note": note,
        "float32_all_match": all(m == n for m, n in compared) if compared else None,
    }
    return {
        **bench.envelope("serve", SCHEMA_VERSION, mode="sweep"),
        "workload": {**asdict(workload), "prompt_tokens": sum(map(len, prompts))},
        "sweep": {"ladder": [rate_json(r) for r in ladder], "duration_s": rate_json(args.sweep_duration),
                  "min_requests": SWEEP_MIN_REQUESTS,
                  "requests_per_rate": [requests_at(r, args.sweep_duration, workload.num_requests) for r in ladder],
                  "stop_after_misses": STOP_AFTER_MISSES},
        "slo": {"ttft_s": slo[0], "tpot_s": slo[1], "attainment": target},
        "systems": systems, "summary": summary,
    }


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report of a sweep's result dict: rate x system, then goodput."""
    slo = result["slo"]
    lines = [f"{'rate':>6} {'system':<12} {'dtype':<5} {'reqs':>4} {'SLO met':>7} {'TTFT p50 s':>10} "
             f"{'TPOT p50 ms':>11} {'tok/s':>7}  same tokens as kvloom"]
    rates = result["sweep"]["ladder"]
    for rate in rates:
        for s in result["systems"]:
            point = next((p for p in s["points"] if p["rate"] == rate), None)
            if point is None:
                continue
            head = f"{_rate_text(rate):>6} {s['name']:<12} {DTYPE_TAGS.get(s['dtype'], str(s['dtype'])):<5} {point['num_requests']:>4}"
            if point["error"]:
                lines.append(f"{head} error: {point['error'][:200]}")
                continue
            same = f"{point['matches_kvloom']}/{point['num_requests']}" if "matches_kvloom" in point else "-"
            lines.append(f"{head} {point['attainment']:>7.0%} {point['ttft_s']['p50']:>10.3f} "
                         f"{point['tpot_s']['p50'] * 1000:>11.1f} {point['output_tokens_per_s']:>7.1f}  {same}")
    lines.append(f"goodput: the highest rate at which >= {slo['attainment']:.0%} of requests get TTFT <= "
                 f"{slo['ttft_s']:g} s and TPOT <= {slo['tpot_s'] * 1000:g} ms")
    for s in result["systems"]:
        g = s["goodput"]
        text = format_rate(float(g["rate"]), g["lower_bound"])
        if g["lower_bound"]:
            text += " (met at the ladder's top: a lower bound)"
        if g["stopped_after"] is not None:
            text += f"; stopped climbing after {_rate_text(g['stopped_after'])} req/s"
        if g["misses_below"]:
            text += f"; missed the target below it, at {', '.join(map(_rate_text, g['misses_below']))} req/s"
        lines.append(f"  {s['name']:<12} {text}")
    summary = result["summary"]
    if summary["best_peer"] is None:
        lines.append("kvloom / best peer goodput: no peer ran")
    elif summary["goodput_ratio"] is None:
        lines.append(f"kvloom / best peer goodput ({summary['best_peer']}): - ({summary['goodput_ratio_note']})")
    else:
        lines.append(f"kvloom / best peer goodput ({summary['best_peer']}): {summary['goodput_ratio']:.2f}x "
                     f"({summary['goodput_ratio_note']})")
    if summary["float32_all_match"] is False:
        lines.append("WARNING: in float32, kvloom's greedy tokens differ from a peer's at some rate")
    return "\n".join(lines)


def _rate_text(rate: float | str) -> str:
    """A JSON rate as printed: ``0.5``, ``2``, ``inf``."""
    return rate if isinstance(rate, str) else f"{rate:g}"
