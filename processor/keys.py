"""Every key ftjobs uses, named in one place.

The events stream is split into `[redis] partitions` partitions by job id (`Keys.partition_of`). Every key
one enqueue touches, and each handler's progress on the partition, carries the partition's hash tag, so on a
Redis Cluster they share one slot and the atomic dedupe + verdict + XADD stays one Lua call. Keys (all under
`settings.redis.prefix`, default `ftjobs`; `{pN}` is partition N's hash tag):

    {p}:{pN}:events              partition N of the events stream; a consumer group per handler
    {p}:{pN}:seen:{webhook-id}   dedupe marker → the entry id (as one integer), expires after the dedupe window
    {p}:{pN}:job:{id}, {p}:{pN}:timeline:{id}, {p}:{pN}:jobs   job state and the partition's slice of the index
    {p}:{pN}:retry:{handler}     sorted set: entry id → when the next attempt is due (entry stays pending)
    {p}:{pN}:attempts:{handler}  hash: entry id → failed attempts so far, `{id}:error` → the last error,
                                 `{id}:orphaned` → takeovers from consumers that died holding it
    {p}:{pN}:done:{handler}:{id} marks an event done for an effectively-once handler (expires with retention)
    {p}:{pN}:ready               `/readyz`'s write probe (expires after a second)
    {p}:{q}:quarantine, {p}:{q}:seen:{webhook-id}   signed bodies that did not match the schema, for replay
    {p}:{dlq}:{handler}          dead letters: the record, the error and the attempt count (one slot for all)
    {p}:lease:{handler}:{N}      which worker consumes partition N for the handler (`partitions.Leases`)
    {p}:h:{handler}:...          the handler's own state (e.g. Slack thread timestamps)
    {p}:{w}:worker:{consumer}    a live worker's heartbeat (hash: handlers, pid, host, last loop), expires;
    {p}:{w}:workers              and when each one's expires (sorted set)
    {p}:hydrated:{event}         the job fetched for a thin event (`hydration`), and its `:lock`
    {p}:rate:{handler}:{minute}, {p}:{b:handler}:breaker   the handler's guards (`limits`)
    {p}:poller, {p}:poller:seen  the poller's start time and last status per job
"""

from __future__ import annotations

import re
import zlib
from typing import Final

#: A stream entry id as the dashboard and the CLI take it, `ms-seq`: ASCII digits only (`\d` admits other
#: scripts' digits), each part at most 19 of them (Redis refuses ids beyond 64 bits).
ENTRY_ID: Final = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")


class PartitionKeys:
    """The keys of one partition of the events stream. They all carry the partition's hash tag, so one
    enqueue (dedupe key, stream, job hash, timeline, index slice) and a handler's progress (retries, attempts,
    done-markers) stay in one cluster slot, and their atomic steps stay single Lua calls."""

    def __init__(self, prefix: str, tag: str) -> None:
        self.tag = tag
        self.stem = stem = f"{prefix}:{{{tag}}}"
        self.events = f"{stem}:events"
        self.jobs = f"{stem}:jobs"

    def seen(self, webhook_id: str) -> str:
        return f"{self.stem}:seen:{webhook_id}"

    def job(self, job_id: str) -> str:
        return f"{self.stem}:job:{job_id}"

    def timeline(self, job_id: str) -> str:
        return f"{self.stem}:timeline:{job_id}"

    def retry(self, handler: str) -> str:
        return f"{self.stem}:retry:{handler}"

    def attempts(self, handler: str) -> str:
        return f"{self.stem}:attempts:{handler}"

    def done(self, handler: str, event_id: str) -> str:
        return f"{self.stem}:done:{handler}:{event_id}"

    @property
    def ready(self) -> str:
        """Written by `/readyz` to see that the partition's node takes writes (it expires at once)."""
        return f"{self.stem}:ready"


class Keys:
    """Key names for one prefix and number of partitions."""

    def __init__(self, prefix: str, partitions: int = 1) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.prefix = prefix
        self.partitions = partitions
        self.parts = [PartitionKeys(prefix, f"p{n}") for n in range(partitions)]
        #: Quarantined bodies have no job id yet: they have a slot of their own.
        self.quarantine_part = PartitionKeys(prefix, "q")
        self.quarantine = f"{self.quarantine_part.stem}:quarantine"

    def partition_of(self, job_id: str) -> int:
        """The partition of a job's events: a stable hash of its id (the same in every process and release)."""
        return zlib.crc32(job_id.encode()) % self.partitions if self.partitions > 1 else 0

    def part(self, job_id: str) -> PartitionKeys:
        return self.parts[self.partition_of(job_id)]

    def job(self, job_id: str) -> str:
        return self.part(job_id).job(job_id)

    def timeline(self, job_id: str) -> str:
        return self.part(job_id).timeline(job_id)

    def dlq(self, handler: str) -> str:
        return f"{self.prefix}:{{dlq}}:{handler}"

    def dlq_marker(self, handler: str, partition: int, entry_id: str) -> str:
        """Set when an entry of `partition` was dead-lettered for `handler` (so it is written once); once the
        letter is replayed, it holds the replay's entry id."""
        return f"{self.prefix}:{{dlq}}:{handler}:of:{partition}:{entry_id}"

    def lease(self, handler: str, partition: int) -> str:
        return f"{self.prefix}:lease:{handler}:{partition}"

    def handler_state(self, handler: str) -> str:
        return f"{self.prefix}:h:{handler}"

    def hydrated(self, event_id: str) -> str:
        return f"{self.prefix}:hydrated:{event_id}"

    def hydrated_lock(self, event_id: str) -> str:
        return f"{self.prefix}:hydrated:{event_id}:lock"

    def rate(self, handler: str) -> str:
        """The rate-limit counters' stem (`limits.Guard` appends the minute)."""
        return f"{self.prefix}:rate:{handler}"

    def breaker(self, handler: str) -> str:
        return f"{self.prefix}:{{b:{handler}}}:breaker"

    def breaker_probe(self, handler: str) -> str:
        return f"{self.prefix}:{{b:{handler}}}:probe"

    @property
    def poller(self) -> str:
        return f"{self.prefix}:poller"

    @property
    def poller_seen(self) -> str:
        return f"{self.prefix}:poller:seen"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:{{w}}:worker:{consumer}"

    @property
    def workers(self) -> str:
        """Sorted set: consumer → when its heartbeat expires (the live workers, without a SCAN)."""
        return f"{self.prefix}:{{w}}:workers"
