"""The producer side: dedupe, judge against the job's state, and append, batched across concurrent callers.

`Enqueuer.add` is what the receiver, the poller and quarantine replays call. The writes of concurrent
callers share pipelined round trips; each caller learns its own result only after Redis answered.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import redis.asyncio as redis
from redis.exceptions import NoScriptError, ResponseError

from processor.models import TERMINAL_RANK, UNRANKED, Event, status_rank
from processor.stream import Keys, text

#: A job's timeline keeps its last this many events (transitions and skipped events alike).
TIMELINE_MAX: Final = 200

# Dedupe, judge and append in one atomic step. A `webhook-id` seen before returns the entry it created and
# appends nothing. For a job event, the job's state gives the event its verdict, stored in the entry as
# `v` = "kind|previous status|repeat of":
#   stale   a non-terminal status after the job ended, a second terminal status, an earlier stage of the
#           job's life than one it reached (`models.STATUS_RANK`), or the same stage (running/paused) at an
#           earlier time by the same clock;
#   repeat  this status was already announced for the job, by event `repeat of` (each status once);
#   new     anything else: a transition, recorded in the job hash, the timeline and the index.
# A terminal status after a non-terminal one is therefore never stale, and times are compared only when they
# come from the same clock (the API's, or ours). Every event, skipped or not, gets a timeline line. Judging
# here, in arrival order, means every handler group sees the same verdict without asking Redis again.
# KEYS: dedupe key, stream, job hash, timeline, jobs index.
# ARGV: dedupe ttl, status ('' for no job state), at, clock, rank, source, job id, state ttl, event id, now,
#       then the entry's field/value pairs.
_ENQUEUE_LUA: Final = (
    """
local seen = redis.call('GET', KEYS[1])
if seen then return {0, seen} end
local fields = {unpack(ARGV, 11)}
local status, verdict = ARGV[2], ''
if status ~= '' then
  local at, clock, rank, source, event = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[9]
  local cur = redis.call('HMGET', KEYS[3], 'status', 'at', 'clock', 'rank', 'event', 's:' .. status)
  local prev, prev_at, prev_clock, top = cur[1], tonumber(cur[2] or '0'), cur[3], tonumber(cur[4] or '0')
  local announced = cur[6]
  if not announced and prev == status then announced = cur[5] end
  local kind, repeat_of = 'new', ''
  if top >= TERMINAL_RANK and rank < TERMINAL_RANK then
    kind = 'stale'
  elseif announced then
    kind, repeat_of = 'repeat', announced
  elseif top >= TERMINAL_RANK then
    kind = 'stale'
  elseif rank ~= UNRANKED and (rank < top or (rank == top and clock == prev_clock and at < prev_at)) then
    kind = 'stale'
  else
    redis.call('HSET', KEYS[3], 'status', status, 'at', ARGV[3], 'clock', clock, 'event', event,
               'source', source, 'rank', math.max(top, rank), 's:' .. status, event)
    redis.call('ZADD', KEYS[5], ARGV[10], ARGV[7])
    redis.call('EXPIRE', KEYS[3], ARGV[8])
  end
  redis.call('RPUSH', KEYS[4], cjson.encode({status = status, at = at, source = source, event = event,
             previous = prev or '', verdict = kind, repeat_of = repeat_of, received = tonumber(ARGV[10])}))
  redis.call('LTRIM', KEYS[4], -TIMELINE_MAX, -1)
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  verdict = kind .. '|' .. (prev or '') .. '|' .. repeat_of
  fields[#fields + 1] = 'v'
  fields[#fields + 1] = verdict
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return {1, id, verdict}
""".replace("TERMINAL_RANK", str(TERMINAL_RANK))
    .replace("UNRANKED", str(UNRANKED))
    .replace("TIMELINE_MAX", str(TIMELINE_MAX))
)


class Verdict(NamedTuple):
    """An event's verdict against its job's state, as `_ENQUEUE_LUA` writes it: "kind|previous|repeat of"."""

    kind: str  # new, repeat or stale
    previous: str = ""
    repeat_of: str = ""

    @classmethod
    def parse(cls, raw: bytes | str) -> Verdict | None:
        """The verdict stored in an entry, or None when it has none (no job state: not a job event)."""
        if not raw:
            return None
        kind, previous, repeat_of = (raw.decode() if isinstance(raw, bytes) else raw).split("|", 2)
        return cls(kind, previous, repeat_of)

    @property
    def skipped(self) -> str:
        """Why handlers skip the event ('' for a transition they are told about)."""
        return {"repeat": f"repeat of {self.repeat_of}", "stale": "stale"}.get(self.kind, "")


class Enqueued(NamedTuple):
    """What `Enqueuer.add` did: appended (`new`) or found the id already there, the entry, and the verdict."""

    new: bool
    entry_id: str
    #: For a job event appended now; None otherwise.
    verdict: Verdict | None = None


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
        conn: Any = await _get_connection(pool)
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


async def _get_connection(pool: redis.ConnectionPool) -> Any:
    """A connected connection from `pool`, asked the way this redis-py wants it: before 5.3 the pool
    requires a command name (which one does not matter: it is not used); from 5.3 on it takes none and
    warns when given one."""
    if _wants_command_name(type(pool)):
        return await pool.get_connection("EVALSHA")  # type: ignore[no-untyped-call,unused-ignore]
    return await pool.get_connection()  # type: ignore[no-untyped-call,unused-ignore]


@functools.cache
def _wants_command_name(pool_class: type[redis.ConnectionPool]) -> bool:
    """Whether `pool_class.get_connection` has a required `command_name` (redis-py < 5.3), looked up once
    per pool class."""
    parameter = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


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
        self._pending: list[tuple[list[Any], asyncio.Future[Enqueued]]] = []
        self._in_flight = 0
        self._flushers: set[asyncio.Task[None]] = set()

    async def add(
        self, webhook_id: str, stream: str, fields: dict[bytes, bytes], event: Event | None = None
    ) -> Enqueued:
        """Append `fields` to `stream` unless `webhook_id` was seen; returns (new?, entry id). With `event`, the
        job's state judges it first (see `_ENQUEUE_LUA`). A caller that stops waiting (a deadline) leaves its
        write in the batch: it may still be applied, and a retry with the same `webhook_id` finds it."""
        status = event.status if event is not None else None
        job_id = event.job_id if event is not None else ""
        at, clock = event.observed if event is not None else (0.0, "")
        keys = self._keys
        args: list[Any] = [
            keys.seen(webhook_id),
            stream,
            keys.job(job_id),
            keys.timeline(job_id),
            keys.jobs,
            self._ttl,
            status or "",
            at,
            clock,
            status_rank(status or ""),
            event.source if event else "",
            job_id,
            self._state_ttl,
            webhook_id,
            f"{time.time():.3f}",
        ]
        for name, value in fields.items():
            args += (name, value)
        future: asyncio.Future[Enqueued] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            flusher = asyncio.get_running_loop().create_task(self._flush())
            self._flushers.add(flusher)  # a reference, so the task is not collected mid-flight
            flusher.add_done_callback(self._flushers.discard)
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

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Enqueued]]]) -> None:
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
                verdict = Verdict.parse(reply[2]) if len(reply) > 2 else None
                future.set_result(Enqueued(reply[0] == 1, text(reply[1]), verdict))
