"""The one step between dequeue and routing: hydration.

Before routing, a thin webhook is hydrated with the job from the API, fetched once per event: the job is
cached in Redis and a lock makes one worker fetch it; every handler group and worker process shares it.

Keys: `{p}:hydrated:{event}` (msgpack job, or `!reason` when the job does not exist) and its lock
(`Keys.hydrated_lock`), both expiring with the stream's retention.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import msgspec

from processor.errors import HandlerError, PermanentFailure, RetryLater
from processor.jobstate import JobState
from processor.models import Event, FineTuningJob, status_rank
from processor.openai import JobNotFound, OpenAIClient, OpenAIError

_NOT_FOUND: Final = b"!"
_job_encoder: Final = msgspec.msgpack.Encoder()
_job_decoder: Final = msgspec.msgpack.Decoder(FineTuningJob)
_LOCK_MS: Final = 30_000
_WAIT_S: Final = 10.0
#: How long an event may wait for the API to show the status it announces before it is dead-lettered
#: (the API lags a webhook by seconds; an hour means it will not catch up).
API_LAG_S: Final = 3600.0
#: The longest pause between two looks while the API lags: the pause grows with the event's age (a tenth of
#: it), so an event that waits the whole hour costs each handler group about 90 calls, not 720.
_LAG_PAUSE_MAX_S: Final = 60.0


class Preparer:
    """Hydrates thin events before routing: the job is fetched once per event and shared by every group."""

    def __init__(self, state: JobState, api: OpenAIClient | None, retry_s: float = 5.0) -> None:
        self.state = state
        self.api = api
        self.retry_s = retry_s
        self._local: dict[str, asyncio.Future[Event]] = {}

    async def prepare_many(self, events: list[Event]) -> list[Event | HandlerError]:
        """Hydrate the thin ones of a batch, concurrently. An event that cannot be hydrated gets its
        `RetryLater`/`PermanentFailure` in its place; Redis errors raise."""
        if self.api is None or all(not _thin(e) for e in events):
            return list(events)
        hydrated = await asyncio.gather(*(self._hydrate(e) for e in events), return_exceptions=True)
        for outcome in hydrated:
            if isinstance(outcome, BaseException) and not isinstance(outcome, HandlerError):
                raise outcome
        return hydrated  # type: ignore[return-value]

    async def _hydrate(self, event: Event) -> Event:
        return await self._hydrated(event) if _thin(event) else event

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
        client, cache = self.state.client, self.state.keys.hydrated(event.id)
        lock, deadline = self.state.keys.hydrated_lock(event.id), time.monotonic() + _WAIT_S
        # A replay (from the dead letters) asks the API again when the job was not found: that is what the
        # dead letter said, and the replay comes once it has been fixed (the key of another project, a job
        # the API did not show yet). The not-found is cached so the other handler groups don't ask again.
        ask_again = event.target is not None
        while True:
            cached: Any = await client.get(cache)
            if cached is not None and ask_again and cached.startswith(_NOT_FOUND):
                ask_again = False
                await client.delete(cache)
                continue
            if cached is not None:
                try:
                    return _from_cache(event, cached)
                except msgspec.DecodeError:  # written by another version, or damaged: fetched again
                    await client.delete(cache)
                    continue
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
            if (lagging := _api_lag(event, job, self.retry_s, time.time())) is not None:
                raise lagging  # not cached: the next attempt asks the API again
            await client.set(cache, _job_encoder.encode(job), ex=self.state.retention_s)
            return msgspec.structs.replace(event, job=job)
        finally:
            await client.delete(lock)


def _thin(event: Event) -> bool:
    return event.job is None and event.type.startswith("fine_tuning.job.")


def _api_lag(event: Event, job: FineTuningJob, retry_s: float, now: float) -> HandlerError | None:
    """The failure to raise when the webhook is ahead of what the API shows (`running` for a `succeeded`
    event), else None. Routed on the job's status, it would be filtered out, and the poller's later
    `succeeded` is a repeat of it: it waits like an API outage (a `RetryLater` whose pause grows with its age)
    for up to `API_LAG_S`, then is a `PermanentFailure`."""
    wanted = event.status
    if not wanted or status_rank(job.status) >= status_rank(wanted):
        return None
    why = f"hydration: the API shows job {event.job_id} {job.status!r}, not {wanted!r}"
    if (age := now - event.received_at) < API_LAG_S:
        return RetryLater(f"{why} yet", after=min(max(retry_s, age / 10), _LAG_PAUSE_MAX_S))
    return PermanentFailure(f"{why}, {API_LAG_S / 60:.0f} minutes after the event came")


def _from_cache(event: Event, raw: bytes) -> Event:
    if raw.startswith(_NOT_FOUND):
        raise PermanentFailure(raw[1:].decode())
    return msgspec.structs.replace(event, job=_job_decoder.decode(raw))
