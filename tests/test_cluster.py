"""The local cluster: a real 3-master, 3-replica Valkey cluster that spreads slots and fails over."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from processor import gauges, registry
from processor.openai import OpenAIClient
from processor.receiver import create_app
from processor.runtime import open_runtime, running_worker
from processor.settings import Settings
from tests.cluster import LocalCluster, pid_alive
from tests.conftest import PATH, captured_logs, eventually, sample, signed

SUCCEEDED = "fine_tuning_job.succeeded.json"

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent


def owner(client: RedisCluster, key: str) -> int:
    """The port of the master the client sends `key` to."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as running:
        yield running


async def test_keys_spread_over_every_master(cluster: LocalCluster) -> None:
    assert len(cluster.masters()) == 3
    for master in cluster.masters():
        assert cluster.replica_of(master).master_port == master.port
    client = RedisCluster.from_url(cluster.url)
    try:
        keys = [f"job:{{{tag}}}" for tag in range(30)]
        for key in keys:
            await client.set(key, key)
        owners = {owner(client, key) for key in keys}
        assert owners == {m.port for m in cluster.masters()}
        for key in keys:
            slot = await client.cluster_keyslot(key)
            port = owner(client, key)
            assert client.nodes_manager.get_node_from_slot(slot).port == port
            # The owner holds the key itself: no redirection involved.
            with redis.Redis(port=port) as direct:
                assert direct.get(key) == key.encode()
        cluster.flushall()
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def test_replica_takes_over_a_killed_master(cluster: LocalCluster) -> None:
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()
    try:
        victim = cluster.masters()[1]
        replica = cluster.replica_of(victim)
        key = next(k for k in (f"k{{{i}}}" for i in range(100)) if owner(client, k) == victim.port)
        await client.set(key, "before")

        cluster.kill_master(victim.port)
        (promoted,) = await asyncio.to_thread(cluster.wait_failover)

        assert promoted.port == replica.port
        assert promoted.role == "master"
        assert victim.port not in {m.port for m in cluster.masters()}
        # The client fails over on its next call: the node is gone, it rereads the slots from a live one.
        assert await client.get(key) == b"before"
        await client.set(key, "after")
        assert owner(client, key) == promoted.port
        with redis.Redis(port=promoted.port) as direct:
            assert direct.get(key) == b"after"
    finally:
        await client.aclose()


def test_command_line_starts_detached_and_stops(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.cluster"]
    started = subprocess.run(
        [*command, "start", "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    url = started.stdout.splitlines()[0]
    try:
        assert (tmp_path / "url").read_text().strip() == url
        with redis.RedisCluster.from_url(url) as client:
            assert client.cluster_info()["cluster_state"] == "ok"
            assert len(client.get_primaries()) == 3
            assert len(client.get_replicas()) == 3
        pids = [n.pid for n in LocalCluster.attach(tmp_path).nodes]
        assert all(pid_alive(pid) for pid in pids)
    finally:
        subprocess.run([*command, "stop", "--dir", str(tmp_path)], cwd=ROOT, check=True)
    assert not (tmp_path / "url").exists()
    assert not any(pid_alive(pid) for pid in pids)


async def test_a_cluster_gone_entirely_gets_503s_never_a_500(
    cluster: LocalCluster, aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    """Every node down at once (a power cut, a network partition): the cluster client cannot even learn the
    layout again and raises its own `RedisClusterException`, which is not a `RedisError`. Webhooks and
    `/readyz` must still get a 503 with `Retry-After`, never a 500."""
    settings = make_settings(redis={"url": cluster.url, "cluster": "yes", "partitions": 4})
    client = await aiohttp_client(create_app(settings, cluster.url))
    bodies = [msgspec.json.encode(msgspec.json.decode(sample(SUCCEEDED)) | {"id": f"ftjob-c{n}"}) for n in range(8)]
    assert (await client.post(PATH, data=bodies[0], headers=signed(bodies[0]))).status == 200
    for node in cluster.nodes:
        os.kill(node.pid, signal.SIGKILL)
    answers = [await client.post(PATH, data=body, headers=signed(body)) for body in bodies[1:]]
    assert [a.status for a in answers] == [503] * 7, [await a.text() for a in answers]
    assert all(a.headers["Retry-After"].isdigit() for a in answers)
    assert (await client.get("/readyz")).status == 503


async def test_a_cluster_gone_entirely_is_waited_out_by_workers_metrics_and_the_poller(
    cluster: LocalCluster, make_settings: Callable[..., Settings]
) -> None:
    """Every node down at once: a worker started then (as its supervisor restarts it) waits for the cluster
    instead of exiting at its first heartbeat, a worker stopped then hands its partitions over in vain and
    stops cleanly, `/metrics` reports `ftjobs_redis_up 0`, and the poller keeps polling."""
    settings = make_settings(
        redis={"url": cluster.url, "cluster": "yes", "partitions": 4},
        openai={"api_key": "sk-test", "base_url": "http://127.0.0.1:9/v1", "poll_interval_s": 0.01},
    )
    with captured_logs() as logs:
        async with running_worker(settings, cluster.url, registry.build(settings.handlers)) as before:
            await eventually(lambda: _logged(logs, "partition_taken", 1))
            for node in cluster.nodes:
                os.kill(node.pid, signal.SIGKILL)
            async with open_runtime(settings, cluster.url) as runtime:
                exposition = await gauges.exposition(runtime.streams, settings.handlers)
                assert b"ftjobs_redis_up 0.0" in exposition
                async with OpenAIClient(settings.openai) as api:
                    polling = asyncio.create_task(runtime.poller(api).run())
                    try:
                        await eventually(lambda: _logged(logs, "poll_failed", 2))
                        assert not polling.done(), polling
                    finally:
                        polling.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await polling
            async with running_worker(settings, cluster.url, registry.build(settings.handlers)) as after:
                await eventually(lambda: _logged(logs, "heartbeat_failed", 1))
                assert not after.finished.is_set() and not after.failure
            assert not after.failure
        assert not before.failure
    assert sum(e["event"] == "worker_stopped" for e in logs) == 2


async def _logged(logs: list[dict[str, Any]], event: str, times: int) -> bool:
    return sum(e["event"] == event for e in logs) >= times
