"""Redis streams: the consumer side of the events stream, its partitions, dead letters and heartbeats.

The keys are named in `processor.keys`; the client and scripts are `processor.client`.

Atomic steps are Lua scripts on keys of one slot (a cluster has no MULTI across slots; redis-py's cluster
client has none at all), so the same commands run on one server and on a cluster.

An entry is acknowledged in a group only once its handler succeeded, skipped it, or dead-lettered it, so
an entry that a crashed consumer held is still pending, and the partition's next owner takes it over. Only a
consumer without a heartbeat counts as crashed: a live worker's entries are never taken from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from redis.exceptions import ResponseError

from processor.client import Client, Script, text
from processor.keys import Keys
from processor.records import DeadLetterRecord


class Entry(NamedTuple):
    """A stream entry as the worker sees it."""

    id: str
    #: The `Event` record (`eventrecord.encode_event`).
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
#: The consumer that holds what a worker let go of when it handed a partition over (`Streams.release`): it
#: has no heartbeat, so the partition's next consumer takes those entries over (not counted as a crash).
RELEASED: Final = "released"


#: Renew only what this consumer still holds: an XCLAIM of an entry another consumer now holds would steal it.
_RENEW = Script("""
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
""")

_FORGET_CONSUMERS = Script("""
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
""")

#: Acknowledge, forget the attempt counters, set the done-markers: one step. KEYS: stream, attempts hash,
#: then the done-markers. ARGV: group, done ttl, number of ids, the ids, the ids whose counters to forget.
_ACK = Script("""
for i = 3, #KEYS do redis.call('SET', KEYS[i], 1, 'EX', ARGV[2]) end
local n = tonumber(ARGV[3])
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4, 3 + n))
for i = 4 + n, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i], ARGV[i] .. ':error', ARGV[i] .. ':orphaned')
end
return acked
""")

#: KEYS: attempts hash, retry set. ARGV: entry id, attempts, error, due.
_SCHEDULE_RETRY = Script("""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. ':error', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
""")

#: A dead letter, written once: KEYS: the handler's dead-letter stream, the marker of this entry. ARGV: the
#: marker's ttl, then the record's fields. A second call for the same entry (a crash between this step and
#: the ack) adds nothing.
_DEAD_LETTER = Script("""
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return 1
""")

#: Finish a dead-lettered entry in its partition: KEYS: stream, retry set, attempts hash. ARGV: group, id.
_FORGET_ENTRY = Script("""
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2], ARGV[2] .. ':error', ARGV[2] .. ':orphaned')
return 1
""")

#: A heartbeat: the fields and the expiry in one step (a hash left without its expiry would look alive forever).
#: KEYS: the worker's hash, the registry. ARGV: ttl ms, consumer, then the fields.
_BEAT = Script("""
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[1]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
return 1
""")
#: KEYS: the worker's hash, the registry. ARGV: consumer.
_UNBEAT = Script("""
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
""")


class Streams:
    """The consumer side: groups, reads, acks, retries, claims, dead letters, trimming and counts.

    A `Streams` works on one partition (`at(n)`, what a runner uses) or, built without one, on all of them
    (groups, trimming and counts); the heartbeats are not partitioned.
    """

    def __init__(self, client: Client, keys: Keys, partition: int | None = None) -> None:
        self.client = client
        self.keys = keys
        self.partition = partition
        self.parts = keys.parts if partition is None else [keys.parts[partition]]
        #: This partition's keys (the first one's for an unbound `Streams`: one partition is the common case).
        self.part = self.parts[0]
        self._ensured: set[tuple[str, str]] = set()
        self._bound: dict[int, Streams] = {}

    def at(self, partition: int) -> Streams:
        """The same streams, on one partition (built once per partition)."""
        if partition not in self._bound:
            self._bound[partition] = Streams(self.client, self.keys, partition)
        return self._bound[partition]

    async def ensure_groups(self, groups: Iterable[str]) -> None:
        """Create each handler's group (at the stream's end) on each partition if missing, and the stream
        with it. A group starts at `$`, so a handler added later does not replay the retained history; the
        receiver therefore makes sure the groups exist before it enqueues anything (cheap once done)."""
        for group in groups:
            for part in self.parts:
                if (group, part.events) in self._ensured:
                    continue
                try:
                    await self.client.xgroup_create(part.events, group, id="$", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._ensured.add((group, part.events))

    def forget_groups(self, groups: Iterable[str]) -> None:
        """Forget that `groups` exist on these partitions (Redis answered NOGROUP, or readiness found them
        missing: the server came back empty, or they were removed), so the next `ensure_groups` makes them
        again."""
        gone = set(groups)
        self._ensured = {(g, events) for g, events in self._ensured if g not in gone}

    async def probe_writes(self) -> None:
        """Write a key that expires at once on every partition: raises the server's refusal (out of memory,
        READONLY, too few replicas, a disk error) when the receiver's enqueues would be refused too."""
        await asyncio.gather(*(self.client.set(part.ready, b"1", px=1000) for part in self.parts))

    async def missing_groups(self, groups: Iterable[str]) -> list[str]:
        """The groups among `groups` missing on some partition (readiness)."""
        wanted, missing = list(groups), set[str]()
        for part in self.parts:
            try:
                existing = {text(g["name"]) for g in await self.client.xinfo_groups(part.events)}
            except ResponseError:  # no stream yet
                existing = set()
            missing.update(g for g in wanted if g not in existing)
        return [g for g in wanted if g in missing]

    async def read_new(self, group: str, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to `group` yet (XREADGROUP `>`), blocking up to `block_ms`."""
        reply: Any = await self.client.xreadgroup(group, consumer, {self.part.events: ">"}, count=count, block=block_ms)
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
        part = self.part
        if not forget and not done:
            await self.client.xack(part.events, group, *ids)
            return
        keys = [part.events, part.attempts(group), *(part.done(group, e) for e in done)]
        await _ACK(self.client, keys, [group, max(1, done_ttl_s), len(ids), *ids, *forget])

    async def attempts(self, group: str, ids: Sequence[str]) -> list[int]:
        """Failed attempts so far for each of `ids`."""
        if not ids:
            return []
        values = await self.client.hmget(self.part.attempts(group), list(ids))
        return [int(v) if v else 0 for v in values]

    async def schedule_retry(self, group: str, entry_id: str, attempts: int, due: float, error: str) -> None:
        """Record failed attempts so far and when to try again; the entry stays pending in the group."""
        keys = [self.part.attempts(group), self.part.retry(group)]
        await _SCHEDULE_RETRY(self.client, keys, [entry_id, attempts, error, due])

    async def take_due(self, group: str, consumer: str, count: int, now: float | None = None) -> list[Entry]:
        """Claim up to `count` entries whose retry is due. ZREM decides which consumer gets each one."""
        key = self.part.retry(group)
        due: Any = await self.client.zrangebyscore(key, "-inf", now or time.time(), start=0, num=count)
        taken = []
        for raw_id in due:
            if await self.client.zrem(key, raw_id):
                taken.append(text(raw_id))
        return await self._claim(group, consumer, taken)

    async def next_due(self, group: str) -> float | None:
        """When the group's earliest scheduled retry is due (epoch seconds), or None when none is."""
        first: Any = await self.client.zrange(self.part.retry(group), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def _claim(self, group: str, consumer: str, ids: list[str]) -> list[Entry]:
        if not ids:
            return []
        claimed: Any = await self.client.xclaim(self.part.events, group, consumer, 0, list[Any](ids))
        entries = [_entry(raw) for raw in claimed if raw and raw[1]]
        gone = set(ids) - {entry.id for entry in entries}
        if gone:  # trimmed away while pending (only possible if retention was cut by hand)
            await self.ack(group, sorted(gone))
        return entries

    async def reclaim(self, group: str, consumer: str, count: int) -> tuple[list[Entry], bool]:
        """Take over, up to `count`, the partition's pending entries that nobody works on: those of consumers
        without a heartbeat (dead), those a worker handed over (`RELEASED`), and this consumer's own that it
        let go of (a batch cut short by a Redis error); never those waiting for a retry. Returns them, and
        whether a live consumer still holds entries here (the partition's previous owner finishing its batch):
        then no new entry may be read yet, or a job's newer event could overtake one it holds.

        Only the caller, holding the partition's lease, consumes the partition, so what it takes is idle
        whatever the idle time says. A live consumer renews its entries and keeps its heartbeat: its entries
        are never taken. Only takeovers from a dead consumer count toward `max_takeovers`.
        """
        events = self.part.events
        summary: Any = await self.client.xpending(events, group)
        owners = {text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or ()}
        others = {name for name, n in owners.items() if n} - {consumer, RELEASED}
        live = await self.live_consumers(others)
        found: list[str] = []
        dead_owner: set[str] = set()
        busy = False
        for owner in sorted(others | ({consumer, RELEASED} & set(owners))):
            rows: Any = await self.client.xpending_range(events, group, "-", "+", 10_000, consumername=owner)
            ids = [text(r["message_id"]) for r in rows]
            scores = await self.client.zmscore(self.part.retry(group), ids) if ids else []
            waiting = [i for i, score in zip(ids, scores, strict=True) if score is None]
            if owner in live:
                busy = busy or bool(waiting)
                continue
            found += waiting
            if owner not in (consumer, RELEASED):
                dead_owner.update(waiting)
        if not found:
            return [], busy
        found.sort(key=_parse_id)  # oldest first: a job's events in the order they came
        claimed: Any = await self.client.xclaim(events, group, consumer, 0, list[Any](found[:count]))
        entries = [_entry(raw) for raw in claimed if raw and raw[1]]
        if not entries:
            return [], busy or len(found) > count
        # Count the takeovers: an event whose consumer keeps dying (it crashes the worker) must stop somewhere.
        async with self.client.pipeline() as pipe:
            for entry in entries:
                pipe.hincrby(self.part.attempts(group), f"{entry.id}:orphaned", int(entry.id in dead_owner))
            counts = await pipe.execute()
        taken = [entry._replace(orphaned=int(n)) for entry, n in zip(entries, counts, strict=True)]
        return taken, busy or len(found) > count

    async def release(self, group: str, consumer: str, lease_s: float) -> int:
        """Hand over what `consumer` still holds in this partition (it stops consuming it): the entries go to
        the `RELEASED` consumer, idle for a lease already, so the partition's next consumer takes them over at
        once. Returns how many."""
        rows: Any = await self.client.xpending_range(self.part.events, group, "-", "+", 10_000, consumername=consumer)
        ids = [text(r["message_id"]) for r in rows]
        if ids:
            await self.client.xclaim(
                self.part.events, group, RELEASED, 0, list[Any](ids), idle=int(lease_s * 1000), justid=True
            )
        return len(ids)

    async def live_consumers(self, consumers: Iterable[str]) -> set[str]:
        """Those of `consumers` whose worker has a heartbeat."""
        names = sorted(consumers)
        if not names:
            return set()
        async with self.client.pipeline() as pipe:
            for name in names:
                pipe.exists(self.keys.worker(name))
            alive = await pipe.execute()
        return {name for name, up in zip(names, alive, strict=True) if up}

    async def beat(self, consumer: str, fields: Mapping[str, str | int | float], ttl_s: float) -> None:
        """Write this worker's heartbeat; it expires after `ttl_s` unless written again."""
        pairs = [x for item in fields.items() for x in item]
        keys = [self.keys.worker(consumer), self.keys.workers]
        await _BEAT(self.client, keys, [max(1, int(ttl_s * 1000)), consumer, *pairs])

    async def stop_beating(self, consumer: str) -> None:
        """Remove the heartbeat of a worker that stopped (its remaining entries can be taken over at once)."""
        await _UNBEAT(self.client, [self.keys.worker(consumer), self.keys.workers], [consumer])

    async def workers(self) -> list[dict[str, str]]:
        """The heartbeats of the live workers, oldest consumer name first."""
        names: Any = await self.client.zrange(self.keys.workers, 0, -1)
        out = []
        for name in sorted(text(n) for n in names):
            fields = await self.client.hgetall(self.keys.worker(name))
            if fields:
                out.append({text(k): text(v) for k, v in fields.items()})
        return out

    async def forget_consumers(self, group: str, idle_s: float) -> int:
        """Delete the group's consumers that hold nothing and were idle for `idle_s` (workers long gone), so
        their number stays bounded. The check and the delete are one atomic step: nothing pending is lost."""
        deleted = 0
        for part in self.parts:
            try:
                deleted += int(await _FORGET_CONSUMERS(self.client, [part.events], [group, int(idle_s * 1000)]))
            except ResponseError as exc:  # the partition has no stream or group yet
                if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                    raise
        return deleted

    async def already_done(self, group: str, event_id: str) -> bool:
        """True when an effectively-once handler already succeeded for this event."""
        return bool(await self.client.exists(self.part.done(group, event_id)))

    async def renew(self, group: str, consumer: str, ids: Sequence[str]) -> list[str]:
        """Reset the idle time of entries this consumer still holds, so nobody takes them over; returns the
        ids it no longer holds (taken over, or acknowledged meanwhile)."""
        if not ids:
            return []
        lost: Any = await _RENEW(self.client, [self.part.events], [group, consumer, *ids])
        return [text(i) for i in lost]

    async def dead_letter(self, group: str, entry: Entry, error: str, attempts: int, *, retention_s: int = 0) -> None:
        """Move an entry to the group's dead-letter stream, then acknowledge it. The two keys live in different
        slots; the dead letter is written once (a marker), so a crash between the steps cannot write it twice.
        `retention_s`: how long the entry may be kept (`redis.retention_s`); the marker lives at least as long."""
        entry_id, partition = entry.id, self.partition or 0
        record = DeadLetterRecord(
            entry_id=entry_id,
            record=entry.record,
            verdict=entry.verdict,
            error=error,
            attempts=attempts,
            failed_at=time.time(),
            partition=partition,
        )
        fields = [x for item in record.to_fields().items() for x in item]
        marker = self.keys.dlq_marker(group, partition, entry_id)
        await _DEAD_LETTER(self.client, [self.keys.dlq(group), marker], [dead_letter_mark_s(retention_s), *fields])
        part = self.part
        await _FORGET_ENTRY(self.client, [part.events, part.retry(group), part.attempts(group)], [group, entry_id])

    async def trim(self, retention_s: float, now: float | None = None) -> int:
        """Delete entries older than the retention that every group has acknowledged; returns how many.

        The cut is the oldest of: the retention horizon, each group's oldest pending entry, and the entry
        after each group's last delivered one. XTRIM MINID never removes an id at or above the cut.
        """
        horizon_ms = int(((now or time.time()) - retention_s) * 1000)
        trimmed = 0
        for part in self.parts:
            cut = (horizon_ms, 0)
            try:
                groups = await self.client.xinfo_groups(part.events)
            except ResponseError:
                continue
            for info in groups:
                name = text(info["name"])
                cut = min(cut, _next_id(text(info["last-delivered-id"])))
                pending = await self.client.xpending(part.events, name)
                if pending["pending"]:
                    cut = min(cut, _parse_id(text(pending["min"])))
            trimmed += int(await self.client.xtrim(part.events, minid=f"{cut[0]}-{cut[1]}", approximate=False))
        return trimmed

    async def status(self, groups: Iterable[str]) -> dict[str, Any]:
        """Counts for `ftjobs status`, summed over the partitions: stream length, per group lag, pending,
        retrying, dead letters; the number of partitions, and the live workers' heartbeats."""
        names = list(groups)
        handlers: dict[str, dict[str, Any]] = {
            g: {"exists": True, "lag": 0, "pending": 0, "retrying": 0} for g in names
        }
        events = 0
        for part in self.parts:
            events += await self.client.xlen(part.events)
            try:
                info = {text(g["name"]): g for g in await self.client.xinfo_groups(part.events)}
            except ResponseError:
                info = {}
            for group in names:
                row, g = handlers[group], info.get(group)
                row["exists"] = row["exists"] and g is not None
                lag = g.get("lag") if g else None
                row["lag"] = None if row["lag"] is None or (g is not None and lag is None) else row["lag"] + (lag or 0)
                row["pending"] += g["pending"] if g else 0
                row["retrying"] += await self.client.zcard(part.retry(group))
        for group in names:
            handlers[group]["dead_letters"] = await self.client.xlen(self.keys.dlq(group))
            if not handlers[group]["exists"]:
                handlers[group]["lag"] = None
        return {
            "events": events,
            "quarantine": await self.client.xlen(self.keys.quarantine),
            "partitions": len(self.parts),
            "handlers": handlers,
            "workers": await self.workers(),
        }


#: A dead letter's marker outlives any takeover of its entry (it guards against writing it twice).
_DEAD_LETTER_MARK_S: Final = 7 * 24 * 3600


def dead_letter_mark_s(retention_s: int) -> int:
    """How long a dead letter's marker lives: past any takeover of its entry, and as long as the entry may be
    kept, since the dashboard learns from it that the entry was dead-lettered, and where its replay went."""
    return max(_DEAD_LETTER_MARK_S, retention_s)


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
