"""Where a worker's dispatch time goes: P2's drain (no-op handler) under cProfile, grouped by library.

    python -m bench.profile [--events 20000] [--redis-url URL]

Without `--redis-url` it starts a private Valkey like `bench.run` (AOF, `appendfsync always`). It drains a
backlog once to warm up, then once with only the worker under the profiler (not the backlog's XADDs), and
prints each area's share of the process's own time in that window
(ftjobs, redis-py, asyncio, msgspec, metrics, logging, other) and the functions that cost most. cProfile
slows small Python functions more than C ones, so read the shares as where to look, not as exact costs;
the throughput to judge a change by is `bench.run`'s P2, without the profiler.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis.asyncio as redis

from bench.run import drain, preload
from processor import logs
from processor.embedded import EmbeddedValkey

#: (area, what a profiled function's file path or name contains), the first match wins.
AREAS = (
    ("ftjobs", ("/processor/", "/handlers/")),
    ("redis-py", ("/redis/", "hiredis")),
    ("msgspec", ("msgspec",)),
    ("metrics", ("prometheus_client",)),
    ("logging", ("structlog", "/logging/")),
    ("asyncio", ("/asyncio/", "_asyncio", "select.epoll", "_socket", "selectors")),
)


def area(where: str) -> str:
    return next((name for name, marks in AREAS if any(m in where for m in marks)), "other")


def where(func: tuple[str, int, str]) -> str:
    path, line, name = func
    return f"{path}:{line}({name})" if path != "~" else name


def profile(url: str, events: int) -> pstats.Stats:
    """Drain `events` once to warm up, then once more with only the worker under the profiler."""

    async def run(profiler: cProfile.Profile | None) -> float:
        client = redis.Redis.from_url(url)
        try:
            prefix = f"profile-{uuid.uuid4().hex[:6]}"
            await preload(client, prefix, "probe", events)
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            await drain(client, url, prefix)
            if profiler:
                profiler.disable()
            return events / (time.perf_counter() - started)
        finally:
            await client.aclose()

    asyncio.run(run(None))  # warm up: imports, scripts, connections
    profiler = cProfile.Profile()
    rate = asyncio.run(run(profiler))
    print(f"drained {events:,} events at {rate:,.0f} ev/s under the profiler", file=sys.stderr)
    return pstats.Stats(profiler)


def report(stats: pstats.Stats, top: int) -> str:
    """Each area's share of the profiled own time, then the costliest functions."""
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in raw.values()) or 1.0
    shares: Counter[str] = Counter()
    for func, row in raw.items():
        shares[area(where(func))] += row[2]
    lines = ["area        share of the worker's own time"]
    lines += [f"{name:11} {seconds / total:6.1%}" for name, seconds in shares.most_common()]
    lines += ["", "top functions (own time)"]
    for func, row in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"{row[2] / total:6.1%}  {row[1]:>8} calls  {where(func)[-90:]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--redis-url", help="a Redis to use (default: a private Valkey, appendfsync always)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    logs.configure("warning", "json")
    if args.redis_url:
        print(report(profile(args.redis_url, args.events), args.top))
        return 0
    with tempfile.TemporaryDirectory(prefix="ftjobs-profile-") as tmp:
        server = EmbeddedValkey(Path(tmp) / "valkey")
        server.start()
        try:
            print(report(profile(server.url, args.events), args.top))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
