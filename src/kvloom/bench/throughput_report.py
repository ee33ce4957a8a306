"""``bench throughput``'s printed report, read from its result dict (the JSON ``throughput.run`` writes):
one line per system (tokens/s, wall, TTFT, agreement with kvloom in its dtype), kvloom's ratio to the
best peer, the GEMM floor, the agreement per dtype, and warnings where greedy tokens disagree."""

from __future__ import annotations

from typing import Any

from kvloom.bench.peers import DTYPE_TAGS


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a result dict (the JSON ``run`` writes)."""
    n = result["workload"]["num_requests"]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def tag(dtype: str) -> str:
        return DTYPE_TAGS.get(dtype, dtype)

    kv = result["kvloom"]
    lines = [f"{'system':<14} {'dtype':<5} {'tok/s':>8} {'wall s':>8} {'TTFT s':>8}  same tokens as kvloom (same dtype)"]
    for k in filter(None, (kv, result.get("kvloom_fp32"), result.get("kvloom_int8"))):
        lines.append(f"{k['name']:<14} {tag(k['dtype']):<5} {k['tokens_per_s']:>8.1f} {k['wall_s']:>8.2f} "
                     f"{fmt(k['mean_ttft_s'], '.2f'):>8}  -  ({k['dtype_reason']}; attention: "
                     f"{k.get('attention_backend', '?')}; scheduling ahead: {'on' if k.get('async_scheduling') else 'off'})")
    for p in result["peers"]:
        if p["error"]:
            lines.append(f"{p['name']:<14} {tag(p['dtype']):<5} {'error':>8}  {p['error'][:200]}")
            continue
        same = f"{p['matches_kvloom']}/{n}" if p["matches_kvloom"] is not None else "not compared"
        lines.append(f"{p['name']:<14} {tag(p['dtype']):<5} {p['tokens_per_s']:>8.1f} {p['wall_s']:>8.2f} "
                     f"{fmt(p['mean_ttft_s'], '.2f'):>8}  {same}  ({p['description']})")
    s = result["summary"]
    if s["best_peer"]:
        lines.append(f"kvloom ({tag(s['kvloom_dtype'])}) / best transformers ({s['best_peer']}): "
                     f"{s['ratio_to_best_peer']:.2f}x")
    if s.get("int8_ratio_to_kvloom") is not None:
        lines.append(f"kvloom@int8 / kvloom ({tag(s['kvloom_dtype'])}): {s['int8_ratio_to_kvloom']:.2f}x")
    floor = result["floor"]
    if floor["floor_s"] is not None:
        lines.append(f"floor {floor['floor_s']:.3g} s ({floor['floor_tokens_per_s']:.1f} tok/s) in {floor['dtype']}: "
                     f"prefill {floor['prefill_s']:.3g} s + decode {floor['decode_s']:.3g} s "
                     f"({floor['decode_bound']}-bound); kvloom at {floor['kvloom_pct_of_floor']:.0f}% of it")
    else:
        lines.append(f"floor: not computed ({floor['reason']})")
    for dtype, a in s["agreement"].items():
        if a["peers"]:
            counts = ", ".join(f"{name} {'-' if m is None else m}/{n}" for name, m in a["peers"].items())
            against = a["compared_with"] or f"nothing (no kvloom run in {dtype})"
            lines.append(f"same greedy tokens, {dtype} (against {against}): {counts}")
    lines.append(f"kvloom KV waste at peak (allocated slots / tokens held): {s['kv_peak_waste']:.3f}")
    if not all(k["output_lens_ok"] for k in filter(None, (kv, result.get("kvloom_fp32")))):
        lines.append("WARNING: some kvloom requests did not generate exactly --output-len tokens")
    if s["float32_all_match"] is False:
        lines.append("WARNING: in float32, kvloom's greedy tokens differ from a peer's (see mismatched_requests); "
                     "float32 greedy must agree on every request, except at a near-tie (logits a few float32 ulp "
                     "apart, which any other summation order may flip):")
        lines.extend(f"  {d['peer']}: {d['description']}" for d in s.get("float32_divergences", []))
    elif not s["all_tokens_match"]:
        lines.append("note: in a reduced-precision dtype greedy tokens may differ at near-ties (see mismatched_requests)")
    return "\n".join(lines)
