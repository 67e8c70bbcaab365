"""Redis streams: every key ftjobs uses, and every command it sends, in one place.

Keys (all under `settings.redis.prefix`, default `ftjobs`):

    {p}:events              the events stream; one consumer group per handler (each its own progress)
    {p}:seen:{webhook-id}   dedupe marker → the entry id, expires after the dedupe window
    {p}:quarantine          signed bodies that did not match the schema, kept for replay
    {p}:retry:{handler}     sorted set: entry id → when the next attempt is due (entry stays pending)
    {p}:attempts:{handler}  hash: entry id → failed attempts so far, `{id}:error` → the last error
    {p}:dlq:{handler}       dead letters: the record, the error and the attempt count
    {p}:done:{handler}:{id} marks an event done for an effectively-once handler (expires with retention)
    {p}:h:{handler}:...     the handler's own state (e.g. Slack thread timestamps)
    {p}:job:{id}, {p}:timeline:{id}, {p}:jobs   job state, written at enqueue (see `_ENQUEUE_LUA`)

An entry is acknowledged in a group only once its handler succeeded, skipped it, or dead-lettered it, so
an entry that a crashed consumer held is still pending and is taken over (XAUTOCLAIM) after the lease.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from processor.models import Event


class Entry(NamedTuple):
    """A stream entry as the worker sees it."""

    id: str
    #: The msgpack `Event`.
    record: bytes
    #: The job-state verdict given at enqueue ("kind|previous|repeat of"; empty when none).
    verdict: bytes = b""


RECORD_FIELD: Final = b"e"
VERDICT_FIELD: Final = b"v"

# Dedupe, judge and append in one atomic step. A `webhook-id` seen before returns the entry it created and
# appends nothing. For a job event, the job's state gives the event its verdict, stored in the entry as
# `v` = "kind|previous status|repeat of": `new` (a transition: recorded in the job hash, the timeline and the
# index), `repeat` (this status was already announced, by event `repeat of`) or `stale` (older than what we
# know, or after a terminal status). Judging here, in arrival order, means every handler group sees the
# same verdict without asking Redis again.
# KEYS: dedupe key, stream, job hash, timeline, jobs index.
# ARGV: dedupe ttl, status ('' for no job state), at, source, job id, state ttl, event id, field/value pairs.
_ENQUEUE_LUA: Final = """
local seen = redis.call('GET', KEYS[1])
if seen then return {0, seen} end
local fields = {unpack(ARGV, 8)}
local status = ARGV[2]
if status ~= '' then
  local cur = redis.call('HMGET', KEYS[3], 'status', 'at', 'event')
  local prev, prev_at, prev_event = cur[1], tonumber(cur[2] or '0'), cur[3]
  local kind, repeat_of = 'new', ''
  if prev == status then
    kind, repeat_of = 'repeat', prev_event
  elseif prev and (prev == 'succeeded' or prev == 'failed' or prev == 'cancelled' or tonumber(ARGV[3]) < prev_at) then
    kind = 'stale'
  else
    redis.call('HSET', KEYS[3], 'status', status, 'at', ARGV[3], 'event', ARGV[7], 'source', ARGV[4])
    redis.call('RPUSH', KEYS[4], cjson.encode({status = status, at = tonumber(ARGV[3]), source = ARGV[4],
               event = ARGV[7], previous = prev or ''}))
    redis.call('ZADD', KEYS[5], ARGV[3], ARGV[5])
    redis.call('EXPIRE', KEYS[3], ARGV[6])
    redis.call('EXPIRE', KEYS[4], ARGV[6])
  end
  fields[#fields + 1] = 'v'
  fields[#fields + 1] = kind .. '|' .. (prev or '') .. '|' .. repeat_of
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return {1, id}
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


class Lua:
    """A Lua script sent by EVALSHA in pipelines, and loaded again when the server lost it (NOSCRIPT, e.g.
    after a restart). redis-py's `Script` asks SCRIPT EXISTS before every pipeline: a round trip we save."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, client: redis.Redis, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """One pipelined round trip for `calls` of (keys, args); per-call errors come back as exceptions."""
        replies = await self._pipeline(client, calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await client.script_load(self.source)
            for i, reply in zip(missing, await self._pipeline(client, [calls[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, client: redis.Redis, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        # The commands are packed here, in one pass, and written on one pooled connection: redis-py's
        # pipeline packs each argument through several layers, which costs more than the Lua call itself.
        packed = b"".join(_pack(b"EVALSHA", self.sha, len(keys), *keys, *args) for keys, args in calls)
        pool = client.connection_pool
        conn: Any = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        try:
            await conn.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # one call's error (e.g. NOSCRIPT); the others still answer
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()  # a half-read connection must not go back to the pool
            raise
        finally:
            await pool.release(conn)


def _pack(*args: Any) -> bytes:
    """One command in RESP: `*N` then each argument as a bulk string."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


class Enqueuer:
    """Dedupe + XADD, with the writes of concurrent requests batched into one pipelined round trip.

    Requests that arrive while a batch is in flight wait for the next one, so under load each round trip
    carries many writes, and at low load a lone request goes out at once. Each caller learns its own result
    (or the connection error) only after Redis answered.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        ttl_s: int,
        state_ttl_s: int = 7 * 24 * 3600,
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_s
        self._state_ttl = state_ttl_s
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._script = Lua(_ENQUEUE_LUA)
        self._pending: list[tuple[list[Any], asyncio.Future[tuple[bool, str]]]] = []
        self._in_flight = 0

    async def add(
        self, webhook_id: str, stream: str, fields: dict[bytes, bytes], event: Event | None = None
    ) -> tuple[bool, str]:
        """Append `fields` to `stream` unless `webhook_id` was seen; returns (new?, entry id). With `event`, the
        job's state judges it first (see `_ENQUEUE_LUA`)."""
        status = event.status if event is not None else None
        job_id = event.job_id if event is not None else ""
        p = self._keys.prefix
        args: list[Any] = [
            self._keys.seen(webhook_id),
            stream,
            f"{p}:job:{job_id}",
            f"{p}:timeline:{job_id}",
            f"{p}:jobs",
            self._ttl,
            status or "",
            event.observed_at if event else 0,
            event.source if event else "",
            job_id,
            self._state_ttl,
            webhook_id,
        ]
        for name, value in fields.items():
            args += (name, value)
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        """Send what is waiting, batch after batch; while this batch is out, the next one fills up. A second
        flusher overlaps its round trip with the first (Redis still applies every write in order)."""
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                await self._send(batch)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[tuple[bool, str]]]]) -> None:
        try:
            replies = await self._script.run(self._client, [(args[:5], args[5:]) for args, _ in batch])
        except Exception as exc:  # connection refused, timeout, ...: every caller gets a 503
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the request was cancelled (client went away)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result((reply[0] == 1, _text(reply[1])))


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
            existing = {_text(g["name"]) for g in await self.client.xinfo_groups(self.keys.events)}
        except ResponseError:  # no stream yet
            existing = set()
        return [g for g in groups if g not in existing]

    async def read_new(self, group: str, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to `group` yet (XREADGROUP `>`), blocking up to `block_ms`."""
        reply: Any = await self.client.xreadgroup(group, consumer, {self.keys.events: ">"}, count=count, block=block_ms)
        return [_entry(raw) for _, entries in reply or () for raw in entries if raw[1]]

    async def ack(self, group: str, ids: Sequence[str], retried: Sequence[str] | None = None) -> None:
        """Mark `ids` done for `group`, and forget the attempt counters of those that had failed before
        (`retried`; None: any of them may have)."""
        if not ids:
            return
        forget = ids if retried is None else retried
        if not forget:
            await self.client.xack(self.keys.events, group, *ids)
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.events, group, *ids)
            pipe.hdel(self.keys.attempts(group), *forget, *(f"{i}:error" for i in forget))
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
                taken.append(_text(raw_id))
        return await self._claim(group, consumer, taken)

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
        """Take over entries idle longer than the lease (their consumer died), except those waiting for a retry."""
        cursor, found = "0-0", list[Entry]()
        while len(found) < count:
            reply = await self.client.xautoclaim(
                self.keys.events, group, consumer, int(lease_s * 1000), cursor, count=count
            )
            entries = [_entry(raw) for raw in reply[1] if raw and raw[1]]
            if entries:
                scores = await self.client.zmscore(self.keys.retry(group), [e[0] for e in entries])
                found += [entry for entry, score in zip(entries, scores, strict=True) if score is None]
            cursor = _text(reply[0])
            if cursor == "0-0":
                break
        return found

    async def already_done(self, group: str, event_id: str) -> bool:
        """True when an effectively-once handler already succeeded for this event."""
        return bool(await self.client.exists(self.keys.done(group, event_id)))

    async def mark_done(self, group: str, event_id: str, ttl_s: int) -> None:
        await self.client.set(self.keys.done(group, event_id), 1, ex=ttl_s)

    async def renew(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        """Reset the idle time of entries still being handled, so nobody reclaims them mid-run."""
        if ids:
            await self.client.xclaim(self.keys.events, group, consumer, 0, list[Any](ids), justid=True)

    async def dead_letter(self, group: str, entry: Entry, error: str, attempts: int) -> None:
        """Move an entry to the group's dead-letter stream and acknowledge it, atomically."""
        entry_id = entry.id
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dlq(group),
                {
                    b"entry_id": entry_id,
                    RECORD_FIELD: entry.record,
                    VERDICT_FIELD: entry.verdict,
                    b"error": error,
                    b"attempts": attempts,
                    b"failed_at": f"{time.time():.3f}",
                },
            )
            pipe.xack(self.keys.events, group, entry_id)
            pipe.zrem(self.keys.retry(group), entry_id)
            pipe.hdel(self.keys.attempts(group), entry_id, f"{entry_id}:error")
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
            name = _text(info["name"])
            cut = min(cut, _next_id(_text(info["last-delivered-id"])))
            pending = await self.client.xpending(self.keys.events, name)
            if pending["pending"]:
                cut = min(cut, _parse_id(_text(pending["min"])))
        trimmed: int = await self.client.xtrim(self.keys.events, minid=f"{cut[0]}-{cut[1]}", approximate=False)
        return trimmed

    async def status(self, groups: Iterable[str]) -> dict[str, Any]:
        """Counts for `ftjobs status`: stream length, and per group lag, pending, retrying, dead letters."""
        out: dict[str, Any] = {
            "events": await self.client.xlen(self.keys.events),
            "quarantine": await self.client.xlen(self.keys.quarantine),
            "handlers": {},
        }
        try:
            info = {_text(g["name"]): g for g in await self.client.xinfo_groups(self.keys.events)}
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(raw: Any) -> Entry:
    entry_id, fields = raw
    return Entry(_text(entry_id), fields.get(RECORD_FIELD, b""), fields.get(VERDICT_FIELD, b""))


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> tuple[int, int]:
    ms, seq = _parse_id(entry_id)
    return ms, seq + 1
