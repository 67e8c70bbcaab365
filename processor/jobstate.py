"""What we know about each job: its latest status, the timeline of transitions, and each event's verdict.

Before routing, every event is *prepared*, with the same outcome for every handler group and worker process:
a thin webhook is hydrated with the job from the API (fetched once per event: the job is cached in Redis and
a lock makes one worker fetch it), then the event is applied to the job's state, which gives it
`previous_status` and marks it `stale` (older than what we know) or a `repeat_of` the event that already
announced that status (the poller and a webhook both saw `succeeded`). The verdict is kept per event.

Keys: `{p}:job:{id}` (hash: status, at, event, source), `{p}:timeline:{id}` (list of JSON transitions),
`{p}:jobs` (sorted set: job id by last change), `{p}:verdict:{event}` (hash), `{p}:hydrated:{event}` (msgpack
job, or `!reason` when the job does not exist) and its `:lock`. All expire with the stream's retention.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

import msgspec
import redis.asyncio as redis

from processor.errors import HandlerError, PermanentFailure, RetryLater
from processor.models import Event, FineTuningJob
from processor.openai import JobNotFound, OpenAIClient, OpenAIError
from processor.stream import Keys, Lua

# Apply one event to its job's state, atomically, once: the verdict is kept per event, so every handler
# group gets the same answer however many other events of the job came in between.
# KEYS: job hash, timeline, jobs index, verdict. ARGV: event id, status, at, source, job id, ttl.
_APPLY_LUA: Final = """
local kept = redis.call('HMGET', KEYS[4], 'kind', 'previous', 'repeat_of')
if kept[1] then return kept end
local cur = redis.call('HMGET', KEYS[1], 'status', 'at', 'event')
local prev, prev_at, prev_event = cur[1], tonumber(cur[2] or '0'), cur[3]
local verdict
if prev == ARGV[2] then
  verdict = {'repeat', prev, prev_event}
elseif prev and (prev == 'succeeded' or prev == 'failed' or prev == 'cancelled' or tonumber(ARGV[3]) < prev_at) then
  verdict = {'stale', prev, ''}
else
  verdict = {'new', prev or '', ''}
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'at', ARGV[3], 'event', ARGV[1], 'source', ARGV[4])
  redis.call('RPUSH', KEYS[2], cjson.encode({status = ARGV[2], at = tonumber(ARGV[3]), source = ARGV[4],
             event = ARGV[1], previous = prev or ''}))
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('HSET', KEYS[4], 'kind', verdict[1], 'previous', verdict[2], 'repeat_of', verdict[3])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return verdict
"""
_NOT_FOUND: Final = b"!"
_job_encoder: Final = msgspec.msgpack.Encoder()
_job_decoder: Final = msgspec.msgpack.Decoder(FineTuningJob)
_LOCK_MS: Final = 30_000
_WAIT_S: Final = 10.0


class Transition(msgspec.Struct):
    status: str
    at: float
    source: str
    event: str
    previous: str = ""


class JobState:
    """Reads and writes the per-job state (the pure part of the verdict is in `_APPLY_LUA`)."""

    def __init__(self, client: redis.Redis, keys: Keys, retention_s: int) -> None:
        self.client = client
        self.keys = keys
        self.retention_s = retention_s
        self._apply = Lua(_APPLY_LUA)

    def _job_keys(self, job_id: str) -> list[str]:
        p = self.keys.prefix
        return [f"{p}:job:{job_id}", f"{p}:timeline:{job_id}", f"{p}:jobs"]

    def hydrated_key(self, event_id: str) -> str:
        return f"{self.keys.prefix}:hydrated:{event_id}"

    async def apply(self, event: Event) -> Event:
        """The event with `previous_status`, `stale` and `repeat_of` filled in from the job's state."""
        [applied] = await self.apply_many([event])
        return applied

    async def apply_many(self, events: list[Event]) -> list[Event]:
        """`apply` for several events in one pipelined round trip (in order: a job's events stay ordered)."""
        tracked = [e for e in events if e.status is not None]  # e.g. batch.completed: nothing to track
        if not tracked:
            return events
        calls = [
            (
                [*self._job_keys(e.job_id), f"{self.keys.prefix}:verdict:{e.id}"],
                [e.id, e.status or "", e.observed_at, e.source, e.job_id, self.retention_s],
            )
            for e in tracked
        ]
        answers = await self._apply.run(self.client, calls)
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        replies = iter(answers)
        return [self._verdict(event, next(replies)) if event.status is not None else event for event in events]

    @staticmethod
    def _verdict(event: Event, reply: Any) -> Event:
        kind, previous = _text(reply[0]), _text(reply[1]) or None
        if kind == "repeat":
            return msgspec.structs.replace(event, previous_status=previous, repeat_of=_text(reply[2]))
        return msgspec.structs.replace(event, previous_status=previous, stale=kind == "stale")

    async def timeline(self, job_id: str) -> list[Transition]:
        raw = await self.client.lrange(self._job_keys(job_id)[1], 0, -1)
        return [msgspec.convert(json.loads(item), Transition) for item in raw]

    async def recent(self, limit: int = 20) -> list[tuple[str, str, float]]:
        """(job id, latest status, when) for the most recently changed jobs."""
        ids: Any = await self.client.zrevrange(self._job_keys("")[2], 0, limit - 1, withscores=True)
        out = []
        for raw_id, at in ids:
            job_id = _text(raw_id)
            status = await self.client.hget(self._job_keys(job_id)[0], "status")
            out.append((job_id, _text(status or b"?"), float(at)))
        return out


