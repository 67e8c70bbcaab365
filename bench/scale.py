"""Scaling: events/s through 1 and 2 receiver processes and through 1 and 2 worker processes, on one Valkey
server and on a local Valkey Cluster (3 masters, 3 replicas), both with 16 partitions and `appendfsync
everysec` (the same durability on both; the cluster's replicas add their own writes).

    python -m bench.scale [--seconds 5] [--out bench/results/scale.json]

Ingest: wrk (or the Python client when wrk is missing) posts pre-signed requests, each for its own job (so
the events spread over the partitions), to `ftjobs receive --workers R` for `--seconds`. Dispatch: the
events that ingest stored wait in the stream; W `ftjobs work` processes with a no-op handler start, and
events/s is counted from the first delivery to the last. Every figure is the median of `--rounds` rounds,
with min and max. The machine has the cores it reports (`cores`): on two cores, a second process of a kind
competes with the load generator and Valkey for the same cores, which bounds what it can add.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from bench.run import free_port, machine, stop
from processor import signatures
from processor.client import open_client
from processor.embedded import server_binary
from processor.keys import Keys
from processor.stream import Streams
from tests.cluster import LocalCluster, free_cluster_ports

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + "c2NhbGluZy1iZW5jaG1hcmstc2VjcmV0LWtleQ=="
PARTITIONS = 16
JOB: dict[str, Any] = msgspec.json.decode(
    (ROOT / "processor" / "samples" / "fine_tuning_job.succeeded.json").read_bytes()
)

#: Reads one request per line, "id timestamp signature body", and sends them in turn (each its own job).
WRK_SCRIPT = """
local reqs = {}
function init(args)  -- per thread, once wrk knows the URL's path
  for line in io.lines(os.getenv("FTJOBS_BENCH_DATA") .. "/requests.txt") do
    local id, ts, sig, body = line:match("^(%S+) (%S+) (%S+) (.*)$")
    reqs[#reqs + 1] = wrk.format("POST", nil, {["Content-Type"] = "application/json", ["webhook-id"] = id,
                                 ["webhook-timestamp"] = ts, ["webhook-signature"] = sig}, body)
  end
