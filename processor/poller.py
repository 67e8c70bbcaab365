"""The poller: the only source of `validating_files`, `queued` and `running` (webhooks never send them).

Every `poll_interval_s` it lists recent jobs and enqueues an event, with the full job, for each status it
has not seen for that job. The event's id is `poll:{job}:{status}`, so several pollers (or a restart) never
enqueue the same change twice, and the job state turns a change a webhook already announced into a repeat:
one notification per (job, status) whichever source saw it first. What the poller has seen is kept in
Redis (`{p}:poller:seen`), so a restart does not announce everything again; on its very first start it
announces only jobs created after it started, unless `poll_backfill` is on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import structlog

from processor.client import REDIS_ERRORS
from processor.enqueue import Enqueuer
from processor.eventrecord import encode_event
from processor.liveness import cancel_requested
from processor.models import Event, FineTuningJob
from processor.openai import OpenAIClient, OpenAIError
from processor.settings import Settings
from processor.stream import RECORD_FIELD, Streams

log = structlog.get_logger()

STARTED: Final = "started_at"
#: When a poll last went through (Unix time), for `ftjobs_poller_last_success_timestamp_seconds`.
LAST_SUCCESS: Final = "last_success_at"


class Poller:
    """One poll per `poll_once()`; `run()` polls until cancelled."""

    def __init__(self, settings: Settings, streams: Streams, api: OpenAIClient, enqueuer: Enqueuer) -> None:
        self.settings = settings
        self.streams = streams
        self.api = api
        self.seen_key = streams.keys.poller_seen
        self.meta_key = streams.keys.poller
        self.enqueuer = enqueuer

    async def poll_once(self, now: float | None = None) -> int:
        """List recent jobs and enqueue one event per status change; returns how many were enqueued."""
        now = time.time() if now is None else now
        client = self.streams.client
        await client.hsetnx(self.meta_key, STARTED, now)
        started = float(await client.hget(self.meta_key, STARTED) or now)
        await self.streams.ensure_groups(h.name for h in self.settings.handlers)
        openai = self.settings.openai
        unreadable: set[str] = set()
        listing = self.api.iter_jobs(metadata=openai.poll_metadata, max_pages=openai.poll_max_pages, skipped=unreadable)
        jobs = [j async for j in listing]
        if not jobs:
            await client.hset(self.meta_key, LAST_SUCCESS, f"{time.time():.3f}")
            return 0
        seen: list[Any] = await client.hmget(self.seen_key, [j.id for j in jobs])
        emitted = 0
        for job, last in zip(jobs, seen, strict=True):
            last_status = last.decode() if last else None
            if job.status == last_status:
                continue
            quiet = last_status is None and not openai.poll_backfill and job.created_at < int(started)
            if not quiet:
                event = _event(job)
                new, *_ = await self.enqueuer.add(event.id, {RECORD_FIELD: encode_event(event)}, event)
                emitted += new
                log.info("status_change_polled", job_id=job.id, status=job.status, previous=last_status, new=new)
            await client.hset(self.seen_key, job.id, job.status)
        # Forget jobs that left the listing (it is newest first, so they never come back): this hash stays
        # as large as one listing, however many jobs there have been. A job listed but unreadable this time
        # is still in it: what was seen of it is kept, so its next status is a change, not a first sight.
        listed = {job.id.encode() for job in jobs} | {job_id.encode() for job_id in unreadable}
        gone = [key for key in await client.hkeys(self.seen_key) if key not in listed]
        if gone:
            await client.hdel(self.seen_key, *gone)
        await client.hset(self.meta_key, LAST_SUCCESS, f"{time.time():.3f}")
        return emitted

    async def run(self) -> None:
        """Poll forever, every `poll_interval_s`; API and Redis outages are logged and waited out."""
        interval = self.settings.openai.poll_interval_s
        log.info("poller_started", interval_s=interval, backfill=self.settings.openai.poll_backfill)
        while not cancel_requested():
            try:
                await self.poll_once()
            except (OpenAIError, *REDIS_ERRORS, OSError) as exc:
                log.warning("poll_failed", error=str(exc))
            await asyncio.sleep(interval)


def _event(job: FineTuningJob) -> Event:
    now = time.time()
    return Event(
        id=f"poll:{job.id}:{job.status}",
        type=job.event_type,
        job_id=job.id,
        source="poll",
        created_at=job.finished_at or int(now),
        received_at=now,
        job=job,
    )
