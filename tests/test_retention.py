"""Everything ftjobs writes is bounded: the sweep trims what no TTL expires, and never a pending entry."""

from __future__ import annotations

import time

import redis.asyncio as redis

from processor.retention import sizes, sweep
from processor.settings import RedisSettings
from processor.stream import Keys
from tests.conftest import eventually


async def test_sweep_trims_the_jobs_index_dead_letters_and_quarantine(rclient: redis.Redis, prefix: str) -> None:
    keys, now = Keys(prefix), time.time()
    settings = RedisSettings(retention_s=3600, dead_letter_retention_s=7200, max_dead_letters=5)
    await rclient.zadd(keys.jobs, {"ftjob-old": now - 3601, "ftjob-new": now - 10})
    old_ms = int((now - 7201) * 1000)
    await rclient.xadd(keys.dlq("slack"), {"e": b"old"}, id=f"{old_ms}-0")
    for i in range(8):
        await rclient.xadd(keys.dlq("slack"), {"e": str(i)})
        await rclient.xadd(keys.quarantine, {"body": str(i)})

    swept = await sweep(rclient, keys, ["slack"], settings, now=now)

    assert (swept.jobs, swept.dead_letters, swept.quarantined) == (1, 4, 3)
    assert await rclient.zrange(keys.jobs, 0, -1) == [b"ftjob-new"]
    kept = [fields[b"e"] for _, fields in await rclient.xrange(keys.dlq("slack"))]
    assert kept == [b"3", b"4", b"5", b"6", b"7"]  # the newest five
    assert await rclient.xlen(keys.quarantine) == 5
    report = await sizes(rclient, keys, ["slack"])
    assert report["jobs"] == 1 and report["dead_letters"] == {"slack": 5} and report["quarantine"] == 5
    assert report["used_memory_bytes"] > 0


async def test_idle_consumers_are_forgotten_only_when_they_hold_nothing(rclient: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    await rclient.xgroup_create(keys.events, "log", id="$", mkstream=True)
    await rclient.xadd(keys.events, {"e": b"1"})
    await rclient.xreadgroup("log", "holder", {keys.events: ">"})  # pending under `holder`, never acked
    await rclient.xgroup_createconsumer(keys.events, "log", "gone")  # a worker that left with nothing
    settings = RedisSettings(idle_consumer_s=1)

    async def forgotten() -> bool:
        await sweep(rclient, keys, ["log"], settings)
        names = {c["name"] for c in await rclient.xinfo_consumers(keys.events, "log")}
        return names == {b"holder"}

    await eventually(forgotten, within=15)
    [(_, pending)] = [(c["name"], c["pending"]) for c in await rclient.xinfo_consumers(keys.events, "log")]
    assert pending == 1  # its entry is still there, for a takeover
