"""What we know about each job: its latest status, its timeline, and the verdict each event got.

Job state is written when an event is enqueued (`enqueue._ENQUEUE_LUA`, atomically and in arrival order):
each job's latest status, a timeline of transitions with their source, and for every event a verdict stored
in its entry — `previous_status`, `stale` (older than what we know) or a `repeat_of` the event that already
announced that status (the poller and a webhook both saw `succeeded`). `judge` applies that verdict.

Keys: `{p}:job:{id}` (hash: status, at, event, source), `{p}:timeline:{id}` (list of JSON transitions),
`{p}:jobs` (sorted set: job id by last change). All expire with the stream's retention.
"""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from processor.client import Client, text
from processor.enqueue import Verdict
from processor.keys import Keys
from processor.models import Event, FineTuningJob

_NOT_FOUND: Final = b"!"
_job_encoder: Final = msgspec.msgpack.Encoder()
_job_decoder: Final = msgspec.msgpack.Decoder(FineTuningJob)
_LOCK_MS: Final = 30_000
_WAIT_S: Final = 10.0


class Transition(msgspec.Struct):
    """One event of a job's timeline, as judged at enqueue (`enqueue._ENQUEUE_LUA`)."""

    status: str
    #: When the job reached the status, by the event's clock (see `Event.observed`).
    at: float
    source: str
    event: str
    previous: str = ""
    #: `new` (a transition), `repeat` (of `repeat_of`) or `stale`; empty in timelines written before verdicts.
    verdict: str = ""
    repeat_of: str = ""
    #: When we received it (our clock).
    received: float = 0.0

    @property
    def skipped(self) -> str:
        """Why handlers skip this event ('' when it is a transition they are told about)."""
        return Verdict(self.verdict, self.previous, self.repeat_of).skipped


def judge(event: Event, raw_verdict: bytes) -> Event:
    """The event with the verdict its entry got at enqueue: `previous_status`, `stale`, `repeat_of`."""
    verdict = Verdict.parse(raw_verdict)
    if verdict is None:
        return event
    return msgspec.structs.replace(
        event,
        previous_status=verdict.previous or None,
        stale=verdict.kind == "stale",
        repeat_of=verdict.repeat_of if verdict.kind == "repeat" else None,
    )


class JobState:
    """Reads the per-job state that enqueueing writes (`enqueue._ENQUEUE_LUA`)."""

    def __init__(self, client: Client, keys: Keys, retention_s: int) -> None:
        self.client = client
        self.keys = keys
        self.retention_s = retention_s

    async def timeline(self, job_id: str) -> list[Transition]:
        raw = await self.client.lrange(self.keys.timeline(job_id), 0, -1)
        return [msgspec.convert(json.loads(item), Transition) for item in raw]

    async def recent(self, limit: int = 20) -> list[tuple[str, str, float]]:
        """(job id, latest status, when) for the most recently changed jobs."""
        ids: list[Any] = []
        for part in self.keys.parts:  # each partition has its slice of the index: the newest of all of them
            ids += await self.client.zrevrange(part.jobs, 0, limit - 1, withscores=True)
        ids = sorted(ids, key=lambda row: -float(row[1]))[:limit]
        out = []
        for raw_id, at in ids:
            job_id = text(raw_id)
            status = await self.client.hget(self.keys.job(job_id), "status")
            out.append((job_id, text(status or b"?"), float(at)))
        return out
