"""Server CPU per request over a fixed number of requests: the figure to judge a change by on a busy machine.

    python -m bench.cpu [--requests 20000] [--rounds 3] [--kinds bare,naive,ftjobs]

Each round runs every kind in turn (alternating, so drift hits them alike); each server is pinned to its own
core when the machine has two or more, the client and Valkey to the other. Prints, per kind, the median
(min-max) of user+system CPU µs per request of the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import redis.asyncio as redis

from bench import load, rawclient
from bench.run import BODY, SECRET, config, cpu_seconds, free_port, pin, start, stop, wait_port
from processor.embedded import EmbeddedValkey


async def redis_reads(url: str) -> int:
    """How many socket reads Redis has processed: with one client writing, its round trips (batches)."""
    client = redis.Redis.from_url(url)
    try:
        return int((await client.info("stats"))["total_reads_processed"])
    finally:
        await client.aclose()


def one(
    kind: str, url: str, tmp: Path, count: int, connections: int, server_core: int | None, callgrind: bool = False
) -> float:
    """Server CPU µs per request for `count` requests (with `callgrind`: instructions per request instead)."""
    port = free_port()
    out = tmp / f"callgrind-{kind}-{port}.out"
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"] if callgrind else []
    if kind in ("bare", "lowlevel"):
        process = start(["-m", "bench.apps", kind, "--port", str(port)], wrapper=wrapper)
    elif kind == "naive":
        process = start(["-m", "bench.apps", "naive", "--port", str(port), "--redis-url", url], wrapper=wrapper)
    else:
        cfg = config(tmp, url, f"cpu-{kind}", "bench.handlers:Noop", port)
        process = start(["-m", "processor", "-c", str(cfg), "receive"], wrapper=wrapper)
    try:
        if server_core is not None:
            pin(process.pid, server_core)
        wait_port(port, timeout=120)
        target = f"http://127.0.0.1:{port}/webhooks/openai"
        warm = rawclient.build(target, BODY, load.presign(BODY, SECRET, 2000).signed)
        asyncio.run(rawclient.run("127.0.0.1", port, warm, 30, connections))
        reqs = rawclient.build(target, BODY, load.presign(BODY, SECRET, count).signed)
        if callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
        reads_before = asyncio.run(redis_reads(url))
        before = cpu_seconds(process.pid)
        latencies, errors, _ = asyncio.run(rawclient.run("127.0.0.1", port, reqs, 3600, connections))
        used = cpu_seconds(process.pid) - before
        round_trips = (asyncio.run(redis_reads(url)) - reads_before) / len(latencies)
        print(f"  {kind}: {round_trips:.3f} Redis reads (round trips) per request", file=sys.stderr)
        if errors:
            print(f"  {kind}: {errors} errors", file=sys.stderr)
        if callgrind:
            subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-i", "off", str(process.pid)], check=True, capture_output=True)
            totals = [
                int(line.split()[1])
                for path in tmp.glob(f"{out.name}*")
                for line in path.read_text().splitlines()
                if line.startswith(("summary:", "totals:"))
            ]
            if keep := os.environ.get("FTJOBS_BENCH_KEEP"):  # a folder to keep the profile in, for callgrind_annotate
                for path in tmp.glob(f"{out.name}*"):
                    shutil.copy(path, keep)
            return max(totals) / len(latencies)
        return used / len(latencies) * 1e6
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--kinds", default="bare,naive,ftjobs")
    parser.add_argument("--callgrind", action="store_true", help="instructions per request (valgrind), not CPU time")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[-1] if len(cores) >= 2 else None
    if server_core is not None:
        os.sched_setaffinity(0, [c for c in cores if c != server_core])
    kinds = args.kinds.split(",")
    figures: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="ftjobs-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        server = EmbeddedValkey(tmp / "valkey")
        server.start()
        try:
            for _ in range(args.rounds):
                for kind in kinds:
                    figures[kind].append(
                        one(kind, server.url, tmp, args.requests, args.connections, server_core, args.callgrind)
                    )
                    print(f"  {kind}: {figures[kind][-1]:.1f}", file=sys.stderr)
        finally:
            server.stop()
    for kind, values in figures.items():
        unit = "instructions" if args.callgrind else "µs"
        print(
            f"{kind:8} {statistics.median(values):9.1f} {unit}/request (min {min(values):.1f}, max {max(values):.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
