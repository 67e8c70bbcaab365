"""The producer side: dedupe, judge against the job's state, and append, batched across concurrent callers.

`Enqueuer.add` is what the receiver, the poller and quarantine replays call. The writes of concurrent
callers share pipelined round trips (`processor.batch`: one per node); each caller learns its own result
only after Redis answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import structlog

from processor.batch import Lua
from processor.client import Client, text
from processor.keys import Keys, PartitionKeys
from processor.models import TERMINAL_RANK, UNRANKED, Event, status_rank

log = structlog.get_logger()

#: A job's timeline keeps its last this many events (transitions and skipped events alike).
TIMELINE_MAX: Final = 200

# Dedupe, judge and append in one atomic step. A `webhook-id` seen before returns the entry it created and
# appends nothing. The dedupe marker holds that entry's id `ms-seq` as one integer, `ms` then `seq` in three
# digits (`1700000000000-7` → `1700000000000007`): Redis stores it in the value's pointer (an int-encoded
# string), 24 bytes less per event than the text on Valkey 8, 32 on Redis 7.0. A marker written as text (by
# an earlier release, or for a `seq` beyond 999) is returned as it is. For a job event, the job's state gives
# the event its verdict, stored in the entry as `v` = "kind|previous status|repeat of":
#   stale   a non-terminal status after the job ended, a second terminal status, an earlier stage of the
#           job's life than one it reached (`models.STATUS_RANK`), or the same stage (running/paused) at an
#           earlier time by the same clock;
#   repeat  this status was already announced for the job, by event `repeat of` (each status once);
#   new     anything else: a transition, recorded in the job hash, the timeline and the index.
# A terminal status after a non-terminal one is therefore never stale, and times are compared only when they
# come from the same clock (the API's, or ours). Every event, skipped or not, gets a timeline line. Judging
# here, in arrival order, means every handler group sees the same verdict without asking Redis again.
# A stream that does not exist (the server came back empty: FLUSHALL, a restart without persistence, a replica
# promoted) gets the handlers' consumer groups before its first entry, in the same step: a group made later
# would start after the entries appended meanwhile, and they would never be delivered.
# KEYS: dedupe key, stream, job hash, timeline, jobs index.
# ARGV: dedupe ttl, status ('' for no job state), at, clock, rank, source, job id, state ttl, event id, now,
#       the number of groups, the groups, then the entry's field/value pairs.
_ENQUEUE_LUA: Final = (
    """
local seen = redis.call('GET', KEYS[1])
if seen then
  if not string.find(seen, '-', 1, true) then
    seen = string.sub(seen, 1, -4) .. '-' .. tonumber(string.sub(seen, -3))
  end
  return {0, seen}
end
local ngroups = tonumber(ARGV[11])
local fields = {unpack(ARGV, 12 + ngroups)}
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
if ngroups > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  for i = 12, 11 + ngroups do redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[i], '$', 'MKSTREAM') end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
local ms, seq = string.match(id, '^(%d+)%-(%d%d?%d?)$')
redis.call('SET', KEYS[1], ms and (ms .. string.rep('0', 3 - #seq) .. seq) or id, 'EX', ARGV[1])
return {1, id, verdict}
""".replace("TERMINAL_RANK", str(TERMINAL_RANK))
    .replace("UNRANKED", str(UNRANKED))
    .replace("TIMELINE_MAX", str(TIMELINE_MAX))
)


def marker_entry_id(marker: bytes | str | None) -> str:
    """The entry id a dedupe marker names ('' for none): `1700000000000007` → `1700000000000-7`, as the
    enqueue script reads it; a marker written as text is the id itself."""
    if not marker:
        return ""
    value = marker.decode() if isinstance(marker, bytes) else marker
    if "-" in value or len(value) < 4:
        return value
    return f"{value[:-3]}-{int(value[-3:])}"


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


class Enqueuer:
    """Dedupe + XADD, with the writes of concurrent requests batched into one pipelined round trip.

    Requests that arrive while a batch is in flight wait for the next one, so under load each round trip
    carries many writes, and at low load a lone request goes out at once. Each caller learns its own result
    (or the connection error) only after Redis answered.
    """

    def __init__(
        self,
        client: Client,
        keys: Keys,
        *,
        ttl_s: int,
        state_ttl_s: int = 7 * 24 * 3600,
        max_batch: int = 256,
        max_in_flight: int = 2,
        wait: Sequence[Any] = (),
        groups: Sequence[str] = (),
    ) -> None:
        """`wait`: the command that confirms each batch's writes before anyone is answered (`wait_command`).
        `groups`: the handlers' consumer groups, made with an events stream that does not exist yet."""
        self._client = client
        self._keys = keys
        self._ttl = ttl_s
        self._state_ttl = state_ttl_s
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._wait = tuple(wait)
        self._groups = list(groups)
        self._script = Lua(_ENQUEUE_LUA)
        self._pending: list[tuple[list[Any], asyncio.Future[Enqueued]]] = []
        self._in_flight = 0
        self._flushers: set[asyncio.Task[None]] = set()

    async def add(
        self, webhook_id: str, fields: dict[bytes, bytes], event: Event | None = None, *, judge: bool = True
    ) -> Enqueued:
        """Append `fields` unless `webhook_id` was seen; returns (new?, entry id, verdict). With `event`, the
        entry goes to the partition of its job, judged against the job's state first (see `_ENQUEUE_LUA`;
        `judge=False`: not judged, for a replay whose fields carry the verdict it had); without one, to the
        quarantine. A caller that stops waiting (a deadline) leaves its write in the batch: it may still be
        applied, and a retry with the same `webhook_id` finds it."""
        part: PartitionKeys
        status: str | None = ""
        job_id, at, clock = "", 0.0, ""
        if event is None:
            part, stream = self._keys.quarantine_part, self._keys.quarantine
        else:
            job_id = event.job_id or ""
            part = self._keys.part(job_id)
            stream = part.events
            status = event.status if judge else ""
            at, clock = event.observed
        args: list[Any] = [
            part.seen(webhook_id),
            stream,
            part.job(job_id),
            part.timeline(job_id),
            part.jobs,
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
        groups = self._groups if event is not None else []  # the quarantine has no consumer groups
        args += (len(groups), *groups)
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
            replies = await self._script.run(self._client, [(args[:5], args[5:]) for args, _ in batch], self._wait)
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
