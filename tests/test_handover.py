"""Partition takeover and hand-over keep a job's events in order, never twice at once; WAIT holds on retries."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as redis

from processor import registry
from processor.batch import NotReplicated, wait_command
from processor.enqueue import Enqueuer
from processor.eventrecord import decode_event, encode_event
from processor.keys import Keys
from processor.liveness import Progress
from processor.models import Event, FineTuningJob
from processor.runner import Runner
from processor.runtime import open_runtime, running_worker
from processor.settings import Settings
from processor.stream import RECORD_FIELD, Streams
from tests.conftest import captured_logs, compact, eventually, sample, sink
from tests.processes import base_env, write_config
from tests.test_reliability import counts, enqueue, settled, start_proc, until


def failed_event(webhook_id: str) -> bytes:
    job = msgspec.json.decode(compact(sample("fine_tuning_job.failed.json")), type=FineTuningJob)
    return encode_event(Event.from_body(job, webhook_id=webhook_id, received_at=time.time()))


async def test_a_dead_workers_entry_is_handled_before_the_next_event_of_its_job(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    """A worker was SIGKILLed: its partition lease has expired (renewed by `_assign`), but its runner's renewer
    renewed the entry it was handling a moment later (separate timers), and its heartbeat is gone. The next
    event of the same job arrives. The worker that takes the partition must hand the job's first event to the
    handler before its second one."""
    settings = make_settings([sink("a", redis_url, prefix)], worker={"lease_s": 3.0, "block_ms": 100})
    streams = Streams(rclient, Keys(prefix))
    await streams.ensure_groups(["a"])
    events = f"{prefix}:{{p0}}:events"
    await rclient.xadd(events, {RECORD_FIELD: failed_event("wh_first")})
    assert len(await streams.read_new("a", "killed-worker", 10, None)) == 1  # held by the killed worker
    await rclient.xadd(events, {RECORD_FIELD: failed_event("wh_second")})  # same job, arrives after the kill
    async with running_worker(settings, redis_url, registry.build(settings.handlers)):

        async def both() -> bool:
            return await rclient.llen(f"{prefix}:{{sink:a}}") == 2

        await eventually(both, within=15)
    raws: Any = await rclient.lrange(f"{prefix}:{{sink:a}}", 0, -1)
    order = [decode_event(raw).id for raw in raws]
    assert order == ["wh_first", "wh_second"]


async def test_a_retried_enqueue_is_not_confirmed_while_its_write_is_still_unreplicated(
    rclient: redis.Redis, prefix: str
) -> None:
    """With WAIT on, the first attempt is answered NotReplicated ("retry"). The sender's retry finds the
    webhook-id already seen, and is answered as stored although no replica has the write yet: a failover now
    loses an event the sender was told was stored."""
    # More replicas than any server here has (none on one server, one per master on the test cluster).
    enqueuer = Enqueuer(rclient, Keys(prefix), ttl_s=60, wait=wait_command(5, False, 10))
    with pytest.raises(NotReplicated):
        await enqueuer.add("wh_unreplicated", {b"n": b"1"})
    with pytest.raises(NotReplicated):
        await enqueuer.add("wh_unreplicated", {b"n": b"1"})  # the retry: still no replica has it


async def test_a_paused_worker_does_not_start_calls_its_successor_already_runs(
    tmp_path: Path, redis_url: str, prefix: str, rclient: redis.Redis
) -> None:
    """A worker frozen mid-batch for longer than a lease (SIGSTOP; a VM or container freeze, or an event loop
    blocked by a synchronous handler) loses its lease and its entries to another worker. When it resumes, it
    must not call the handler for entries of its old batch that the other worker now runs: only the call in
    flight at the freeze may be made twice."""
    n = 10
    config = write_config(
        tmp_path / "ftjobs.toml",
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 1.0, "block_ms": 100, "batch_size": 20},
        handlers=[sink("slow", redis_url, prefix, sleep_s=0.2, concurrency=1)],
    )
    await enqueue(rclient, prefix, ["slow"], n)
    env = base_env(FTJOBS_CONFIG=str(config))
    first = await start_proc(["work"], tmp_path, env, "work-first")
    second = None
    try:

        async def started(k: int) -> bool:
            return int(await rclient.llen(f"{prefix}:{{sink:slow}}:starts")) >= k

        assert await until(lambda: started(2), 30)
        first.process.send_signal(signal.SIGSTOP)
        second = await start_proc(["work"], tmp_path, env, "work-second")
        assert await until(lambda: any(x["event"] == "entries_reclaimed" for x in second.lines()), 30)
        first.process.send_signal(signal.SIGCONT)

        async def all_done() -> bool:
            return len(await counts(rclient, f"{prefix}:{{sink:slow}}")) == n and await settled(rclient, prefix)

        assert await until(all_done, 60)
        assert await until(lambda: any(x["event"] == "partition_lost" for x in first.lines()), 30)
    finally:
        first.process.send_signal(signal.SIGCONT)
        for proc in (first, second):
            if proc is not None:
                await asyncio.to_thread(proc.stop, signal.SIGKILL)
    raw_starts: Any = await rclient.lrange(f"{prefix}:{{sink:slow}}:starts", 0, -1)
    starts = Counter(k.decode() for k in raw_starts)
    run_twice = sum(c - 1 for c in starts.values())
    print(f"\nREVIEW paused worker: {n} events, {run_twice} calls made twice: {sorted(starts.items())}")
    assert run_twice <= 1


async def test_a_handed_over_entry_is_taken_over_behind_many_entries_waiting_for_a_retry(
    rclient: redis.Redis, prefix: str
) -> None:
    """A target is down: over a thousand entries of the partition wait for their retry (pending, idle). A
    worker hands the partition over (`release`): the entry it still held must reach the next consumer at once,
    not after the retry backlog is gone."""
    streams = Streams(rclient, Keys(prefix)).at(0)
    await streams.ensure_groups(["a"])
    events = f"{prefix}:{{p0}}:events"
    async with rclient.pipeline(transaction=False) as pipe:
        for _ in range(1100):
            pipe.xadd(events, {RECORD_FIELD: b"x"})
        await pipe.execute()
    waiting = await streams.read_new("a", "old-worker", 1100, None)
    async with rclient.pipeline(transaction=False) as pipe:
        for entry in waiting:
            pipe.zadd(f"{prefix}:{{p0}}:retry:a", {entry.id: time.time() + 3600})
        await pipe.execute()
    await rclient.xadd(events, {RECORD_FIELD: failed_event("wh_held")})
    [held] = await streams.read_new("a", "old-worker", 1, None)
    assert await streams.release("a", "old-worker", lease_s=0.05) == 1101

    async def idle() -> bool:
        rows: Any = await rclient.xpending_range(events, "a", "-", "+", 1)
        return bool(rows[0]["time_since_delivered"] > 60)

    await eventually(idle)
    taken, busy = await streams.reclaim("a", "new-worker", count=10)
    assert [e.id for e in taken] == [held.id] and not busy


def job_event(job_id: str, status: str) -> bytes:
    """A record of `job_id` in `status`, its webhook id naming both."""
    doc = msgspec.json.decode(compact(sample("fine_tuning_job.failed.json"))) | {"id": job_id, "status": status}
    job = msgspec.convert(doc, FineTuningJob)
    return encode_event(Event.from_body(job, webhook_id=f"wh_{job_id}_{status}", received_at=time.time()))


async def test_a_batch_cut_short_by_its_lease_goes_on_before_anything_newer_is_read(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    """A runner whose lease lapsed mid-batch (its renewal late on a starved machine) starts no more of the
    batch; the rest stays pending with it. Once the lease is renewed, it must finish those entries before it
    reads the jobs' newer events, which arrived meanwhile; it used to read them first when its last look at
    the partition was recent (found by the cluster rebalance test: a job's `succeeded` before its `running`)."""
    settings = make_settings(
        [sink("a", redis_url, prefix, concurrency=1, sleep_s=0.2)],
        worker={"lease_s": 30.0, "block_ms": 100, "batch_size": 20},
    )
    jobs = [f"ftjob-cut-{i}" for i in range(6)]
    events = f"{prefix}:{{p0}}:events"
    lease = {"left": math.inf}
    async with open_runtime(settings, redis_url) as runtime:
        handlers = registry.build(settings.handlers)
        await runtime.set_up(handlers)
        await runtime.streams.ensure_groups(["a"])
        for job in jobs:
            await rclient.xadd(events, {RECORD_FIELD: job_event(job, "running")})
        spec = settings.handlers[0]
        runner = Runner(
            handlers[0],
            spec,
            runtime.streams.at(0),
            settings.worker,
            "cut-worker",
            3600,
            await runtime.preparer(),
            Progress(["a"], 60.0),
            lease_left=lambda: lease["left"],
        )

        async def calls() -> list[str]:
            raws: Any = await rclient.lrange(f"{prefix}:{{sink:a}}", 0, -1)
            return [decode_event(raw).id for raw in raws]

        running = asyncio.create_task(runner.run())
        try:
            with captured_logs() as logs:
                assert await until(lambda: _at_least(calls, 2), 30)
                lease["left"] = 0.0  # lapsed: the rest of the batch waits
                assert await until(lambda: any(x["event"] == "partition_lease_expired" for x in logs), 30)
                for job in jobs:  # each job's next event comes meanwhile
                    await rclient.xadd(events, {RECORD_FIELD: job_event(job, "succeeded")})
                lease["left"] = math.inf  # renewed
            assert await until(lambda: _at_least(calls, 2 * len(jobs)), 30)
        finally:
            runner.stop()
            await running
    order = await calls()
    for job in jobs:
        assert order.index(f"wh_{job}_running") < order.index(f"wh_{job}_succeeded"), order


async def _at_least(calls: Callable[[], Awaitable[list[str]]], n: int) -> bool:
    return len(await calls()) >= n


async def test_a_read_held_up_before_it_reaches_redis_is_cut_off_when_the_lease_lapses(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    """A blocking read is bounded by the lease (BLOCK), but on a cluster redis-py first asks a fixed node for an
    XREADGROUP's keys (COMMAND GETKEYS). When that node stalled (SIGSTOP, failed over, then back), the read
    waited for it and went out after the lease had lapsed and a successor had taken the partition: it took
    entries the successor had not seen pending, and the successor delivered their jobs' newer events first (a
    `succeeded` before the `running` the late read held). The read is held up here the same way, from 1 s
    before the lease lapses to half a second after: it must be cut off when the lease lapses, reading nothing."""
    settings = make_settings([sink("a", redis_url, prefix)], worker={"lease_s": 30.0, "block_ms": 100})
    events = f"{prefix}:{{p0}}:events"
    lease: dict[str, float] = {}
    outcome: dict[str, str] = {}
    async with open_runtime(settings, redis_url) as runtime:
        handlers = registry.build(settings.handlers)
        await runtime.set_up(handlers)
        await runtime.streams.ensure_groups(["a"])
        streams = runtime.streams.at(0)
        read_new = streams.read_new

        async def held_up(group: str, consumer: str, count: int, block_ms: int | None) -> list[Any]:
            if outcome:  # only the first read is held up
                return await read_new(group, consumer, count, block_ms)
            lease["until"] = time.monotonic() + 1.0  # the runner saw 1 s left a moment ago
            outcome["read"] = "held up"
            try:
                await asyncio.sleep(1.5)  # the stalled node answers half a second after the lapse
            except asyncio.CancelledError:
                outcome["read"] = "cut off"
                raise
            outcome["read"] = "sent late"
            return await read_new(group, consumer, count, block_ms)

        streams.read_new = held_up  # type: ignore[method-assign]
        runner = Runner(
            handlers[0],
            settings.handlers[0],
            streams,
            settings.worker,
            "stalled-worker",
            3600,
            await runtime.preparer(),
            Progress(["a"], 60.0),
            lease_left=lambda: lease["until"] - time.monotonic() if lease else 1.0,
        )
        running = asyncio.create_task(runner.run())
        try:
            assert await until(lambda: outcome.get("read") == "held up", 30)
            await rclient.xadd(events, {RECORD_FIELD: job_event("ftjob-held", "running")})  # arrives meanwhile
            assert await until(lambda: outcome.get("read") in {"cut off", "sent late"}, 30)
            assert outcome["read"] == "cut off"
            pending: Any = await rclient.xpending(events, "a")
            assert pending["pending"] == 0, pending  # it read nothing the partition's next owner would not see
        finally:
            runner.stop()
            await running
    assert await rclient.llen(f"{prefix}:{{sink:a}}") == 0
