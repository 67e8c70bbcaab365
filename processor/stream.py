"""Redis streams: every key ftjobs uses, and every command it sends, in one place.

Keys (all under `settings.redis.prefix`, default `ftjobs`):

    {p}:events              the events stream; one consumer group per handler (each its own progress)
    {p}:seen:{webhook-id}   dedupe marker → the entry id, expires after the dedupe window
    {p}:quarantine          signed bodies that did not match the schema, kept for replay
    {p}:retry:{handler}     sorted set: entry id → when the next attempt is due (entry stays pending)
    {p}:attempts:{handler}  hash: entry id → failed attempts so far, `{id}:error` → the last error,
                            `{id}:orphaned` → takeovers from consumers that died holding it
    {p}:dlq:{handler}       dead letters: the record, the error and the attempt count
    {p}:done:{handler}:{id} marks an event done for an effectively-once handler (expires with retention)
    {p}:h:{handler}:...     the handler's own state (e.g. Slack thread timestamps)
    {p}:worker:{consumer}   a live worker's heartbeat (hash: handlers, pid, host, last loop), expires after a lease
    {p}:job:{id}, {p}:timeline:{id}, {p}:jobs   job state, written at enqueue (`enqueue._ENQUEUE_LUA`)
    {p}:hydrated:{event}    the job fetched for a thin event (`hydration`), and its `:lock`
    {p}:rate:{handler}:{minute}, {p}:breaker:{handler}   the handler's guards (`limits`)
    {p}:poller, {p}:poller:seen                          the poller's start time and last status per job

An entry is acknowledged in a group only once its handler succeeded, skipped it, or dead-lettered it, so
an entry that a crashed consumer held is still pending and is taken over after the lease. Only a consumer
without a heartbeat counts as crashed: a live worker's entries are never taken from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from processor.records import DeadLetterRecord


class Entry(NamedTuple):
    """A stream entry as the worker sees it."""

    id: str
    #: The msgpack `Event`.
    record: bytes
    #: The job-state verdict given at enqueue ("kind|previous|repeat of"; empty when none).
    verdict: bytes = b""
    #: How many times this entry was taken over from a consumer that died holding it.
    orphaned: int = 0
    #: The W3C `traceparent` of the enqueue, when traces are on (`processor.tracing`; empty otherwise).
    trace: bytes = b""


RECORD_FIELD: Final = b"e"
VERDICT_FIELD: Final = b"v"
TRACE_FIELD: Final = b"t"
#: Pages of pending entries a takeover pass looks through (entries waiting for a retry are idle too).
_RECLAIM_PAGES: Final = 10

#: Renew only what this consumer still holds: an XCLAIM of an entry another consumer now holds would steal it.
_RENEW_LUA: Final = """
local lost = {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if row and row[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

_FORGET_CONSUMERS_LUA: Final = """
local deleted = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #info, 2 do c[info[i]] = info[i + 1] end
  if c['pending'] == 0 and c['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    deleted = deleted + 1
  end
end
return deleted
"""


def connect(url: str, *, socket_timeout: float = 5.0) -> redis.Redis:
    """A client for `url` (`redis://`, `rediss://`, `unix://`) that fails fast when the server is away.

    Blocking reads need `socket_timeout` above their BLOCK time; the worker passes a larger one.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class Keys:
    """Key names for one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.events = f"{prefix}:events"
        self.quarantine = f"{prefix}:quarantine"

    def seen(self, webhook_id: str) -> str:
        return f"{self.prefix}:seen:{webhook_id}"

    def retry(self, handler: str) -> str:
        return f"{self.prefix}:retry:{handler}"

    def attempts(self, handler: str) -> str:
        return f"{self.prefix}:attempts:{handler}"

    def dlq(self, handler: str) -> str:
        return f"{self.prefix}:dlq:{handler}"

    def done(self, handler: str, event_id: str) -> str:
        return f"{self.prefix}:done:{handler}:{event_id}"

    def handler_state(self, handler: str) -> str:
        return f"{self.prefix}:h:{handler}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def timeline(self, job_id: str) -> str:
        return f"{self.prefix}:timeline:{job_id}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def hydrated(self, event_id: str) -> str:
        return f"{self.prefix}:hydrated:{event_id}"

    def hydrated_lock(self, event_id: str) -> str:
        return f"{self.prefix}:hydrated:{event_id}:lock"

    def rate(self, handler: str) -> str:
        """The rate-limit counters' stem (`limits.Guard` appends the minute)."""
        return f"{self.prefix}:rate:{handler}"

    def breaker(self, handler: str) -> str:
        return f"{self.prefix}:breaker:{handler}"

    def breaker_probe(self, handler: str) -> str:
        return f"{self.prefix}:breaker:{handler}:probe"

    @property
    def poller(self) -> str:
        return f"{self.prefix}:poller"

    @property
    def poller_seen(self) -> str:
        return f"{self.prefix}:poller:seen"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"


class Streams:
    """The consumer side: groups, reads, acks, retries, claims, dead letters, trimming and counts."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._ensured: set[str] = set()

    async def ensure_groups(self, groups: Iterable[str]) -> None:
        """Create each handler's group (at the stream's end) if missing, and the stream with it.

        A group starts at `$`, so a handler added later does not replay the retained history; the receiver
        therefore makes sure the groups exist before it enqueues anything (cheap once done: a set lookup).
        """
        for group in groups:
            if group in self._ensured:
                continue
            try:
                await self.client.xgroup_create(self.keys.events, group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._ensured.add(group)

    async def missing_groups(self, groups: Iterable[str]) -> list[str]:
        """The groups among `groups` that do not exist (readiness)."""
        try:
            existing = {text(g["name"]) for g in await self.client.xinfo_groups(self.keys.events)}
        except ResponseError:  # no stream yet
            existing = set()
        return [g for g in groups if g not in existing]

    async def read_new(self, group: str, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to `group` yet (XREADGROUP `>`), blocking up to `block_ms`."""
        reply: Any = await self.client.xreadgroup(group, consumer, {self.keys.events: ">"}, count=count, block=block_ms)
        return [_entry(raw) for _, entries in reply or () for raw in entries if raw[1]]

    async def ack(
        self,
        group: str,
        ids: Sequence[str],
        retried: Sequence[str] | None = None,
        done: Sequence[str] = (),
        done_ttl_s: int = 0,
    ) -> None:
        """Mark `ids` done for `group` in one step: acknowledge them, forget the attempt counters of those that
        had failed before (`retried`; None: any of them may have), and set the done-markers of the events in
        `done` (effectively-once handlers) — so a marker never exists without its ack, nor the other way round."""
        if not ids:
            return
        forget = ids if retried is None else retried
        if not forget and not done:
            await self.client.xack(self.keys.events, group, *ids)
            return
        async with self.client.pipeline(transaction=True) as pipe:
            for event_id in done:
                pipe.set(self.keys.done(group, event_id), 1, ex=done_ttl_s)
            pipe.xack(self.keys.events, group, *ids)
            if forget:
                pipe.hdel(
                    self.keys.attempts(group), *forget, *(f"{i}:{k}" for i in forget for k in ("error", "orphaned"))
                )
            await pipe.execute()

    async def attempts(self, group: str, ids: Sequence[str]) -> list[int]:
        """Failed attempts so far for each of `ids`."""
        if not ids:
            return []
        values = await self.client.hmget(self.keys.attempts(group), list(ids))
        return [int(v) if v else 0 for v in values]

    async def schedule_retry(self, group: str, entry_id: str, attempts: int, due: float, error: str) -> None:
        """Record failed attempts so far and when to try again; the entry stays pending in the group."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.attempts(group), mapping={entry_id: attempts, f"{entry_id}:error": error})
            pipe.zadd(self.keys.retry(group), {entry_id: due})
            await pipe.execute()

    async def take_due(self, group: str, consumer: str, count: int, now: float | None = None) -> list[Entry]:
        """Claim up to `count` entries whose retry is due. ZREM decides which consumer gets each one."""
        key = self.keys.retry(group)
        due: Any = await self.client.zrangebyscore(key, "-inf", now or time.time(), start=0, num=count)
        taken = []
        for raw_id in due:
            if await self.client.zrem(key, raw_id):
                taken.append(text(raw_id))
        return await self._claim(group, consumer, taken)

    async def next_due(self, group: str) -> float | None:
        """When the group's earliest scheduled retry is due (epoch seconds), or None when none is."""
        first: Any = await self.client.zrange(self.keys.retry(group), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def _claim(self, group: str, consumer: str, ids: list[str]) -> list[Entry]:
        if not ids:
            return []
        claimed: Any = await self.client.xclaim(self.keys.events, group, consumer, 0, list[Any](ids))
        entries = [_entry(raw) for raw in claimed if raw and raw[1]]
        gone = set(ids) - {entry.id for entry in entries}
        if gone:  # trimmed away while pending (only possible if retention was cut by hand)
            await self.ack(group, sorted(gone))
        return entries

    async def reclaim(self, group: str, consumer: str, lease_s: float, count: int) -> list[Entry]:
        """Take over entries idle longer than the lease whose consumer is dead (no heartbeat), and this
        consumer's own entries that it let go of (a batch cut short by a Redis error); never those waiting
        for a retry. Only the takeovers from a dead consumer count toward `max_takeovers`.

        A live consumer renews every entry it holds and keeps its heartbeat, so its entries are never taken;
        XCLAIM's min-idle-time re-checks each entry at the moment of the claim.
        """
        lease_ms = int(lease_s * 1000)
        start, found, dead_owner = "-", list[str](), set[str]()
        for _ in range(_RECLAIM_PAGES):
            rows: Any = await self.client.xpending_range(
                self.keys.events, group, min=start, max="+", count=max(count, 100), idle=lease_ms
            )
            if not rows:
                break
            owners = {text(r["consumer"]) for r in rows} - {consumer}
            live = await self.live_consumers(owners)
            ids = [text(r["message_id"]) for r in rows]
            scores = await self.client.zmscore(self.keys.retry(group), ids)
            for row, entry_id, score in zip(rows, ids, scores, strict=True):
                owner = text(row["consumer"])
                if score is None and owner not in live:
                    found.append(entry_id)
                    if owner != consumer:
                        dead_owner.add(entry_id)
            start = "(" + ids[-1]
            if len(found) >= count or len(rows) < max(count, 100):
                break
        if not found:
            return []
        claimed: Any = await self.client.xclaim(self.keys.events, group, consumer, lease_ms, list[Any](found[:count]))
        entries = [_entry(raw) for raw in claimed if raw and raw[1]]
        if not entries:
            return []
        # Count the takeovers: an event whose consumer keeps dying (it crashes the worker) must stop somewhere.
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hincrby(self.keys.attempts(group), f"{entry.id}:orphaned", int(entry.id in dead_owner))
            counts = await pipe.execute()
        return [entry._replace(orphaned=int(n)) for entry, n in zip(entries, counts, strict=True)]

    async def live_consumers(self, consumers: Iterable[str]) -> set[str]:
        """Those of `consumers` whose worker has a heartbeat."""
        names = sorted(consumers)
        if not names:
            return set()
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.keys.worker(name))
            alive = await pipe.execute()
        return {name for name, up in zip(names, alive, strict=True) if up}

    async def beat(self, consumer: str, fields: Mapping[str, str | int | float], ttl_s: float) -> None:
        """Write this worker's heartbeat; it expires after `ttl_s` unless written again."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.worker(consumer), mapping=dict[Any, Any](fields))
            pipe.pexpire(self.keys.worker(consumer), max(1, int(ttl_s * 1000)))
            await pipe.execute()

    async def stop_beating(self, consumer: str) -> None:
        """Remove the heartbeat of a worker that stopped (its remaining entries can be taken over at once)."""
        await self.client.delete(self.keys.worker(consumer))

    async def workers(self) -> list[dict[str, str]]:
        """The heartbeats of the live workers, oldest consumer name first."""
        keys = sorted([k async for k in self.client.scan_iter(match=self.keys.worker("*"), count=1000)])
        out = []
        for key in keys:
            fields = await self.client.hgetall(key)
            if fields:
                out.append({text(k): text(v) for k, v in fields.items()})
        return out

    async def forget_consumers(self, group: str, idle_s: float) -> int:
        """Delete the group's consumers that hold nothing and were idle for `idle_s` (workers long gone), so
        their number stays bounded. The check and the delete are one atomic step: nothing pending is lost."""
        deleted: int = await self.client.eval(_FORGET_CONSUMERS_LUA, 1, self.keys.events, group, int(idle_s * 1000))
        return deleted

    async def already_done(self, group: str, event_id: str) -> bool:
        """True when an effectively-once handler already succeeded for this event."""
        return bool(await self.client.exists(self.keys.done(group, event_id)))

    async def renew(self, group: str, consumer: str, ids: Sequence[str]) -> list[str]:
        """Reset the idle time of entries this consumer still holds, so nobody takes them over; returns the
        ids it no longer holds (taken over, or acknowledged meanwhile)."""
        if not ids:
            return []
        lost: Any = await self.client.eval(_RENEW_LUA, 1, self.keys.events, group, consumer, *ids)
        return [text(i) for i in lost]

    async def dead_letter(self, group: str, entry: Entry, error: str, attempts: int) -> None:
        """Move an entry to the group's dead-letter stream and acknowledge it, atomically."""
        entry_id = entry.id
        async with self.client.pipeline(transaction=True) as pipe:
            record = DeadLetterRecord(
                entry_id=entry_id,
                record=entry.record,
                verdict=entry.verdict,
                error=error,
                attempts=attempts,
                failed_at=time.time(),
            )
            pipe.xadd(self.keys.dlq(group), record.to_fields())  # type: ignore[arg-type]  # bytes keys are fine
            pipe.xack(self.keys.events, group, entry_id)
            pipe.zrem(self.keys.retry(group), entry_id)
            pipe.hdel(self.keys.attempts(group), entry_id, f"{entry_id}:error", f"{entry_id}:orphaned")
            await pipe.execute()

    async def trim(self, retention_s: float, now: float | None = None) -> int:
        """Delete entries older than the retention that every group has acknowledged; returns how many.

        The cut is the oldest of: the retention horizon, each group's oldest pending entry, and the entry
        after each group's last delivered one. XTRIM MINID never removes an id at or above the cut.
        """
        horizon_ms = int(((now or time.time()) - retention_s) * 1000)
        cut = (horizon_ms, 0)
        try:
            groups = await self.client.xinfo_groups(self.keys.events)
        except ResponseError:
            return 0
        for info in groups:
            name = text(info["name"])
            cut = min(cut, _next_id(text(info["last-delivered-id"])))
            pending = await self.client.xpending(self.keys.events, name)
            if pending["pending"]:
                cut = min(cut, _parse_id(text(pending["min"])))
        trimmed: int = await self.client.xtrim(self.keys.events, minid=f"{cut[0]}-{cut[1]}", approximate=False)
        return trimmed

    async def status(self, groups: Iterable[str]) -> dict[str, Any]:
        """Counts for `ftjobs status`: stream length, per group lag, pending, retrying, dead letters, and the
        live workers' heartbeats."""
        out: dict[str, Any] = {
            "events": await self.client.xlen(self.keys.events),
            "quarantine": await self.client.xlen(self.keys.quarantine),
            "handlers": {},
            "workers": await self.workers(),
        }
        try:
            info = {text(g["name"]): g for g in await self.client.xinfo_groups(self.keys.events)}
        except ResponseError:
            info = {}
        for group in groups:
            g = info.get(group)
            out["handlers"][group] = {
                "exists": g is not None,
                "lag": g.get("lag") if g else None,
                "pending": g["pending"] if g else 0,
                "retrying": await self.client.zcard(self.keys.retry(group)),
                "dead_letters": await self.client.xlen(self.keys.dlq(group)),
            }
        return out


def text(value: Any) -> str:
    """A Redis reply value as text (bytes decoded, invalid UTF-8 replaced; None as "")."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _entry(raw: Any) -> Entry:
    entry_id, fields = raw
    record, verdict = fields.get(RECORD_FIELD, b""), fields.get(VERDICT_FIELD, b"")
    return Entry(text(entry_id), record, verdict, trace=fields.get(TRACE_FIELD, b""))


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> tuple[int, int]:
    ms, seq = _parse_id(entry_id)
    return ms, seq + 1
