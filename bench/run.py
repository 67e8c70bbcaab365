"""The benchmark: ftjobs against the limit, measured in one run on one machine.

    python -m bench.run                # full run (wrk when installed), writes bench/results/latest.{json,png}
    python -m bench.run --smoke        # a tiny load, to check the benchmark itself works

P1 ingest throughput (one receiver process) ÷ a bare aiohttp app that reads the body and answers 202;
P2 dispatch throughput (one worker, no-op handler, acked) ÷ a raw XREADGROUP + XACK loop on the same entries;
P3 POST → handler start latency at 1,000 events/s offered; P4 Redis memory per queued event ÷ body size;
P5 receiver RSS under load. It is not a test: it never fails on a number, it reports them.

Each figure is the median of `--rounds` rounds (3 by default) that alternate the targets (limit, naive,
ftjobs, limit, ...), so a drift of the machine hits them alike; min and max stand beside it. On a machine
with two cores or more the server under test runs alone on the last core, and the load generator and
Valkey on the others. Each server's CPU per request (user + system, from /proc) is reported with its
throughput: on a shared machine it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as redis

from bench import load
from bench.report import TARGETS, chart, table
from processor import logs, registry, signatures
from processor.embedded import EmbeddedValkey
from processor.eventrecord import decode_event, encode_event
from processor.models import Event, decode_job
from processor.runtime import running_worker
from processor.settings import Settings
from processor.stream import RECORD_FIELD

ROOT = Path(__file__).resolve().parent.parent
SECRET = signatures.generate_secret()
BODY = msgspec.json.encode(decode_job((ROOT / "processor/samples/fine_tuning_job.succeeded.json").read_bytes()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


class Sampler(threading.Thread):
    """Peak resident memory of a process, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, core: int) -> None:
    """Keep process `pid` (and the threads it starts later) on one core."""
    os.sched_setaffinity(pid, [core])


def cores() -> tuple[list[int], int | None]:
    """(the cores for the load generator and Valkey, the core for the server under test); no dedicated core
    for the server (None) when this process may run on only one. Read once, before `main` moves this process
    (and so what it starts) off the server's core: asked again later, it would see only the client's cores."""
    global _CORES
    if _CORES is None:
        allowed = sorted(os.sched_getaffinity(0))
        _CORES = (allowed, None) if len(allowed) < 2 else (allowed[:-1], allowed[-1])
    return _CORES


_CORES: tuple[list[int], int | None] | None = None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    client_cores, server_core = cores()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "system": platform.platform(),
        "server_core": server_core,
        "client_cores": client_cores,
    }


