"""Workers against a real Redis/Valkey: delivery, routing, retries, dead letters, leases, reclaim, trimming."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from processor import registry
from processor.client import text
from processor.eventrecord import decode_event, encode_event
from processor.handler import Delivery
from processor.keys import Keys
from processor.models import Event, FineTuningJob, decode_job
from processor.runtime import running_worker
from processor.settings import Settings
from processor.stream import RECORD_FIELD, VERDICT_FIELD, Streams
from processor.worker import WorkerFailed
from tests.conftest import captured_logs, compact, eventually, free_port, sample, sink
from tests.fake_openai import KEY, FakeOpenAI
from tests.processes import FTJOBS, Proc, base_env, wait_for, write_config
from tests.sinks import Sink

PATH = "/webhooks/openai"


async def test_handler_receives_structs_equal_to_the_input(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix)]) as r:
        full = compact(sample("fine_tuning_job.succeeded.json"))
        # Another job's envelope: the same job's `succeeded` again would be a repeat, and skipped.
        thin = compact(sample("webhook_event.fine_tuning.job.succeeded.json")).replace(b"ftjob-7cQm", b"ftjob-XXXX")
        await r.post(full, "wh_full")
        await r.post(thin, "wh_thin")

        async def both() -> bool:
            return len(await r.delivered("a")) == 2

        await eventually(both)
        by_id = {e.id: e for e in await r.delivered("a")}
        assert by_id["wh_full"].job == msgspec.json.decode(full, type=FineTuningJob)
        assert msgspec.json.encode(by_id["wh_thin"].envelope()) == thin


async def test_duplicate_is_delivered_once(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix, idempotent=False)]) as r:
        body = compact(sample("fine_tuning_job.failed.json"))
        answers = [await r.post(body, "wh_same") for _ in range(3)]
        assert [a["status"] for a in answers] == ["accepted", "duplicate", "duplicate"]
        await r.post(compact(sample("fine_tuning_job.running.json")), "wh_other")

        async def two() -> bool:
            return len(await r.delivered("a")) == 2

        await eventually(two)
        await eventually(r.settled)
        assert sorted(e.id for e in await r.delivered("a")) == ["wh_other", "wh_same"]


async def test_routing_sends_each_handler_only_what_it_asked_for(rig: Any, redis_url: str, prefix: str) -> None:
    handlers = [
        sink("failures", redis_url, prefix, when={"status": ["failed", "cancelled"]}),
        sink("successes", redis_url, prefix, when={"event_type": "fine_tuning.job.succeeded"}),
        sink("all", redis_url, prefix),
    ]
    async with rig(handlers) as r:
        for name in ("failed", "succeeded", "running"):
            await r.post(compact(sample(f"fine_tuning_job.{name}.json")))

        async def all_three() -> bool:
            return len(await r.delivered("all")) == 3

        await eventually(all_three)
        await eventually(r.settled)
        assert [e.status for e in await r.delivered("failures")] == ["failed"]
        assert [e.status for e in await r.delivered("successes")] == ["succeeded"]
        status = await Streams(r.rclient, Keys(prefix)).status(["failures", "successes", "all"])
        assert all(row["pending"] == 0 for row in status["handlers"].values())


async def test_failing_handler_is_retried_then_succeeds(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("flaky", redis_url, prefix, fail_times=2, backoff_s=0.05)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")), "wh_flaky")

        async def delivered() -> bool:
            return len(await r.delivered("flaky")) == 1

        await eventually(delivered)
        assert await r.starts("flaky") == 3
        assert await r.dead("flaky") == []


async def test_handler_that_keeps_failing_is_dead_lettered_and_others_flow_on(
    rig: Any, redis_url: str, prefix: str
) -> None:
    handlers = [
        sink("broken", redis_url, prefix, fail_times=-1, max_attempts=3, backoff_s=0.05),
        sink("fine", redis_url, prefix),
    ]
    async with rig(handlers) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")), "wh_poison")
        await r.post(compact(sample("fine_tuning_job.running.json")), "wh_next")

        async def dead_two() -> bool:
            return len(await r.dead("broken")) == 2

        await eventually(dead_two)
        assert len(await r.delivered("fine")) == 2
        assert await r.starts("broken") == 6
        dead = {decode_event(f[RECORD_FIELD]).id: f for f in await r.dead("broken")}
        assert dead["wh_poison"][b"attempts"] == b"3"
        assert b"RetryLater: sink broken fails attempt 3" in dead["wh_poison"][b"error"]
        status = await Streams(r.rclient, Keys(prefix)).status(["broken"])
        assert status["handlers"]["broken"] | {"lag": 0} == {
            "exists": True,
            "lag": 0,
            "pending": 0,
            "retrying": 0,
            "dead_letters": 2,
        }


async def test_permanent_failure_dead_letters_at_once(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("strict", redis_url, prefix, fail_times=-1, permanent=True)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("strict")) == 1

        await eventually(dead)
        assert await r.starts("strict") == 1
        assert b"permanent failure" in (await r.dead("strict"))[0][b"error"]


async def test_retry_later_after_is_honoured(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("later", redis_url, prefix, fail_times=1, retry_after=0.5)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def started() -> bool:
            return await r.starts("later") == 1

        await eventually(started)
        [(_, due)] = await r.rclient.zrange(f"{prefix}:{{p0}}:retry:later", 0, -1, withscores=True)
        assert 0.3 < due - time.time() <= 0.5

        async def delivered() -> bool:
            return len(await r.delivered("later")) == 1

        await eventually(delivered)


async def test_hung_handler_is_cut_off_by_its_timeout(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("hung", redis_url, prefix, sleep_s=30, timeout_s=0.2, max_attempts=2, backoff_s=0.05)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("hung")) == 1

        await eventually(dead)
        assert (await r.dead("hung"))[0][b"error"] == b"cut off after 0.4 s (twice timeout_s)"


async def test_undecodable_record_is_dead_lettered_not_retried(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix)]) as r:
        await r.rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: b"\xc1 not msgpack"})

        async def dead() -> bool:
            return len(await r.dead("a")) == 1

        await eventually(dead)
        assert b"undecodable" in (await r.dead("a"))[0][b"error"]


async def test_an_entry_with_a_damaged_verdict_is_dead_lettered_and_the_partition_flows_on(
    rig: Any, redis_url: str, prefix: str
) -> None:
    """A verdict field that does not parse (written by hand, or damaged) is an undecodable entry: dead-lettered.
    It raised in the batch's preparation instead, so the batch was taken again and again and the partition
    stalled behind it."""
    async with rig([sink("a", redis_url, prefix)]) as r:
        job = decode_job(compact(sample("fine_tuning_job.failed.json")))
        record = encode_event(Event.from_body(job, webhook_id="wh_bad", received_at=time.time()))
        await r.rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: record, VERDICT_FIELD: b"garbage"})
        await r.post(compact(sample("fine_tuning_job.succeeded.json")))

        async def dead_and_delivered() -> bool:
            return len(await r.dead("a")) == 1 and len(await r.delivered("a")) == 1

        await eventually(dead_and_delivered)
        assert b"undecodable" in (await r.dead("a"))[0][b"error"]


async def test_long_handler_renews_its_lease(
    rig: Any, redis_url: str, prefix: str, make_settings: Callable[..., Settings]
) -> None:
    """A handler running 3 s with a 1 s lease is not taken over by another consumer meanwhile."""
    handlers = [sink("slow", redis_url, prefix, sleep_s=3.0, idempotent=False)]
    async with rig(handlers, worker={"lease_s": 1.0, "block_ms": 100}) as r:
        settings = r.settings
        # A second worker process-alike (another consumer name) competing for the same group.
        import processor.worker as worker_module

        original = worker_module.consumer_name
        worker_module.consumer_name = lambda: "other-consumer"  # type: ignore[assignment]
        try:
            async with running_worker(settings, redis_url, registry.build(settings.handlers)):
                await r.post(compact(sample("fine_tuning_job.failed.json")))

                async def delivered() -> bool:
                    return len(await r.delivered("slow")) == 1

                await eventually(delivered, within=15)
                await eventually(r.settled)  # nothing pending: no takeover is running it a second time
        finally:
            worker_module.consumer_name = original
        assert await r.starts("slow") == 1
        assert len(await r.delivered("slow")) == 1


async def orphan_one(rclient: redis.Redis, prefix: str, webhook_id: str) -> str:
    """Enqueue a failed job for handler group `a`, read by a consumer that then dies without acking."""
    streams = Streams(rclient, Keys(prefix))
    await streams.ensure_groups(["a"])
    job = msgspec.json.decode(compact(sample("fine_tuning_job.failed.json")), type=FineTuningJob)
    record = encode_event(Event.from_body(job, webhook_id=webhook_id, received_at=time.time()))
    entry_id: bytes = await rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: record})
    assert len(await streams.read_new("a", "dead-consumer", 10, None)) == 1
    return entry_id.decode()


async def test_entries_of_a_dead_consumer_are_reclaimed(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    settings = make_settings([sink("a", redis_url, prefix)], worker={"lease_s": 0.5, "block_ms": 100})
    await orphan_one(rclient, prefix, "wh_orphan")
    async with running_worker(settings, redis_url, registry.build(settings.handlers)):

        async def delivered() -> bool:
            return await rclient.llen(f"{prefix}:{{sink:a}}") == 1

        await eventually(delivered)
    pending = await rclient.xpending(f"{prefix}:{{p0}}:events", "a")
    assert pending["pending"] == 0


async def test_trim_keeps_everything_a_group_still_needs(
    make_settings: Callable[..., Settings], rclient: redis.Redis, prefix: str
) -> None:
    streams = Streams(rclient, Keys(prefix))
    await streams.ensure_groups(["fast", "slow"])
    ids = [await rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: b"x"}) for _ in range(10)]
    fast = await streams.read_new("fast", "c", 10, None)
    await streams.ack("fast", [e.id for e in fast])
    slow = await streams.read_new("slow", "c", 4, None)
    await streams.ack("slow", [e.id for e in slow[:2]])  # 2 acked, 2 pending, 6 unread
    assert await streams.trim(retention_s=0, now=time.time() + 10) == 2
    remaining = [i for i, _ in await rclient.xrange(f"{prefix}:{{p0}}:events")]
    assert remaining == ids[2:]
    await streams.ack("slow", [e.id for e in slow[2:]])
    rest = await streams.read_new("slow", "c", 10, None)
    await streams.ack("slow", [e.id for e in rest])
    # Everything acknowledged: retention alone decides (nothing older than the horizon is kept).
    assert await streams.trim(retention_s=3600) == 0
    assert await streams.trim(retention_s=0, now=time.time() + 10) == 8


async def test_an_event_whose_consumer_keeps_dying_is_dead_lettered(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    """A poison event that kills the worker process each time is not taken over forever."""
    settings = make_settings([sink("a", redis_url, prefix)], worker={"lease_s": 0.5, "block_ms": 100})
    entry_id = await orphan_one(rclient, prefix, "wh_poison")
    # Four consumers already died holding it; the next takeover is the fifth.
    await rclient.hset(f"{prefix}:{{p0}}:attempts:a", f"{entry_id}:orphaned", 4)
    async with running_worker(settings, redis_url, registry.build(settings.handlers)):

        async def dead() -> bool:
            return bool(await rclient.xlen(f"{prefix}:{{dlq}}:a") == 1)

        await eventually(dead)
    [(_, fields)] = await rclient.xrange(f"{prefix}:{{dlq}}:a")
    assert b"taken over 5 times" in fields[b"error"]
    assert await rclient.llen(f"{prefix}:{{sink:a}}:starts") == 0  # not handed to the handler again
    assert await rclient.hlen(f"{prefix}:{{p0}}:attempts:a") == 0


async def test_a_due_retry_is_not_held_back_by_the_blocking_read(rig: Any, redis_url: str, prefix: str) -> None:
    """The read blocks no later than the next due retry, so a long `block_ms` does not delay it."""
    handlers = [sink("later", redis_url, prefix, fail_times=1, retry_after=0.2)]
    async with rig(handlers, worker={"block_ms": 60_000}) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def delivered() -> bool:
            return len(await r.delivered("later")) == 1

        await eventually(delivered, within=30)  # half the block time: a read waiting it out would miss this
        assert await r.starts("later") == 2


def skipped_count(handler: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("ftjobs_deliveries_total", {"handler": handler, "outcome": outcome}) or 0.0


async def test_a_repeat_is_skipped_with_its_reason_and_costs_no_api_call(
    rig: Any, aiohttp_server: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    fake = FakeOpenAI()
    job = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))
    fake.jobs[job["id"]] = job
    url = str((await aiohttp_server(fake.app())).make_url("/v1"))
    openai = {"api_key": KEY, "base_url": url, "timeout_s": 2.0, "max_retries": 0}
    thin = {"object": "event", "type": "fine_tuning.job.succeeded", "created_at": 1, "data": {"id": job["id"]}}
    before = skipped_count("a", "repeat")
    async with rig([sink("a", redis_url, prefix)], openai=openai) as r:
        with captured_logs() as logs:
            await r.post(msgspec.json.encode(thin | {"id": "evt_1"}), "wh_first")

            async def first() -> bool:
                return len(await r.delivered("a")) == 1

            await eventually(first)
            await r.post(msgspec.json.encode(thin | {"id": "evt_2"}), "wh_again")
            await eventually(r.settled)
    assert [e.id for e in await r.delivered("a")] == ["wh_first"]
    assert fake.calls[f"/v1/fine_tuning/jobs/{job['id']}"] == 1  # the repeat was not hydrated
    [skip] = [line for line in logs if line["event"] == "event_skipped"]
    assert skip["reason"] == "repeat of wh_first" and skip["log_level"] == "info"
    assert (skip["handler"], skip["webhook_id"], skip["job_id"], skip["status"]) == (
        "a",
        "wh_again",
        job["id"],
        "succeeded",
    )
    assert skipped_count("a", "repeat") == before + 1


async def test_status_lists_live_workers_and_health_fails_while_a_loop_is_stuck(
    tmp_path: Path, redis_url: str, prefix: str, rclient: redis.Redis, procs: Callable[..., Proc]
) -> None:
    health = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 2.0, "block_ms": 100, "grace_s": 0.1, "stuck_after_s": 1.0},
        handlers=[sink("slow", redis_url, prefix, sleep_s=600, timeout_s=900)],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    worker = procs(["work", "--health-port", str(health)], tmp_path, env, "work")
    await asyncio.to_thread(wait_for, health_is(health, 200), 20, "healthy worker")
    [seen] = msgspec.json.decode(await asyncio.to_thread(ftjobs_out, env, "status", "--json"))["workers"]
    assert (seen["pid"], seen["handlers"]) == (str(worker.process.pid), "slow")
    table = await asyncio.to_thread(ftjobs_out, env, "status")
    assert "workers: 1 live" in table and f"pid={worker.process.pid}" in table
    # A handler call that hangs (within its timeout) keeps the loop from turning: the health check fails.
    await enqueue_failed(rclient, prefix, "wh_hangs")
    await asyncio.to_thread(wait_for, health_is(health, 503), 20, "unhealthy worker")
    assert await rclient.llen(f"{prefix}:{{sink:slow}}:starts") == 1


def ftjobs_out(env: dict[str, str], *args: str) -> str:
    """What an `ftjobs` command prints (it must succeed)."""
    result = subprocess.run([*FTJOBS, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def health_is(port: int, expected: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return bool(resp.status == expected)
        except urllib.error.HTTPError as exc:
            return exc.code == expected
        except OSError:
            return False

    return check


async def enqueue_failed(rclient: redis.Redis, prefix: str, webhook_id: str, job_id: str | None = None) -> str:
    """XADD a failed-job event (the group must exist, e.g. created by a running worker)."""
    job = msgspec.json.decode(compact(sample("fine_tuning_job.failed.json")), type=FineTuningJob)
    if job_id:
        job = msgspec.structs.replace(job, id=job_id)
    record = encode_event(Event.from_body(job, webhook_id=webhook_id, received_at=time.time()))
    entry_id: bytes = await rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: record})
    return entry_id.decode()


async def test_only_a_consumer_without_heartbeat_has_its_entries_taken_over(rclient: redis.Redis, prefix: str) -> None:
    streams = Streams(rclient, Keys(prefix))
    entry_id = await orphan_one(rclient, prefix, "wh_held")  # held by "dead-consumer", never acked
    await streams.beat("dead-consumer", {"pid": 1}, ttl_s=60)  # ... which is alive after all

    async def idle_past_lease() -> bool:
        [row] = await rclient.xpending_range(f"{prefix}:{{p0}}:events", "a", "-", "+", 1)
        return bool(row["time_since_delivered"] > 50)

    await eventually(idle_past_lease)
    # Not taken, and the partition is busy: no new entry may be read while a live consumer holds one.
    assert await streams.reclaim("a", "other", count=10) == ([], True)
    await streams.stop_beating("dead-consumer")  # now it is gone
    [taken], busy = await streams.reclaim("a", "other", count=10)
    assert (taken.id, taken.orphaned, busy) == (entry_id, 1, False)


async def test_consumers_that_hold_nothing_are_forgotten(rclient: redis.Redis, prefix: str) -> None:
    """Every worker start is a new consumer; those gone and holding nothing are deleted, so they stay few."""
    streams = Streams(rclient, Keys(prefix))
    await orphan_one(rclient, prefix, "wh_one")  # "dead-consumer" holds it
    await rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: b"x"})
    [finished] = await streams.read_new("a", "finished-consumer", 10, None)
    await streams.ack("a", [finished.id])
    assert await streams.forget_consumers("a", idle_s=0) == 1
    consumers = await rclient.xinfo_consumers(f"{prefix}:{{p0}}:events", "a")
    assert [(c["name"], c["pending"]) for c in consumers] == [(b"dead-consumer", 1)]


async def test_hydration_failures_name_the_handler_job_and_webhook(
    rig: Any, aiohttp_server: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    fake = FakeOpenAI()
    job = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))
    fake.jobs[job["id"]] = job
    fake.failures[job["id"]] = [503]  # the API is away once for this one
    url = str((await aiohttp_server(fake.app())).make_url("/v1"))
    openai = {"api_key": KEY, "base_url": url, "timeout_s": 2.0, "max_retries": 0, "hydrate_retry_s": 0.1}
    thin = {"object": "event", "type": "fine_tuning.job.succeeded", "created_at": 1}
    async with rig([sink("a", redis_url, prefix)], openai=openai) as r:
        with captured_logs() as logs:
            await r.post(msgspec.json.encode(thin | {"id": "evt_gone", "data": {"id": "ftjob-gone"}}), "wh_gone")
            await r.post(msgspec.json.encode(thin | {"id": "evt_late", "data": {"id": job["id"]}}), "wh_late")

            async def both_done() -> bool:
                return len(await r.dead("a")) == 1 and len(await r.delivered("a")) == 1

            await eventually(both_done)
    [dead] = [line for line in logs if line["event"] == "event_dead_lettered"]
    assert (dead["handler"], dead["job_id"], dead["webhook_id"]) == ("a", "ftjob-gone", "wh_gone")
    waiting = [line for line in logs if line["event"] == "event_not_prepared"]
    assert waiting and {(w["handler"], w["job_id"], w["webhook_id"]) for w in waiting} == {("a", job["id"], "wh_late")}


# A graceful stop that cuts off a slow lane (grace_s over) must not drop the finished, not yet acknowledged
# calls of the batch's other lanes: the next worker would make them again (found by review: a lane's last
# call used to wait for the batch's end to be acknowledged).
class HangsOnce(Sink):
    """Like `Sink` (counts every side effect), but the job `ftjob-slow` hangs on its first call."""

    async def __call__(self, delivery: Delivery) -> None:
        assert self.client is not None
        if delivery.event.job_id == "ftjob-slow":
            starts = await self.client.rpush(f"{self.options.key}:slow-starts", 1)
            if starts == 1:
                await asyncio.Event().wait()  # a call that lasts longer than the stop's grace
        await super().__call__(delivery)


async def _enqueue_jobs(rclient: redis.Redis, prefix: str, job_ids: list[str]) -> dict[str, str]:
    await Streams(rclient, Keys(prefix)).ensure_groups(["mix"])
    base = msgspec.json.decode(compact(sample("fine_tuning_job.succeeded.json")))
    ids = {}
    for job_id in job_ids:
        job = msgspec.convert(base | {"id": job_id}, FineTuningJob)
        event = Event.from_body(job, webhook_id=f"wh_{job_id}", received_at=time.time())
        ids[job_id] = text(await rclient.xadd(f"{prefix}:{{p0}}:events", {RECORD_FIELD: encode_event(event)}))
    return ids


async def test_a_cut_off_stop_does_not_resend_the_other_lanes_finished_calls(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    table = sink("mix", redis_url, prefix, concurrency=2, timeout_s=30) | {"type": f"{__name__}:HangsOnce"}
    settings = make_settings([table], worker={"lease_s": 1.0, "block_ms": 100, "grace_s": 0.3})
    key = f"{prefix}:{{sink:mix}}"
    ids = await _enqueue_jobs(rclient, prefix, ["ftjob-fast", "ftjob-slow"])

    async def fast_done_and_slow_running() -> bool:
        counts: Any = await rclient.hgetall(f"{key}:count")
        return counts == {b"wh_ftjob-fast": b"1"} and await rclient.llen(f"{key}:slow-starts") == 1

    async with running_worker(settings, redis_url, registry.build(settings.handlers)):
        await eventually(fast_done_and_slow_running)
    # The stop cut off the slow call after grace_s; the fast call had finished long before.
    pending = await rclient.xpending_range(f"{prefix}:{{p0}}:events", "mix", "-", "+", 10)
    pending_ids = {text(row["message_id"]) for row in pending}
    assert ids["ftjob-slow"] in pending_ids
    fast_acked = ids["ftjob-fast"] not in pending_ids

    # The next worker takes over what is pending: the fast job's call is made a second time if it was left.
    async with running_worker(settings, redis_url, registry.build(settings.handlers)):

        async def settled() -> bool:
            groups = await rclient.xinfo_groups(f"{prefix}:{{p0}}:events")
            return all(g["lag"] == 0 and g["pending"] == 0 for g in groups)

        await eventually(settled)
    counts = await rclient.hgetall(f"{key}:count")
    assert counts == {b"wh_ftjob-fast": b"1", b"wh_ftjob-slow": b"1"}, counts
    assert fast_acked


# A handler that raises CancelledError itself (a library leaking one), neither cut off by its deadline nor
# stopped: a failure retried like any other, not a runner that ends silently with its partition leased.
class RaisesCancelledOnce(Sink):
    """Like `Sink`, but the job `ftjob-bad` raises CancelledError on its first call (a library leaking one)."""

    async def __call__(self, delivery: Delivery) -> None:
        assert self.client is not None
        if delivery.event.job_id == "ftjob-bad" and await self.client.rpush(f"{self.options.key}:bad", 1) == 1:
            raise asyncio.CancelledError
        await super().__call__(delivery)


async def test_a_handler_raising_cancelled_error_does_not_stop_the_partition(
    make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    table = sink("mix", redis_url, prefix, concurrency=2, backoff_s=0.05) | {"type": f"{__name__}:RaisesCancelledOnce"}
    settings = make_settings([table], worker={"lease_s": 1.0, "block_ms": 100})
    key = f"{prefix}:{{sink:mix}}"
    await _enqueue_jobs(rclient, prefix, ["ftjob-bad", "ftjob-ok"])
    async with running_worker(settings, redis_url, registry.build(settings.handlers)) as worker:

        async def both_delivered() -> bool:
            return await rclient.hlen(f"{key}:count") == 2

        await eventually(both_delivered)
        assert not any(loop.done() for _, loop, _ in worker.runners.values())


async def test_a_runner_cancelled_by_nobody_fails_the_worker(
    make_settings: Callable[..., Settings], redis_url: str, prefix: str
) -> None:
    """A runner's loop ended by a CancelledError that neither a stop nor a hand-over asked for: its partition
    would stay leased with nothing consuming it, so the worker fails (its supervisor restarts it)."""
    settings = make_settings([sink("a", redis_url, prefix)], worker={"lease_s": 1.0, "block_ms": 100})
    with pytest.raises(WorkerFailed, match="nobody asked for"):
        async with running_worker(settings, redis_url, registry.build(settings.handlers)) as worker:

            async def running() -> bool:
                return bool(worker.runners)

            await eventually(running)
            [(_, loop, _)] = worker.runners.values()
            loop.cancel()
            await asyncio.wait_for(worker.finished.wait(), 30)
    assert worker.failure.startswith("runner:a:0")