end
local counter = 0
function request()
  counter = counter + 1
  return reqs[(counter % #reqs) + 1]
end
"""


def presign(count: int) -> list[tuple[str, str, str, bytes]]:
    """`count` requests, each a job of its own, signed now (id, timestamp, signature, body)."""
    key, now, run = signatures.parse_secret(SECRET), str(int(time.time())), uuid.uuid4().hex[:8]
    out = []
    for i in range(count):
        body = msgspec.json.encode(JOB | {"id": f"ftjob-{run}{i:07d}"})
        msg_id = f"wh_{run}{i:07d}"
        out.append((msg_id, now, signatures.sign(key, msg_id, now, body), body))
    return out


def send(url: str, requests: list[tuple[str, str, str, bytes]], seconds: float) -> tuple[int, float]:
    """Post for `seconds` (wrk when installed); returns (2xx answers, seconds)."""
    if shutil.which("wrk"):
        with tempfile.TemporaryDirectory() as tmp:
            lines = b"".join(b"%s %s %s %s\n" % (i.encode(), t.encode(), s.encode(), b) for i, t, s, b in requests)
            (Path(tmp) / "requests.txt").write_bytes(lines)
            (Path(tmp) / "scale.lua").write_text(WRK_SCRIPT)
            env = {"FTJOBS_BENCH_DATA": tmp, "PATH": "/usr/bin:/bin"}
            args = ["wrk", "-t1", "-c64", f"-d{max(1, round(seconds))}s", "-s", str(Path(tmp) / "scale.lua"), url]
            out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=seconds + 60, check=True).stdout
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return total - (int(bad.group(1)) if bad else 0), seconds
    return asyncio.run(_send_python(url, requests, seconds))


async def _send_python(url: str, requests: list[tuple[str, str, str, bytes]], seconds: float) -> tuple[int, float]:
    import aiohttp

    ok, index, deadline = 0, 0, time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal ok, index
        while time.monotonic() < deadline and index < len(requests):
            msg_id, ts, sig, body = requests[index]
            index += 1
            headers = {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": sig}
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                ok += resp.status == 200

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(64)))
    return ok, time.monotonic() - started


def start(args: list[str], config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "FTJOBS_CONFIG"}}
    env |= {"FTJOBS_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "processor", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def write_config(tmp: Path, url: str, prefix: str, port: int) -> Path:
    path = tmp / f"{prefix}.toml"
    path.write_text(
        f'[receiver]\nport = {port}\nsecrets = ["{SECRET}"]\n'
        f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\npartitions = {PARTITIONS}\n'
        f'[log]\nlevel = "warning"\n[worker]\nblock_ms = 50\nbatch_size = 128\n'
        f'[[handlers]]\nname = "noop"\ntype = "bench.handlers:Noop"\nconcurrency = 32\n'
    )
    return path


def wait_ready(port: int, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"receiver on {port} not ready")


async def backlog(url: str, prefix: str) -> tuple[int, int]:
    """(entries not yet delivered, entries delivered but not acknowledged) of the no-op handler."""
    client = await open_client(url)
    try:
        status = await Streams(client, Keys(prefix, PARTITIONS)).status(["noop"])
    finally:
        await client.aclose()
    row = status["handlers"]["noop"]
    return int(row["lag"] or 0), int(row["pending"])


def ingest_rate(url: str, tmp: Path, receivers: int, seconds: float) -> tuple[float, str]:
    """Events/s through `receivers` processes; the prefix now holds what they stored."""
    prefix, port = f"scale-{uuid.uuid4().hex[:6]}", free_port()
    config = write_config(tmp, url, prefix, port)
    process = start(["receive", "--workers", str(receivers)], config)
    try:
        wait_ready(port)
        target = f"http://127.0.0.1:{port}/webhooks/openai"
        send(target, presign(500), 1)  # warm up: connections, caches
        ok, elapsed = send(target, presign(int(30_000 * seconds)), seconds)
    finally:
        stop(process)
    return ok / elapsed, prefix


def dispatch_rate(url: str, tmp: Path, prefix: str, workers: int) -> float:
    """Events/s through `workers` processes, from the first delivery to the last, on the prefix's backlog."""
    config = write_config(tmp, url, prefix, free_port())
    lag, _ = asyncio.run(backlog(url, prefix))
    total = lag
    processes = [start(["work"], config) for _ in range(workers)]
    try:
        first = last = 0.0
        while True:
            lag, pending = asyncio.run(backlog(url, prefix))
            now = time.monotonic()
            if not first and lag < total:
                first = now
            if lag == 0 and pending == 0:
                last = now
                break
            time.sleep(0.02)
    finally:
        for process in processes:
            stop(process)
    return total / max(1e-3, last - first)


@contextmanager
def one_server(tmp: Path) -> Iterator[str]:
    port, data = free_cluster_ports(1)[0], tmp / "single"
    data.mkdir()
    args = [str(server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


def measure(url: str, tmp: Path, seconds: float, rounds: int) -> dict[str, Any]:
    ingest: dict[int, list[float]] = {1: [], 2: []}
    dispatch: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for receivers in (1, 2):  # alternating, round after round
            rate, prefix = ingest_rate(url, tmp, receivers, seconds)
            ingest[receivers].append(rate)
            dispatch[receivers].append(dispatch_rate(url, tmp, prefix, receivers))
    return {
        "receivers": {str(n): _spread(v) for n, v in ingest.items()},
        "workers": {str(n): _spread(v) for n, v in dispatch.items()},
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values)), "min": round(min(values)), "max": round(max(values))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="ingest load per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; the median is reported (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "machine": machine(),
        "partitions": PARTITIONS,
        "client": "wrk" if shutil.which("wrk") else "python",
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with one_server(tmp) as url:
            results["one server"] = measure(url, tmp, args.seconds, args.rounds)
        with LocalCluster(appendfsync="everysec") as cluster:
            results["cluster"] = measure(cluster.url, tmp, args.seconds, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")
    for setup in ("one server", "cluster"):
        rx, wk = results[setup]["receivers"], results[setup]["workers"]
        print(
            f"{setup:<11} receivers 1 → 2: {rx['1']['median']:>6} → {rx['2']['median']:>6} ev/s"
            f"   workers 1 → 2: {wk['1']['median']:>6} → {wk['2']['median']:>6} ev/s"
        )
    print(f"({results['machine']['cores']} cores, {results['machine']['cpu_model']}; medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