def start(args: list[str], env: dict[str, str] | None = None, wrapper: list[str] = ()) -> subprocess.Popen[bytes]:  # type: ignore[assignment]
    # The servers must use the benchmark's own Valkey and config, whatever this shell has set.
    inherited = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "FTJOBS_CONFIG", "OPENAI_API_KEY"}}
    return subprocess.Popen(
        [*wrapper, sys.executable, *args],
        cwd=ROOT,
        env={**inherited, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def config(tmp: Path, url: str, prefix: str, handler: str, port: int) -> Path:
    path = tmp / f"{prefix}.toml"
    path.write_text(
        f'[receiver]\nport = {port}\nsecrets = ["{SECRET}"]\n[redis]\nurl = "{url}"\nprefix = "{prefix}"\n'
        f'[log]\nlevel = "warning"\n[worker]\nblock_ms = 50\n'
        f'[[handlers]]\nname = "probe"\ntype = "{handler}"\nconcurrency = 32\n'
    )
    return path


def ingest(
    kind: str, url: str, tmp: Path, args: argparse.Namespace, requests: load.Requests, redis_pid: int, prefix: str
) -> dict[str, Any]:
    """P1/P4/P5: one server process under load; its throughput, latency, CPU per request, peak RSS (and, for
    ftjobs, Redis memory per event under `prefix`, this round's own)."""
    port = free_port()
    if kind == "bare":
        process = start(["-m", "bench.apps", "bare", "--port", str(port)])
    elif kind == "naive":
        process = start(["-m", "bench.apps", "naive", "--port", str(port), "--redis-url", url])
    else:
        cfg = config(tmp, url, prefix, "bench.handlers:Noop", port)
        process = start(["-m", "processor", "-c", str(cfg), "receive"])
    _, server_core = cores()
    if server_core is not None:
        pin(process.pid, server_core)
    wait_port(port)
    target = f"http://127.0.0.1:{port}/webhooks/openai"
    warmup = load.presign(BODY, SECRET, 2000)
    asyncio.run(load.run_python(target, warmup, 0.5, connections=8))
    before = asyncio.run(redis_memory(url))
    sampler = Sampler(process.pid)
    sampler.start()
    cpu_before = {"server": cpu_seconds(process.pid), "redis": cpu_seconds(redis_pid)}
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if args.client == "wrk":
        result = load.run_wrk(target, requests, args.seconds, connections=args.connections)
    else:
        result = asyncio.run(load.run_python(target, requests, args.seconds, connections=args.connections))
    sampler.running = False
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {
        "server": cpu_seconds(process.pid) - cpu_before["server"],
        "redis": cpu_seconds(redis_pid) - cpu_before["redis"],
        "client": (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime),
    }
    # CPU per request, in microseconds, for each process: where the machine's two cores went.
    per_request = {name: round(seconds / max(1, result.requests) * 1e6, 1) for name, seconds in cpu.items()}
    out: dict[str, Any] = msgspec.to_builtins(result) | {
        "rss_mb": round(sampler.peak_kb / 1024, 1),
        "cpu_us_per_request": per_request,
    }
    if kind == "ftjobs":
        after = asyncio.run(redis_memory(url, prefix))
        out |= {
            "stored": after["events"],
            "bytes_per_event": after["stream_per_event"] + after["dedupe_key"],
            "job_state_bytes": after["job_state"],
            "used_memory_per_event": (after["used"] - before["used"]) / max(1, after["events"]),
        }
    stop(process)
    return out


async def redis_memory(url: str, prefix: str = "") -> dict[str, Any]:
    """`used_memory`, and with a prefix what one queued event costs: its stream entry and its dedupe key
    (MEMORY USAGE, exact), apart from the job's state (a hash, a timeline and an index entry per job)."""
    client = redis.Redis.from_url(url)
    try:
        info = await client.info("memory")
        out: dict[str, Any] = {"used": int(info["used_memory"]), "events": 0}
        if not prefix:
            return out
        events = int(await client.xlen(f"{prefix}:{{p0}}:events"))
        [(_, fields)] = await client.xrange(f"{prefix}:{{p0}}:events", count=1)
        job_id = decode_event(fields[RECORD_FIELD]).job_id
        seen = await anext(client.scan_iter(match=f"{prefix}:{{p0}}:seen:*", count=100))
        out |= {
            "events": events,
            "stream_per_event": await client.memory_usage(f"{prefix}:{{p0}}:events", samples=0) / max(1, events),
            "dedupe_key": await client.memory_usage(seen),
            "job_state": await client.memory_usage(f"{prefix}:{{p0}}:job:{job_id}")
            + await client.memory_usage(f"{prefix}:{{p0}}:timeline:{job_id}")
            + await client.memory_usage(f"{prefix}:{{p0}}:jobs", samples=0) / max(1, events),
        }
        return out
    finally:
        await client.aclose()


async def preload(client: redis.Redis, prefix: str, group: str, n: int) -> None:
    """`n` events of `n` different jobs in `prefix`'s stream, behind a new group `group` (P2's backlog)."""
    job = decode_job(BODY)
    await client.xgroup_create(f"{prefix}:{{p0}}:events", group, id="$", mkstream=True)
    for start_at in range(0, n, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start_at, min(n, start_at + 1000)):
                job_i = msgspec.structs.replace(job, id=f"ftjob-{prefix}-{i}")
                event = Event.from_body(job_i, webhook_id=f"wh_{prefix}_{i}", received_at=time.time())
                pipe.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: encode_event(event)})
            await pipe.execute()


async def drain(client: redis.Redis, url: str, prefix: str) -> None:
    """Run an ftjobs worker (no-op handler `probe`, batches of 64) until `prefix`'s backlog is acknowledged."""
    settings = Settings.from_raw(
        {
            "redis": {"url": url, "prefix": prefix},
            "worker": {"block_ms": 20, "batch_size": 64},
            "log": {"level": "warning"},
            "handlers": [{"name": "probe", "type": "bench.handlers:Noop", "concurrency": 32}],
        },
        env={},
    )
    async with running_worker(settings, url, registry.build(settings.handlers)):
        while True:
            [group] = await client.xinfo_groups(f"{prefix}:{{p0}}:events")
            if group["lag"] == 0 and group["pending"] == 0:
                return
            await asyncio.sleep(0.005)


