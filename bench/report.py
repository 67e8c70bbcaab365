"""The benchmark's report: the table printed (and quoted in the README) and the chart it shows.

Every figure is a median over alternating rounds; its min and max are shown beside it (the table) or as an
error bar (the chart). P1's ratio is the ingest efficiency: the limit's server CPU per request ÷ ftjobs'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"p1_ratio": 0.60, "p2_ratio": 0.60, "p3_p50_ms": 1.5, "p3_p99_ms": 5.0, "p4_ratio": 1.0, "p5_rss_mb": 80}


def spread(figure: dict[str, Any], key: str, fmt: str = ",.0f") -> str:
    """`median (min-max)` of one summarized figure."""
    return f"{figure[key]:{fmt}} ({figure['min'][key]:{fmt}}-{figure['max'][key]:{fmt}})"


def _cpu(figure: dict[str, Any], which: str = "") -> float:
    source = figure[which] if which else figure
    return float(source["cpu_us_per_request"]["server"])


def describe_machine(machine: Any) -> str:
    if isinstance(machine, str):
        return machine
    return f"{machine['cores']} cores ({machine['cpu_model']}), {machine['python']}"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(13, 4))
    p1 = results["p1"]
    names = ["bare aiohttp\n(limit)", "naive\ndecode+XADD", "ftjobs\nreceiver"]
    kinds = [p1["bare"], p1["naive"], p1["ftjobs"]]
    values = [k["rps"] for k in kinds]
    errors = [[k["rps"] - k["min"]["rps"] for k in kinds], [k["max"]["rps"] - k["rps"] for k in kinds]]
    left.bar(names, values, yerr=errors, capsize=4, color=["#9e9e9e", "#f0a030", "#2e7dd7"])
    for i, k in enumerate(kinds):
        left.annotate(f"{_cpu(k):.0f} µs CPU/req", (i, k["rps"]), ha="center", va="bottom", fontsize=8)
    left.set_title(f"P1 ingest, requests/s (CPU efficiency {p1['ratio']:.2f})")
    p2 = results["p2"]
    mid.bar(
        ["raw XREADGROUP\n+XACK", "ftjobs worker\n(no-op handler)"],
        [p2["raw_per_s"], p2["ftjobs_per_s"]],
        color=["#9e9e9e", "#2e7dd7"],
    )
    mid.set_title(f"P2 dispatch, events/s (ratio {p2['ratio']:.2f})")
    p3 = results["p3"]
    right.bar(["p50", "p90", "p99"], [p3["p50_ms"], p3["p90_ms"], p3["p99_ms"]], color="#2e7dd7")
    right.axhline(TARGETS["p3_p99_ms"], color="#d40e0d", linestyle="--", label="p99 target")
    right.axhline(TARGETS["p3_p50_ms"], color="#f0a030", linestyle=":", label="p50 target")
    right.set_yscale("log")
    right.set_title(f"P3 POST → handler start, ms, log scale ({p3['offered_per_s']}/s)")
    right.legend()
    fig.suptitle(f"ftjobs benchmark — {describe_machine(results['machine'])}, median of {results.get('rounds', 1)}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(r: dict[str, Any]) -> str:
    p1, p2, p3, p4, p5, t = r["p1"], r["p2"], r["p3"], r["p4"], r["p5"], r["targets"]
    e3 = p3["everysec"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    ratios = p1["ratios"]
    rows = [
        (
            "P1 ingest",
            f"server CPU {_cpu(p1['ftjobs']):.0f} µs/request vs limit {_cpu(p1['bare']):.0f} "
            f"(naive {_cpu(p1['naive']):.0f}); {spread(p1['ftjobs'], 'rps')} req/s vs limit "
            f"{spread(p1['bare'], 'rps')} (naive {spread(p1['naive'], 'rps')})",
            f"{spread(ratios, 'efficiency', '.2f')}",
            f"≥ {t['p1_ratio']}",
            met(p1["ratio"] >= t["p1_ratio"]),
        ),
        (
            "P1 vs naive",
            f"{spread(ratios, 'vs_naive_rps', '.2f')}x the req/s, {spread(ratios, 'vs_naive_cpu', '.2f')}x less CPU "
            "per request",
            "",
            "≥ 1.5x",
            met(ratios["vs_naive_rps"] >= 1.5 and ratios["vs_naive_cpu"] >= 1.5),
        ),
        (
            "P1, everysec",
            f"{spread(p1['ftjobs_everysec'], 'rps')} req/s, {_cpu(p1['ftjobs_everysec']):.0f} µs CPU/request "
            "with appendfsync everysec",
            f"{_cpu(p1['bare']) / max(0.001, _cpu(p1['ftjobs_everysec'])):.2f}",
            "",
            "for comparison",
        ),
        (
            "P2 dispatch",
            f"{spread(p2, 'ftjobs_per_s')} ev/s vs raw loop {spread(p2, 'raw_per_s')}",
            f"{spread(p2, 'ratio', '.2f')}",
            f"≥ {t['p2_ratio']}",
            met(p2["ratio"] >= t["p2_ratio"]),
        ),
        (
            "P3 latency",
            f"p50 {spread(p3, 'p50_ms', '.2f')} ms, p90 {p3['p90_ms']:.2f} ms, p99 {spread(p3, 'p99_ms', '.2f')} ms "
            f"at {p3['offered_per_s']}/s",
            "",
            f"≤ {t['p3_p50_ms']} / {t['p3_p99_ms']} ms",
            met(p3["p50_ms"] <= t["p3_p50_ms"] and p3["p99_ms"] <= t["p3_p99_ms"]),
        ),
        (
            "P3, everysec",
            f"p50 {spread(e3, 'p50_ms', '.2f')} ms, p90 {e3['p90_ms']:.2f} ms, p99 {spread(e3, 'p99_ms', '.2f')} ms "
            "with appendfsync everysec",
            "",
            "",
            met(e3["p50_ms"] <= t["p3_p50_ms"] and e3["p99_ms"] <= t["p3_p99_ms"]),
        ),
        (
            "P4 memory",
            f"{p4['bytes_per_event']:,.0f} B per queued event (entry + dedupe key), body {p4['body_bytes']} B; "
            f"plus {p4['job_state_bytes']:,.0f} B of state for its one job (timeline full: 200 events)",
            f"{p4['ratio']:.2f}",
            f"≤ {t['p4_ratio']}",
            met(p4["ratio"] <= t["p4_ratio"]),
        ),
        (
            "P5 RSS",
            f"{p5['receiver_rss_mb']} MB under load",
            "",
            f"≤ {t['p5_rss_mb']} MB",
            met(p5["receiver_rss_mb"] <= t["p5_rss_mb"]),
        ),
    ]
    lines = ["| metric | measured | ratio | target | |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)
