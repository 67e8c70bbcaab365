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
import statistics
import sys
import tempfile
from pathlib import Path

from bench import load, rawclient
from bench.run import BODY, SECRET, config, cpu_seconds, free_port, pin, start, stop, wait_port
from processor.embedded import EmbeddedValkey


def one(kind: str, url: str, tmp: Path, count: int, connections: int, server_core: int | None) -> float:
    port = free_port()
    if kind == "bare":
        process = start(["-m", "bench.apps", "bare", "--port", str(port)])
    elif kind == "naive":
        process = start(["-m", "bench.apps", "naive", "--port", str(port), "--redis-url", url])
    else:
        cfg = config(tmp, url, f"cpu-{kind}", "bench.handlers:Noop", port)
        process = start(["-m", "processor", "-c", str(cfg), "receive"])
    try:
        if server_core is not None:
            pin(process.pid, server_core)
        wait_port(port)
        target = f"http://127.0.0.1:{port}/webhooks/openai"
        warm = rawclient.build(target, BODY, load.presign(BODY, SECRET, 2000).signed)
        asyncio.run(rawclient.run("127.0.0.1", port, warm, 30, connections))
        reqs = rawclient.build(target, BODY, load.presign(BODY, SECRET, count).signed)
        before = cpu_seconds(process.pid)
        latencies, errors, _ = asyncio.run(rawclient.run("127.0.0.1", port, reqs, 120, connections))
        used = cpu_seconds(process.pid) - before
        if errors:
            print(f"  {kind}: {errors} errors", file=sys.stderr)
        return used / len(latencies) * 1e6
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--kinds", default="bare,naive,ftjobs")
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
                    figures[kind].append(one(kind, server.url, tmp, args.requests, args.connections, server_core))
                    print(f"  {kind}: {figures[kind][-1]:.1f} µs", file=sys.stderr)
        finally:
            server.stop()
    for kind, values in figures.items():
        print(f"{kind:8} {statistics.median(values):7.1f} µs/request (min {min(values):.1f}, max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
