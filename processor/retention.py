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
from redis.asyncio.cluster import RedisCluster

from processor.client import Client
from processor.keys import Keys
from processor.settings import RedisSettings


class Swept(msgspec.Struct, kw_only=True):
    """What one sweep removed."""

    jobs: int = 0
    dead_letters: int = 0
    quarantined: int = 0

    def __bool__(self) -> bool:
        return any((self.jobs, self.dead_letters, self.quarantined))


async def sweep(
    client: Client, keys: Keys, groups: Iterable[str], settings: RedisSettings, now: float | None = None
) -> Swept:
    """Trim the jobs index (jobs unchanged for the retention), the dead-letter and quarantine streams."""
    now = time.time() if now is None else now
    swept = Swept()
    for part in keys.parts:
        swept.jobs += int(await client.zremrangebyscore(part.jobs, "-inf", now - settings.retention_s))
    oldest = f"{int((now - settings.dead_letter_retention_s) * 1000)}-0"
    groups = list(groups)
    for group in groups:
        swept.dead_letters += await _trim(client, keys.dlq(group), oldest, settings.max_dead_letters)
    swept.quarantined = await _trim(client, keys.quarantine, oldest, settings.max_dead_letters)
    return swept


async def _trim(client: Client, stream: str, min_id: str, max_len: int) -> int:
    """Drop entries older than `min_id`, then the oldest beyond `max_len`; how many went."""
    removed: int = await client.xtrim(stream, minid=min_id, approximate=False)
    removed += await client.xtrim(stream, maxlen=max_len, approximate=False)
    return removed


async def sizes(client: Client, keys: Keys) -> dict[str, Any]:
    """What `Streams.status` does not count, for `ftjobs status`, the gauges and the dashboard: jobs tracked
    and the server's memory. (Entries per stream come from `Streams.status`; asking again would read them twice.)"""
    jobs = 0
    for part in keys.parts:
        jobs += int(await client.zcard(part.jobs))
    if isinstance(client, RedisCluster):  # every master's memory (replicas hold copies of the same data)
        by_node: Any = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        used = sum(int(info.get("used_memory", 0)) for info in by_node.values())
    else:
        used = int((await client.info("memory")).get("used_memory", 0))
    return {"jobs": jobs, "used_memory_bytes": used}
