"""Everything ftjobs writes stays bounded by configuration: the sweep that keeps it so, and the sizes it reports.

What bounds what:

* the events stream: `Streams.trim` (entries older than `redis.retention_s` that every group acknowledged);
* dedupe markers, job hashes, timelines, hydrated jobs, done markers: a TTL when written (the dedupe window,
  or the retention), and a timeline keeps its last `enqueue.TIMELINE_MAX` events;
* consumers of workers that are gone: `Streams.forget_consumers`, once they hold nothing;
* the jobs index, the dead-letter streams and the quarantine stream: nothing expires them by itself, so
  `sweep` trims them on the worker's trim interval.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec
import redis.asyncio as redis

from processor.settings import RedisSettings
from processor.stream import Keys


class Swept(msgspec.Struct, kw_only=True):
    """What one sweep removed."""

    jobs: int = 0
    dead_letters: int = 0
    quarantined: int = 0

    def __bool__(self) -> bool:
        return any((self.jobs, self.dead_letters, self.quarantined))


async def sweep(
    client: redis.Redis, keys: Keys, groups: Iterable[str], settings: RedisSettings, now: float | None = None
) -> Swept:
    """Trim the jobs index (jobs unchanged for the retention), the dead-letter and quarantine streams."""
    now = time.time() if now is None else now
    swept = Swept()
    swept.jobs = int(await client.zremrangebyscore(keys.jobs, "-inf", now - settings.retention_s))
    oldest = f"{int((now - settings.dead_letter_retention_s) * 1000)}-0"
    groups = list(groups)
    for group in groups:
        swept.dead_letters += await _trim(client, keys.dlq(group), oldest, settings.max_dead_letters)
    swept.quarantined = await _trim(client, keys.quarantine, oldest, settings.max_dead_letters)
    return swept


async def _trim(client: redis.Redis, stream: str, min_id: str, max_len: int) -> int:
    """Drop entries older than `min_id`, then the oldest beyond `max_len`; how many went."""
    removed: int = await client.xtrim(stream, minid=min_id, approximate=False)
    removed += await client.xtrim(stream, maxlen=max_len, approximate=False)
    return removed


async def sizes(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """What `Streams.status` does not count, for `ftjobs status`, the gauges and the dashboard: jobs tracked
    and the server's memory. (Entries per stream come from `Streams.status`; asking again would read them twice.)"""
    async with client.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.jobs)
        pipe.info("memory")
        jobs, memory = await pipe.execute()
    return {"jobs": jobs, "used_memory_bytes": int(memory.get("used_memory", 0))}
