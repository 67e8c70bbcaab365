"""Redis comes back empty (FLUSHALL, a restart without persistence, a replica promoted) under a running receiver
and worker: nothing they accept afterwards is lost, and nobody needs a restart.

Here the "server" is emptied by deleting every key of the test's prefix (what FLUSHALL does to it), so the test
runs on a shared Redis too; the sinks' own keys are kept, they stand for the outside world."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from processor import registry
from processor.eventrecord import decode_event
from processor.receiver import create_app
from processor.runtime import running_worker
from processor.settings import Settings
from tests.conftest import eventually, sample, signed, sink

PATH = "/webhooks/openai"
SUCCEEDED = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))


async def empty(rclient: Any, prefix: str) -> None:
    """Delete the test's keys, as FLUSHALL would; the sinks (the targets' side) stay."""
    keys = [k async for k in rclient.scan_iter(match=f"{prefix}:*", count=1000) if b"{sink:" not in k]
    for key in keys:
        await rclient.delete(key)


def body(job_id: str) -> bytes:
    return msgspec.json.encode(SUCCEEDED | {"id": job_id})


async def delivered(rclient: Any, prefix: str, name: str) -> list[bytes]:
    items: list[bytes] = await rclient.lrange(f"{prefix}:{{sink:{name}}}", 0, -1)
    return items


async def test_events_accepted_after_redis_emptied_are_delivered_by_a_worker_started_later(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    prefix: str,
    rclient: Any,
) -> None:
    settings = make_settings([sink("a", redis_url, prefix, idempotent=False)])
    client = await aiohttp_client(create_app(settings, redis_url))
    first = body("ftjob-before")
    assert (await client.post(PATH, data=first, headers=signed(first))).status == 200
    await empty(rclient, prefix)  # the first event goes with it: only what is accepted afterwards counts
    # The receiver made the groups at its start; the stream it now writes to is a new one.
    after = body("ftjob-after")
    answer = await client.post(PATH, data=after, headers=signed(after, "wh_after"))
    assert answer.status == 200 and (await answer.json())["status"] == "accepted"
    # A worker started only now (restarted by hand, or by its supervisor) still gets the accepted event.
    async with running_worker(settings, redis_url, registry.build(settings.handlers)):

        async def got_it() -> bool:
            return len(await delivered(rclient, prefix, "a")) == 1

        await eventually(got_it)
        assert decode_event((await delivered(rclient, prefix, "a"))[0]).id == "wh_after"


async def test_a_running_worker_makes_its_group_again_and_delivers_after_redis_emptied(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    prefix: str,
    rclient: Any,
) -> None:
    settings = make_settings([sink("a", redis_url, prefix, idempotent=False)])
    events = f"{prefix}:{{p0}}:events"
    async with running_worker(settings, redis_url, registry.build(settings.handlers)):

        async def group_exists() -> bool:
            try:
                return any(g["name"] == b"a" for g in await rclient.xinfo_groups(events))
            except Exception:
                return False

        await eventually(group_exists)
        await empty(rclient, prefix)
        # Nobody sends anything: the worker alone puts its group back (its reads answered NOGROUP).
        await eventually(group_exists)
        # A receiver started now, on a stream the worker made, is ready, and what it accepts is delivered.
        client = await aiohttp_client(create_app(settings, redis_url))
        assert (await client.get("/readyz")).status == 200
        sent = body("ftjob-after")
        assert (await client.post(PATH, data=sent, headers=signed(sent))).status == 200

        async def got_it() -> bool:
            return len(await delivered(rclient, prefix, "a")) == 1

        await eventually(got_it)


async def test_readiness_puts_the_groups_back_after_redis_emptied(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    prefix: str,
    rclient: Any,
) -> None:
    """Without a worker running, a receiver behind a load balancer must not stay unready for good: no webhook
    would reach it, and nothing else makes the groups."""
    settings = make_settings([sink("a", redis_url, prefix, idempotent=False)])
    client = await aiohttp_client(create_app(settings, redis_url))
    assert (await client.get("/readyz")).status == 200
    await empty(rclient, prefix)

    async def ready_with_its_groups() -> bool:  # a "ready" is reused for a second, then checked again
        ready = await client.get("/readyz")
        assert ready.status == 200, await ready.text()
        with contextlib.suppress(ResponseError):  # no stream yet
            return [g["name"] for g in await rclient.xinfo_groups(f"{prefix}:{{p0}}:events")] == [b"a"]
        return False

    await eventually(ready_with_its_groups)
