"""ftjobs on a real Redis Cluster (3 masters, 3 replicas): several receivers and workers as processes,
partitioned streams, per-job order, worker crashes during rebalancing, and a master killed mid-load.

The target is a real local HTTP server that does not deduplicate (as a Slack webhook or an SMTP relay
behaves): it counts every call per idempotency key, records each job's statuses in the order calls arrive,
and notices two calls for the same job in flight at once. Each test prints a `FIGURE` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from redis.asyncio.cluster import RedisCluster

from processor.client import open_client
from processor.keys import Keys
from tests.cluster import LocalCluster
from tests.conftest import SECRET, free_port, sample, signed
from tests.processes import FTJOBS, Proc, base_env, http_ready, wait_for, write_config
from tests.test_reliability import until

# These tests start clusters of their own: they run once, in the pass without REDIS_URL (`.ci/run` runs the
# suite again against Redis and against a cluster, where they would only repeat themselves).
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(bool(os.environ.get("REDIS_URL")), reason="starts its own clusters; runs without REDIS_URL"),
]

LIFE = ["validating_files", "queued", "running", "succeeded"]
JOB: dict[str, Any] = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))
PARTITIONS = 16


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as started:
        yield started


class Target:
    """A pipeline endpoint that does not deduplicate: every call is a side effect."""

    def __init__(self) -> None:
        self.calls: dict[str, Counter[str]] = defaultdict(Counter)  # path → idempotency key → calls
        self.order: dict[tuple[str, str], list[str]] = defaultdict(list)  # (path, job) → statuses as they came
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self.overlaps = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = (request.path, body["job_id"])
        self.in_flight[key] += 1
        self.overlaps += self.in_flight[key] > 1
        try:
            await asyncio.sleep(0.002)  # long enough for a second call of the same job to overlap, if one came
            self.calls[request.path][body["idempotency_key"]] += 1
            self.order[key].append(body["status"])
        finally:
            self.in_flight[key] -= 1
        return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def serving(target: Target) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/{handler}", target.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def job_body(job_id: str, status: str) -> bytes:
    return msgspec.json.encode(JOB | {"id": job_id, "status": status})


async def send_lives(
    ports: list[int], jobs: list[str], results: dict[str, int], *, give_up_s: float = 30.0, lanes: int = 24
) -> None:
    """Each job's statuses in order (the next only after the last was answered 200), many jobs at once,
    spread over the receivers; a 503 or a refused connection is retried like a real sender would."""
    queue = list(reversed(jobs))

    async def lane(session: aiohttp.ClientSession) -> None:
        while queue:
            job_id = queue.pop()
            port = ports[hash(job_id) % len(ports)]
            for status in LIFE:
                webhook_id = f"wh_{job_id}_{status}"
                body = job_body(job_id, status)
                deadline = time.monotonic() + give_up_s
                while time.monotonic() < deadline:
                    try:
                        url = f"http://127.0.0.1:{port}/webhooks/openai"
                        async with session.post(url, data=body, headers=signed(body, webhook_id)) as resp:
                            results[webhook_id] = resp.status
                            await resp.read()
                    except aiohttp.ClientError:
                        results[webhook_id] = 599
                    if results[webhook_id] == 200:
                        break
                    await asyncio.sleep(0.05)
                if results[webhook_id] != 200:
                    break  # the job's later statuses would arrive out of order: stop this job here

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(lane(session) for _ in range(lanes)))


class Fleet:
    """Receivers and workers as `ftjobs` processes on the cluster."""

    def __init__(self, tmp_path: Path, url: str, target: str, prefix: str, **redis_extra: Any) -> None:
        self.tmp_path, self.prefix = tmp_path, prefix
        self.config = write_config(
            tmp_path / "ftjobs.toml",
            receiver={"secrets": [SECRET]},
            redis={"url": url, "prefix": prefix, "partitions": PARTITIONS} | redis_extra,
            worker={"lease_s": 2.0, "block_ms": 100, "batch_size": 32},
            handlers=[
                {"name": "a", "type": "http", "url": f"{target}/a"},
                {"name": "b", "type": "http", "url": f"{target}/b", "when": {"status": ["running", "succeeded"]}},
            ],
        )
        self.env = base_env(FTJOBS_CONFIG=str(self.config))
        self.receivers: list[tuple[int, Proc]] = []
        self.workers: list[Proc] = []
        self.started = 0

    async def receiver(self) -> int:
        port = free_port()
        proc = await asyncio.to_thread(Proc, ["receive", "--port", str(port)], self.tmp_path, self.env, f"rx-{port}")
        await asyncio.to_thread(wait_for, http_ready(port), 30, "receiver")
        self.receivers.append((port, proc))
        return port

    async def worker(self, *, consuming: bool = True) -> Proc:
        """A new worker; with `consuming`, once it took a partition (a joining worker may have to wait for
        the others to hand its share over)."""
        self.started += 1
        proc = await asyncio.to_thread(Proc, ["work"], self.tmp_path, self.env, f"work-{self.started}")
        self.workers.append(proc)
        if consuming:
            taken = lambda: any(line.get("event") == "partition_taken" for line in proc.lines())  # noqa: E731
            await asyncio.to_thread(wait_for, taken, 30, "a partition taken")
        return proc

    async def stop(self) -> None:
        for proc in [*self.workers, *(p for _, p in self.receivers)]:
            await asyncio.to_thread(proc.stop, signal.SIGKILL)


async def settle(target: Target, expected: dict[str, set[str]], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(set(target.calls[path]) >= keys for path, keys in expected.items()):
            return True
        await asyncio.sleep(0.1)
    return False


def expected_calls(results: dict[str, int]) -> dict[str, set[str]]:
    """The idempotency keys each handler must have been called with: every accepted event (b: its statuses)."""
    accepted = [w for w, code in results.items() if code == 200]
    return {
        "/a": {f"a:{w}" for w in accepted},
        "/b": {f"b:{w}" for w in accepted if w.endswith(("_running", "_succeeded"))},
    }


def out_of_order(target: Target) -> dict[tuple[str, str], list[str]]:
    """The (handler, job) pairs whose statuses did not reach the handler in the order of the job's life, with
    what came (first calls count; a call re-sent after a crash may repeat the one before)."""
    wrong = {}
    for (path, job), seen in target.order.items():
        firsts = list(dict.fromkeys(seen))
        life = LIFE if path == "/a" else LIFE[2:]
        if firsts != [s for s in life if s in firsts]:
            wrong[(path, job)] = seen
    return wrong


async def test_many_receivers_and_workers_deliver_every_event_once_in_order_over_all_masters(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    prefix, target = f"c-{uuid.uuid4().hex[:8]}", Target()
    async with serving(target) as url:
        fleet = Fleet(tmp_path, cluster.url, url, prefix)
        try:
            ports = [await fleet.receiver(), await fleet.receiver()]
            for _ in range(2):
                await fleet.worker()
            jobs = [f"ftjob-c{i:05d}" for i in range(500)]
            results: dict[str, int] = {}
            started = time.monotonic()
            await send_lives(ports, jobs, results)
            sent_s = time.monotonic() - started
            expected = expected_calls(results)
            assert set(results.values()) == {200} and len(results) == len(jobs) * len(LIFE)
            assert await settle(target, expected, 120)
            done_s = time.monotonic() - started
            # The operator's view covers every partition: counts summed, and who consumes which.
            status = await asyncio.to_thread(
                subprocess.run, [*FTJOBS, "status"], env=fleet.env, capture_output=True, text=True, timeout=60
            )
            assert status.returncode == 0, status.stderr
            assert f"events stream: {len(results)} entries in {PARTITIONS} partition(s)" in status.stdout
            consumers = {line.split()[0] for line in status.stdout.splitlines() if line.startswith("  ")}
            assert len(consumers) == 2 and all(f"{c}:" in status.stdout for c in consumers), status.stdout
            jobs_listed = await asyncio.to_thread(
                subprocess.run, [*FTJOBS, "jobs", "--limit", "5"], env=fleet.env, capture_output=True, text=True
            )
            assert jobs_listed.returncode == 0 and "succeeded" in jobs_listed.stdout, jobs_listed.stderr
        finally:
            await fleet.stop()
    for path, keys in expected.items():
        assert set(target.calls[path]) == keys
        assert max(target.calls[path].values()) == 1, f"{path}: a call was made twice"
    assert target.overlaps == 0, "two calls for one job were in flight at once"
    assert not out_of_order(target)
    # The partitions' keys live on every master.
    client = await open_client(cluster.url)
    try:
        assert isinstance(client, RedisCluster)
        keys = Keys(prefix, PARTITIONS)
        homes = Counter(client.get_node_from_key(part.events).name for part in keys.parts)
        masters = {f"127.0.0.1:{node.port}" for node in cluster.masters()}
        assert set(homes) == masters, homes
        assert sum([await client.xlen(part.events) for part in keys.parts]) == len(results)
    finally:
        await client.aclose()
    print(
        f"\nFIGURE cluster-e2e: {len(results)} events for {len(jobs)} jobs through 2 receivers and 2 workers on "
        f"3 masters ({PARTITIONS} partitions: {dict(sorted(Counter(homes.values()).items()))} per master): "
        f"sent in {sent_s:.1f}s, all delivered in {done_s:.1f}s; 0 lost, 0 twice, 0 overlapping, in order"
    )


async def test_workers_killed_while_partitions_rebalance_lose_nothing(cluster: LocalCluster, tmp_path: Path) -> None:
    prefix, target = f"c-{uuid.uuid4().hex[:8]}", Target()
    async with serving(target) as url:
        fleet = Fleet(tmp_path, cluster.url, url, prefix)
        kills, stop = 0, asyncio.Event()

        async def churn() -> None:  # join, then SIGKILL: the partitions move again and again
            nonlocal kills
            while not stop.is_set():
                await fleet.worker()
                await asyncio.sleep(1.5)
                victim = fleet.workers.pop(0)
                await asyncio.to_thread(victim.stop, signal.SIGKILL)
                kills += 1

        try:
            ports = [await fleet.receiver()]
            await fleet.worker()
            churning = asyncio.create_task(churn())
            results: dict[str, int] = {}
            rounds = 0
            while kills < 3 or rounds < 2:  # the load lasts until partitions moved under it a few times
                jobs = [f"ftjob-k{rounds}-{i:04d}" for i in range(150)]
                await send_lives(ports, jobs, results, lanes=8)
                rounds += 1
            stop.set()
            await churning
            assert set(results.values()) == {200}
            expected = expected_calls(results)
            assert await settle(target, expected, 180)
        finally:
            stop.set()
            await fleet.stop()
    assert kills >= 3, "too few kills during the load to test anything"
    for path, keys in expected.items():
        assert set(target.calls[path]) == keys
    twice = sum(n - 1 for calls in target.calls.values() for n in calls.values())
    # A SIGKILL re-sends at most the calls that were in flight in the killed worker.
    assert twice <= kills * 2 * 8 * PARTITIONS
    assert not out_of_order(target)
    print(
        f"\nFIGURE cluster-rebalance: {len(results)} events, {kills} workers SIGKILLed while partitions moved: "
        f"0 lost, {twice} calls re-sent (those in flight in a killed worker), in order"
    )


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_a_master_killed_mid_load_fails_over_and_loses_only_what_async_replication_had_not_sent(
    wait_replicas: int, tmp_path: Path
) -> None:
    prefix, target = f"c-{uuid.uuid4().hex[:8]}", Target()
    with LocalCluster() as cluster:
        async with serving(target) as url:
            fleet = Fleet(tmp_path, cluster.url, url, prefix, wait_replicas=wait_replicas)
            try:
                ports = [await fleet.receiver(), await fleet.receiver()]
                await fleet.worker()
                jobs = [f"ftjob-f{i:05d}" for i in range(600)]
                results: dict[str, int] = {}
                # With wait_replicas, the promoted master has no replica left: its partitions answer 503 (nothing
                # can be confirmed) until one is back, so a sender gives up on those jobs sooner.
                give_up_s = 3.0 if wait_replicas else 15.0
                sending = asyncio.create_task(send_lives(ports, jobs, results, give_up_s=give_up_s))
                assert await until(lambda: sum(code == 200 for code in results.values()) >= 400, 60)
                acked_before = sum(code == 200 for code in results.values())
                await asyncio.to_thread(cluster.kill_master, 0)
                await asyncio.to_thread(cluster.wait_failover)
                await sending
                accepted = {w for w, code in results.items() if code == 200}
                expected = expected_calls(results)
                await settle(target, expected, 60)
            finally:
                await fleet.stop()
    delivered = {key.split(":", 1)[1] for key in target.calls["/a"]}
    lost = accepted - delivered
    after = len(accepted) - acked_before
    print(
        f"\nFIGURE cluster-failover wait_replicas={wait_replicas}: {len(accepted)} events acknowledged "
        f"({acked_before} before the SIGKILL of a master, {after} after its failover), {len(lost)} of them lost"
    )
    assert after > 0, "ingest did not resume after the failover"
    if wait_replicas:
        assert not lost, f"acknowledged after a replica confirmed, yet lost: {sorted(lost)[:5]}"