class Preparer:
    """Prepares each event (hydrate if thin, then apply to job state), the same for every handler group."""

    def __init__(self, state: JobState, api: OpenAIClient | None, retry_s: float = 5.0) -> None:
        self.state = state
        self.api = api
        self.retry_s = retry_s
        self._local: dict[str, asyncio.Future[Event]] = {}

    async def prepare(self, event: Event) -> Event:
        """The prepared event. Raises `RetryLater` (API down; try later) or `PermanentFailure` (job gone)."""
        [prepared] = await self.prepare_many([event])
        if isinstance(prepared, HandlerError):
            raise prepared
        return prepared

    async def prepare_many(self, events: list[Event]) -> list[Event | HandlerError]:
        """Prepare a batch: hydrations run concurrently, then every verdict in one round trip. An event that
        cannot be prepared gets its `RetryLater`/`PermanentFailure` in its place (Redis errors raise)."""
        hydrated = await asyncio.gather(*(self._hydrate(e) for e in events), return_exceptions=True)
        for outcome in hydrated:
            if isinstance(outcome, BaseException) and not isinstance(outcome, HandlerError):
                raise outcome
        applied = iter(await self.state.apply_many([e for e in hydrated if isinstance(e, Event)]))
        return [next(applied) if isinstance(e, Event) else e for e in hydrated]  # type: ignore[misc]

    async def _hydrate(self, event: Event) -> Event:
        if self.api is not None and event.job is None and event.type.startswith("fine_tuning.job."):
            return await self._hydrated(event)
        return event

    async def _hydrated(self, event: Event) -> Event:
        """The event with its job, fetched once per event: once per process, then cached in Redis."""
        if (running := self._local.get(event.id)) is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._local[event.id] = future
        try:
            hydrated = await self._fetch_once(event)
            future.set_result(hydrated)
            return hydrated
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: concurrent waiters re-raise it
            raise
        finally:
            del self._local[event.id]

    async def _fetch_once(self, event: Event) -> Event:
        client, cache = self.state.client, self.state.hydrated_key(event.id)
        lock, deadline = cache + ":lock", time.monotonic() + _WAIT_S
        while True:
            cached: Any = await client.get(cache)
            if cached is not None:
                return _from_cache(event, cached)
            if await client.set(lock, 1, nx=True, px=_LOCK_MS):
                break
            if time.monotonic() > deadline:
                raise RetryLater("the job is being fetched by another worker", after=1.0)
            await asyncio.sleep(0.05)
        try:
            assert self.api is not None
            try:
                job = await self.api.retrieve_job(event.job_id)
            except JobNotFound as exc:
                reason = f"hydration: job {event.job_id} not found ({exc})"
                await client.set(cache, _NOT_FOUND + reason.encode(), ex=self.state.retention_s)
                raise PermanentFailure(reason) from None
            except OpenAIError as exc:
                raise RetryLater(f"hydration: {exc}", after=exc.retry_after or self.retry_s) from None
            await client.set(cache, _job_encoder.encode(job), ex=self.state.retention_s)
            return msgspec.structs.replace(event, job=job)
        finally:
            await client.delete(lock)


def _from_cache(event: Event, raw: bytes) -> Event:
    if raw.startswith(_NOT_FOUND):
        raise PermanentFailure(raw[1:].decode())
    return msgspec.structs.replace(event, job=_job_decoder.decode(raw))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
