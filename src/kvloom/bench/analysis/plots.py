"""Plots of a ``bench serve --sweep`` result: TTFT and TPOT against the arrival rate.

Two PNGs next to the JSON (``<stem>-ttft.png``, ``<stem>-tpot.png``): per system, the p50 as a
line with markers and the p50..p90 band shaded, the SLO as a dashed horizontal line; both axes
logarithmic (the ladder roughly doubles; latencies span orders of magnitude once a system falls
behind). The rate ``inf`` (every request at once) is drawn one doubling past the top finite rate.

matplotlib is optional (the ``bench`` extra): without it nothing is drawn and the reason is
returned. Only ``matplotlib.figure.Figure`` is used, never ``pyplot``: no global figure state,
no backend to select, nothing left open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS = (("ttft_s", "TTFT", "s", 1.0), ("tpot_s", "TPOT", "ms", 1000.0))
"""(result key, title, unit, scale from seconds)."""


def _x_positions(ladder: list[float | str]) -> dict[str, float]:
    """Each ladder rate (as ``str``) -> where it is drawn: itself, ``inf`` one doubling past the top."""
    finite = [float(r) for r in ladder if r != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    return {str(r): inf_x if r == "inf" else float(r) for r in ladder}


def write_sweep_plots(result: dict[str, Any], json_path: Path) -> tuple[list[Path], str | None]:
    """Write the two plots of ``result`` (a sweep's JSON dict) next to ``json_path``: the paths
    written, and None; or no paths and why the plots were skipped."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError as exc:
        return [], f"matplotlib is not importable ({exc}); pip install 'kvloom[bench]'"
    ladder = result["sweep"]["ladder"]
    where = _x_positions(ladder)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, title, unit, scale in METRICS:
        fig = Figure(figsize=(7.5, 4.5), layout="constrained")
        ax = fig.subplots()
        for system in result["systems"]:
            rows = [(where[str(p["rate"])], p[key]["p50"] * scale, p[key]["p90"] * scale)
                    for p in system["points"] if p["error"] is None and p[key] and p[key]["p50"] is not None]
            if not rows:
                continue
            xs, p50, p90 = zip(*rows, strict=True)
            (line,) = ax.plot(xs, p50, marker="o", label=f"{system['name']} p50")
            ax.fill_between(xs, p50, p90, color=line.get_color(), alpha=0.15, linewidth=0)
            ax.plot(xs, p90, color=line.get_color(), linestyle=":", linewidth=1)
        slo = result["slo"][key] * scale
        ax.axhline(slo, color="black", linestyle="--", linewidth=1, label=f"SLO {slo:g} {unit}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(list(where.values())))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(r) if r == "inf" else f"{float(r):g}" for r in ladder])
        ax.set_yscale("log")
        ax.set_xlabel("Poisson arrival rate (requests/s)")
        ax.set_ylabel(f"{title} ({unit})")
        ax.set_title(f"{title} vs rate: p50 (line), p50-p90 (band), p90 (dotted)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        path = json_path.with_name(f"{json_path.stem}-{key.removesuffix('_s')}.png")
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths, None
