"""Everything ftjobs writes is bounded: the sweep trims what no TTL expires."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as redis

from processor.keys import Keys
from processor.retention import sizes, sweep
from processor.settings import RedisSettings
from processor.stream import Streams


async def test_sweep_trims_the_jobs_index_dead_letters_and_quarantine(rclient: redis.Redis, prefix: str) -> None:
    keys, now = Keys(prefix), time.time()
    settings = RedisSettings(retention_s=3600, dead_letter_retention_s=7200, max_dead_letters=5)
    await rclient.zadd(keys.parts[0].jobs, {"ftjob-old": now - 3601, "ftjob-new": now - 10})
    old_ms = int((now - 7201) * 1000)
    await rclient.xadd(keys.dlq("slack"), {"e": b"old"}, id=f"{old_ms}-0")
    for i in range(8):
        await rclient.xadd(keys.dlq("slack"), {"e": str(i)})
        await rclient.xadd(keys.quarantine, {"body": str(i)})

    swept = await sweep(rclient, keys, ["slack"], settings, now=now)

    assert (swept.jobs, swept.dead_letters, swept.quarantined) == (1, 4, 3)
    assert await rclient.zrange(keys.parts[0].jobs, 0, -1) == [b"ftjob-new"]
    kept = [fields[b"e"] for _, fields in await rclient.xrange(keys.dlq("slack"))]
    assert kept == [b"3", b"4", b"5", b"6", b"7"]  # the newest five
    assert await rclient.xlen(keys.quarantine) == 5
    report = await sizes(rclient, keys)
    status = await Streams(rclient, keys).status(["slack"])
    assert report["jobs"] == 1 and status["handlers"]["slack"]["dead_letters"] == 5 and status["quarantine"] == 5
    assert report["used_memory_bytes"] > 0


async def test_the_workers_trimmer_sweeps(rig: Any, redis_url: str, prefix: str) -> None:
    from tests.conftest import eventually, sink

    handlers = [sink("all", redis_url, prefix)]
    async with rig(handlers, worker={"trim_interval_s": 0.05}) as r:
        retention_s = r.settings.redis.retention_s
        await r.rclient.zadd(f"{prefix}:{{p0}}:jobs", {"ftjob-long-gone": time.time() - retention_s - 60})

        async def swept() -> bool:
            return await r.rclient.zcard(f"{prefix}:{{p0}}:jobs") == 0

        await eventually(swept)
