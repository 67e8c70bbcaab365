"""The benchmark's report: the table printed (and quoted in the README) and the chart it shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"p1_ratio": 0.80, "p2_ratio": 0.50, "p3_p50_ms": 1.5, "p3_p99_ms": 5.0, "p4_ratio": 1.0, "p5_rss_mb": 80}


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(13, 4))
    p1 = results["p1"]
    names = ["bare aiohttp\n(limit)", "naive\ndecode+XADD", "ftjobs\nreceiver"]
    values = [p1["bare"]["rps"], p1["naive"]["rps"], p1["ftjobs"]["rps"]]
    left.bar(names, values, color=["#9e9e9e", "#f0a030", "#2e7dd7"])
    left.set_title(f"P1 ingest, requests/s (ftjobs = {p1['ratio']:.2f} of the limit)")
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
    fig.suptitle(f"ftjobs benchmark — {results['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(r: dict[str, Any]) -> str:
    p1, p2, p3, p4, p5, t = r["p1"], r["p2"], r["p3"], r["p4"], r["p5"], r["targets"]
    e3 = p3["everysec"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        (
            "P1 ingest",
            f"{p1['ftjobs']['rps']:,.0f} req/s vs limit {p1['bare']['rps']:,.0f} (naive {p1['naive']['rps']:,.0f})",
            f"{p1['ratio']:.2f}",
            f"≥ {t['p1_ratio']}",
            met(p1["ratio"] >= t["p1_ratio"]),
        ),
        (
            "P1, everysec",
            f"{p1['ftjobs_everysec']['rps']:,.0f} req/s with appendfsync everysec",
            f"{p1['ftjobs_everysec']['rps'] / p1['bare']['rps']:.2f}",
            "",
            "for comparison",
        ),
        (
            "P2 dispatch",
            f"{p2['ftjobs_per_s']:,.0f} ev/s vs raw loop {p2['raw_per_s']:,.0f}",
            f"{p2['ratio']:.2f}",
            f"≥ {t['p2_ratio']}",
            met(p2["ratio"] >= t["p2_ratio"]),
        ),
        (
            "P3 latency",
            f"p50 {p3['p50_ms']} ms, p90 {p3['p90_ms']} ms, p99 {p3['p99_ms']} ms at {p3['offered_per_s']}/s",
            "",
            f"≤ {t['p3_p50_ms']} / {t['p3_p99_ms']} ms",
            met(p3["p50_ms"] <= t["p3_p50_ms"] and p3["p99_ms"] <= t["p3_p99_ms"]),
        ),
        (
            "P3, everysec",
            f"p50 {e3['p50_ms']} ms, p90 {e3['p90_ms']} ms, p99 {e3['p99_ms']} ms with appendfsync everysec",
            "",
            "",
            met(e3["p50_ms"] <= t["p3_p50_ms"] and e3["p99_ms"] <= t["p3_p99_ms"]),
        ),
        (
            "P4 memory",
            f"{p4['bytes_per_event']:,.0f} B per queued event (entry + dedupe key), body {p4['body_bytes']} B; "
            f"plus {p4['job_state_bytes']:,.0f} B of state per job",
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
