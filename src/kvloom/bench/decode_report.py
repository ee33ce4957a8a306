"""``bench decode``'s summary and printed report, both read from its result dict (the JSON).

The targets of the performance issue are printed as information, never as a pass or fail of
the command: kvloom at >= 60% of the bandwidth roofline at concurrency 64, >= 3x transformers'
continuous batching at 256 (both on a GPU), start-up (``LLM(...)``) under 30 s on a GPU.
"""

from __future__ import annotations

from typing import Any

from kvloom.bench.peers import DTYPE_TAGS

STARTUP_TARGET_S = 30.0
ROOFLINE_TARGET = (64, 60.0)
"""(concurrency, percent of the roofline)."""
CB_TARGET = (256, 3.0)
"""(concurrency, kvloom / best continuous-batching configuration)."""


def _best(systems: list[dict[str, Any]], cb_only: bool = False) -> dict[str, Any] | None:
    ran = [s for s in systems[1:] if s["decode_tokens_per_s"] is not None and (s["name"].startswith("cb") or not cb_only)]
    return max(ran, key=lambda s: s["decode_tokens_per_s"], default=None)


def _ratio(kvloom: float | None, peer: dict[str, Any] | None) -> float | None:
    return round(kvloom / peer["decode_tokens_per_s"], 3) if kvloom and peer else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: kvloom's decode tokens/s, % of the roofline, ratio to the best peer and to
    the best ``cb``; token agreement over every concurrency; the targets, as information."""
    rows = []
    for r in result["results"]:
        kv = r["systems"][0]
        best, best_cb = _best(r["systems"]), _best(r["systems"], cb_only=True)
        rows.append({
            "concurrency": r["concurrency"], "kvloom_decode_tokens_per_s": kv["decode_tokens_per_s"],
            "roofline_decode_tokens_per_s": r["roofline"]["decode_tokens_per_s"],
            "kvloom_pct_of_roofline": kv.get("pct_of_roofline"),
            "best_peer": best["config"] if best else None,
            "ratio_to_best_peer": _ratio(kv["decode_tokens_per_s"], best),
            "best_cb": best_cb["config"] if best_cb else None,
            "ratio_to_best_cb": _ratio(kv["decode_tokens_per_s"], best_cb),
        })
    peers: dict[str, int | None] = {}
    requests = sum(r["concurrency"] for r in result["results"])
    for name in result["workload"]["peers"]:
        counts = [s["matches_kvloom"] for r in result["results"] for s in r["systems"] if s["name"] == name]
        peers[name] = sum(counts) if counts and None not in counts else None
    compared = [m for m in peers.values() if m is not None]
    all_match = all(m == requests for m in compared) if compared else None
    kvloom = result["kvloom"]
    on_gpu = kvloom["device"].startswith("cuda")
    by_c = {row["concurrency"]: row for row in rows}
    roof_c, roof_pct = ROOFLINE_TARGET
    cb_c, cb_ratio = CB_TARGET
    return {
        "kvloom_dtype": kvloom["dtype"], "by_concurrency": rows,
        "agreement": {"dtype": kvloom["dtype"], "requests": requests, "peers": peers, "all_match": all_match},
        "float32_all_match": all_match if kvloom["dtype"] == "float32" else None,
        "startup_s": kvloom["startup_s"], "startup_target_s": STARTUP_TARGET_S,
        "startup_target_met": kvloom["startup_s"] < STARTUP_TARGET_S if on_gpu else None,
        "targets": {
            "pct_of_roofline": {"concurrency": roof_c, "target": roof_pct,
                                "kvloom": by_c.get(roof_c, {}).get("kvloom_pct_of_roofline")},
            "ratio_to_cb": {"concurrency": cb_c, "target": cb_ratio,
                            "kvloom": by_c.get(cb_c, {}).get("ratio_to_best_cb")},
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report of a result dict (the JSON ``decode.run`` writes)."""
    kv, s = result["kvloom"], result["summary"]
    tag = DTYPE_TAGS.get(kv["dtype"], kv["dtype"])
    bw = result["machine"]["bandwidth"]
    startup = f"start-up (LLM(...): load, KV allocation, graph capture if any) {kv['startup_s']:.2f} s"
    if s["startup_target_met"] is not None:
        startup += f"; target < {s['startup_target_s']:g} s on GPU: {'met' if s['startup_target_met'] else 'NOT met'}"
    graphs = kv.get("captured_graph_sizes")
    ahead = "on" if kv.get("async_scheduling") else "off"
    lines = [f"kvloom: {kv['device']}, {kv['dtype']} ({kv['dtype_reason']}); {startup}",
             f"decode graphs: {len(graphs) if graphs else 'none'} sizes captured; scheduling ahead: {ahead}",
             f"bandwidth: {bw['gbps']:g} GB/s ({bw['source']})"]
    for r, row in zip(result["results"], s["by_concurrency"], strict=True):
        roof, c = r["roofline"], r["concurrency"]
        lines += ["", f"concurrency {c}: roofline {roof['decode_tokens_per_s']:.1f} decode tok/s (a step reads "
                  f"{roof['weight_bytes'] / 1e9:.3g} GB of weights + {roof['kv_bytes'] / 1e9:.3g} GB of KV at a "
                  f"mean context of {roof['mean_context']:g} tokens, at {roof['bandwidth_gbps']:g} GB/s)",
                  f"{'system':<8} {'dtype':<5} {'decode tok/s':>12} {'out tok/s':>10} {'all first s':>11} "
                  f"{'roofline':>8}  same tokens as kvloom"]
        for sys_ in r["systems"]:
            if sys_["error"]:
                lines.append(f"{sys_['name']:<8} {tag:<5} {'error':>12}  {sys_['error'][:200]}")
                continue
            same = "-" if sys_["matches_kvloom"] is None else f"{sys_['matches_kvloom']}/{c}"
            pct = f"{sys_['pct_of_roofline']:.3g}%" if sys_.get("pct_of_roofline") is not None else ""
            lines.append(f"{sys_['name']:<8} {tag:<5} {_fmt(sys_['decode_tokens_per_s'], '.1f'):>12} "
                         f"{sys_['output_tokens_per_s']:>10.1f} {sys_['all_first_token_s']:>11.3f} {pct:>8}  "
                         f"{same}  ({sys_['description']})")
        if row["ratio_to_best_peer"] is not None:
            lines.append(f"kvloom / best transformers ({row['best_peer']}): "
                         f"{row['ratio_to_best_peer']:.2f}x decode tok/s")
    lines.append("")
    pcts = ", ".join(f"{row['concurrency']}: {_fmt(row['kvloom_pct_of_roofline'], '.3g')}%"
                     for row in s["by_concurrency"])
    lines.append(f"kvloom's share of the bandwidth roofline by concurrency: {pcts}")
    t = s["targets"]
    pct, ratio = t["pct_of_roofline"], t["ratio_to_cb"]
    lines.append(f"target (information): concurrency {pct['concurrency']} at >= {pct['target']:g}% of the bandwidth "
                 f"roofline: kvloom {_fmt(pct['kvloom'], '.3g')}%" + ("" if pct["kvloom"] is not None else
                                                                     " (not measured here)"))
    lines.append(f"target (information): >= {ratio['target']:g}x transformers continuous batching at "
                 f"{ratio['concurrency']} on a GPU: kvloom {_fmt(ratio['kvloom'], '.2f')}x"
                 + ("" if ratio["kvloom"] is not None else " (not measured here)"))
    a = s["agreement"]
    if a["peers"]:
        counts = ", ".join(f"{n} {'-' if m is None else m}/{a['requests']}" for n, m in a["peers"].items())
        lines.append(f"same greedy tokens as kvloom, {a['dtype']}, all concurrencies: {counts}")
    if not all(sys_.get("output_lens_ok", True) for r in result["results"] for sys_ in r["systems"]):
        lines.append("WARNING: some requests did not generate exactly --output-len tokens")
    if s["float32_all_match"] is False:
        lines.append("WARNING: in float32, kvloom's greedy tokens differ from a peer's (see mismatched_requests); "
                     "float32 greedy must agree on every request")
    elif a["all_match"] is False:
        lines.append("note: in a reduced-precision dtype greedy tokens may differ at near-ties (see mismatched_requests)")
    return "\n".join(lines)