async def dispatch(url: str, n: int) -> dict[str, Any]:
    """P2: drain `n` queued events with a raw XREADGROUP+XACK loop, then with an ftjobs worker (no-op handler)."""
    client = redis.Redis.from_url(url)
    raw_prefix, worker_prefix = f"raw-{uuid.uuid4().hex[:6]}", f"bench-{uuid.uuid4().hex[:6]}"
    await preload(client, raw_prefix, "raw", n)
    started = time.perf_counter()
    done = 0
    while done < n:
        reply = await client.xreadgroup("raw", "c", {f"{raw_prefix}:{{p0}}:events": ">"}, count=64)
        ids = [entry_id for _, entries in reply for entry_id, _ in entries]
        await client.xack(f"{raw_prefix}:{{p0}}:events", "raw", *ids)
        done += len(ids)
    raw_s = time.perf_counter() - started

    await preload(client, worker_prefix, "probe", n)
    started = time.perf_counter()
    await drain(client, url, worker_prefix)
    worker_s = time.perf_counter() - started
    await client.aclose()
    return {"events": n, "raw_per_s": n / raw_s, "ftjobs_per_s": n / worker_s, "ratio": raw_s / worker_s}


async def latency(url: str, tmp: Path, rate: int, seconds: float) -> dict[str, Any]:
    """P3: POST → handler start, at `rate` events/s offered to `ftjobs serve` (receiver + worker)."""
    port = free_port()
    probe = tmp / "starts.txt"
    cfg = config(tmp, url, f"lat-{uuid.uuid4().hex[:6]}", "bench.handlers:StartProbe", port)
    process = start(["-m", "processor", "-c", str(cfg), "serve"], env={"FTJOBS_BENCH_PROBE": str(probe)})
    _, server_core = cores()
    if server_core is not None:  # as in P1: the server alone on its core, the client and Valkey on the others
        pin(process.pid, server_core)
    wait_port(port)
    # One job per request: the same job's status twice would be a repeat, and no handler would start.
    job, key = decode_job(BODY), signatures.parse_secret(SECRET)
    bodies = [
        msgspec.json.encode(msgspec.structs.replace(job, id=f"ftjob-lat-{i}"))
        for i in range(int(rate * (seconds + 1)) + 100)
    ]
    sent: dict[str, float] = {}
    target = f"http://127.0.0.1:{port}/webhooks/openai"
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            msg_id = f"wh_lat_{uuid.uuid4().hex}"
            headers = signatures.signed_headers([key], msg_id, bodies[i]) | {"Content-Type": "application/json"}
            if i >= rate:  # the first second is warm-up: steady state is what is measured
                sent[msg_id] = time.time()
            async with session.post(target, data=bodies[i], headers=headers) as resp:
                await resp.read()

        for i in range(100):  # warm up
            await one(len(bodies) - 1 - i)
        sent.clear()
        began, tasks = time.perf_counter(), []
        for i in range(int(rate * (seconds + 1))):
            await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)
    stop(process)
    starts = {i: (float(at), float(received)) for i, at, received in map(str.split, probe.read_text().splitlines())}
    seen = [(sent_at, *starts[i]) for i, sent_at in sent.items() if i in starts]
    if not seen:
        raise RuntimeError("no handler start was recorded")

    def pick(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(len(values) * q))], 3)

    delays = sorted((at - sent_at) * 1000 for sent_at, at, _ in seen)
    # The two halves: POST → the receiver took the request (client, network, accept queue), and from there
    # to the handler's start (enqueue with its fsync, the worker's read, preparation). Both clocks are time().
    before = sorted((received - sent_at) * 1000 for sent_at, _, received in seen)
    after = sorted((at - received) * 1000 for _, at, received in seen)
    return {
        "offered_per_s": rate,
        "events": len(sent),
        "measured": len(delays),
        "p50_ms": pick(delays, 0.5),
        "p90_ms": pick(delays, 0.9),
        "p99_ms": pick(delays, 0.99),
        "to_receiver": {"p50_ms": pick(before, 0.5), "p99_ms": pick(before, 0.99)},
        "receiver_to_start": {"p50_ms": pick(after, 0.5), "p99_ms": pick(after, 0.99)},
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one figure as one: each number the median over the rounds (at its usual key), and under
    `min` and `max` the same keys with the extremes; `rounds` says how many there were."""

    def pick(values: list[Any], how: Any) -> Any:
        if all(isinstance(v, dict) for v in values):
            return {k: pick([v[k] for v in values], how) for k in values[0]}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return how(values)
        return values[0]

    keys = [k for k in rounds[0] if k not in {"min", "max", "rounds"}]
    out = {k: pick([r[k] for r in rounds], statistics.median) for k in keys}
    out["min"] = {k: pick([r[k] for r in rounds], min) for k in keys}
    out["max"] = {k: pick([r[k] for r in rounds], max) for k in keys}
    out["rounds"] = len(rounds)
    return out


def ratios(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """P1's ratios, each taken within a round (the targets ran back to back) and then summarized:
    `efficiency` = the limit's server CPU per request ÷ ftjobs' (the P1 target), `rps` = ftjobs' req/s ÷ the
    limit's, and against naive: req/s and CPU per request, each as "times better"."""

    def cpu(result: dict[str, Any]) -> float:
        return max(0.001, float(result["cpu_us_per_request"]["server"]))

    per_round = [
        {
            "efficiency": cpu(bare) / cpu(ftjobs),
            "rps": ftjobs["rps"] / max(1e-9, bare["rps"]),
            "vs_naive_rps": ftjobs["rps"] / max(1e-9, naive["rps"]),
            "vs_naive_cpu": cpu(naive) / cpu(ftjobs),
        }
        for bare, naive, ftjobs in zip(rounds["bare"], rounds["naive"], rounds["ftjobs"], strict=True)
    ]
    return summarize(per_round)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each ingest run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each figure is their median")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--client", choices=["wrk", "python"], default="wrk" if load.have_wrk() else "python")
    parser.add_argument("--dispatch-events", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=1000, help="P3 offered events/s")
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--smoke", action="store_true", help="tiny load: check that the benchmark runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    logs.configure("warning", "json")
    if args.smoke:
        args.seconds, args.connections, args.client = 0.5, 4, "python"
        args.dispatch_events, args.rate, args.latency_seconds = 300, 100, 1.0
    args.out.mkdir(parents=True, exist_ok=True)
    client_cores, server_core = cores()
    if server_core is not None:  # this process, and what it starts (wrk, Valkey) unless moved: not the server's
        os.sched_setaffinity(0, client_cores)
    kinds = ("bare", "naive", "ftjobs", "ftjobs_everysec")
    with tempfile.TemporaryDirectory(prefix="ftjobs-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = EmbeddedValkey(tmp / "valkey")  # durable default: AOF, appendfsync always
        server.start()
        relaxed = EmbeddedValkey(tmp / "valkey-everysec", appendfsync="everysec")
        relaxed.start()
        try:
            assert server.pid is not None and relaxed.pid is not None
            rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            for n in range(args.rounds):
                # Fresh webhook-ids each round, so no round's requests are duplicates of an earlier one's.
                requests = load.presign(BODY, SECRET, 300_000 if not args.smoke else 20_000)
                for kind in kinds:
                    valkey = relaxed if kind == "ftjobs_everysec" else server
                    assert valkey.pid is not None
                    result = ingest(
                        kind.removesuffix("_everysec"),
                        valkey.url,
                        tmp,
                        args,
                        requests,
                        valkey.pid,
                        f"ingest-{kind}-{n}",
                    )
                    rounds[kind].append(result)
            p1: dict[str, Any] = {kind: summarize(results) for kind, results in rounds.items()}
            p1["ratios"] = ratios(rounds)
            p1["ratio"] = p1["ratios"]["efficiency"]
            relaxed.stop()
            p2 = summarize([asyncio.run(dispatch(server.url, args.dispatch_events)) for _ in range(args.rounds)])
            relaxed = EmbeddedValkey(tmp / "valkey-everysec-2", appendfsync="everysec")
            relaxed.start()
            always: list[dict[str, Any]] = []
            everysec: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                always.append(asyncio.run(latency(server.url, tmp, args.rate, args.latency_seconds)))
                everysec.append(asyncio.run(latency(relaxed.url, tmp, args.rate, args.latency_seconds)))
            p3 = summarize(always)
            p3["everysec"] = summarize(everysec)
        finally:
            relaxed.stop()
            server.stop()
    results = {
        "machine": machine(),
        "client": args.client,
        "rounds": args.rounds,
        "p1": p1,
        "p2": p2,
        "p3": p3,
        "p4": {
            "bytes_per_event": p1["ftjobs"]["bytes_per_event"],
            "job_state_bytes": p1["ftjobs"]["job_state_bytes"],
            "used_memory_per_event": p1["ftjobs"]["used_memory_per_event"],
            "body_bytes": len(BODY),
            "ratio": p1["ftjobs"]["bytes_per_event"] / len(BODY),
        },
        "p5": {"receiver_rss_mb": p1["ftjobs"]["rss_mb"]},
        "targets": TARGETS,
    }
    name = "smoke" if args.smoke else "latest"
    (args.out / f"{name}.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)))
    chart(results, args.out / f"{name}.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
