"""What the dashboard's pages show, read through the same APIs the command line uses.

`Streams.status` and `Guard.state` (as `ftjobs status`), `retention.sizes`, `JobState.timeline/recent` (as
`ftjobs jobs`/`job`), `DeadLetters` (as `ftjobs dlq`/`quarantine`). The only reads of its own are the events
of the last minute (counted inside Redis), the last event, and the facts behind one event's per-handler
state (`delivery.decide`).
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec
from redis.exceptions import ResponseError

from processor.client import Script, text
from processor.enqueue import marker_entry_id
from processor.eventrecord import decode_event
from processor.jobstate import Transition, judge
from processor.keys import ENTRY_ID, PartitionKeys
from processor.limits import Guard
from processor.models import Event, FineTuningJob
from processor.records import DeadLetterRecord
from processor.retention import sizes
from processor.runtime import Runtime
from processor.settings import HandlerSpec
from processor.stream import RECORD_FIELD, VERDICT_FIELD

from .delivery import Facts, State, decide, unknown

#: Events of the last minute are counted up to this many (the count walks the entries inside Redis).
RATE_CAP: Final = 10_000
#: How many dead letters after an event's entry are searched for its own.
DEAD_LETTER_SCAN: Final = 1_000
#: How many of a job's latest events the job page shows.
JOB_EVENTS: Final = 50
#: How many replays of replays an event's state follows.
MAX_REPLAYS: Final = 10

_COUNT_SINCE: Final = Script("return #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])")
_job_decoder: Final = msgspec.msgpack.Decoder(FineTuningJob)


class Data:
    """The deployment's Redis, seen through the existing read APIs, for one dashboard app.

    Client, key names, streams, job state and dead letters are the `runtime`'s (the composition root's), so
    the dashboard reads and acts exactly as the command line and the worker do.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.settings = runtime.settings
        self.client = runtime.client
        self.keys = runtime.keys
        self.streams = runtime.streams
        self.jobs = runtime.jobs
        self.dead = runtime.dead_letters
        self.handlers = {spec.name: spec for spec in self.settings.handlers}

    async def overview(self) -> dict[str, Any]:
        """Everything the overview page shows."""
        names = list(self.handlers)
        status = await self.streams.status(names)
        for spec in self.settings.handlers:
            status["handlers"][spec.name] |= await Guard(self.client, self.keys, spec).state()
            status["handlers"][spec.name]["type"] = spec.type
        since = f"{int((time.time() - 60) * 1000)}-0"
        per_min = 0
        for part in self.keys.parts:
            per_min += int(await _COUNT_SINCE(self.client, [part.events], [since, RATE_CAP]))
        return {
            "status": status,
            "sizes": await sizes(self.client, self.keys),
            "per_min": per_min,
            "per_min_capped": per_min >= RATE_CAP,
            "last": await self.last_event(),
            "poller": await self.poller(),
        }

    async def last_event(self) -> tuple[str, Event | None] | None:
        """The newest entry of the events stream: its id and its event (None when it does not decode)."""
        newest: list[Any] = []
        for part in self.keys.parts:
            newest += await self.client.xrevrange(part.events, count=1) or []
        if not newest:
            return None
        entry_id, fields = max(newest, key=lambda row: _id(text(row[0])))
        return text(entry_id), _decoded(fields)

    async def poller(self) -> dict[str, Any]:
        """The poller as far as Redis knows it: configured interval, first start, jobs it tracks."""
        meta = {text(k): text(v) for k, v in (await self.client.hgetall(self.keys.poller)).items()}
        tracked = int(await self.client.hlen(self.keys.poller_seen))
        return {"interval_s": self.settings.openai.poll_interval_s, "meta": meta, "tracked": tracked}

    async def recent(self, limit: int = 50) -> list[tuple[str, str, float, list[Transition]]]:
        """Recently changed jobs, each with its timeline."""
        return [
            (job_id, status, at, await self.jobs.timeline(job_id))
            for job_id, status, at in await self.jobs.recent(limit)
        ]

    async def job(self, job_id: str) -> list[tuple[Transition, Event | None, str, dict[str, State]]]:
        """A job's latest events, newest first: (transition, event, entry id, state per handler)."""
        timeline = (await self.jobs.timeline(job_id))[-JOB_EVENTS:]
        part = self.keys.part(job_id)
        groups = await self._groups(part)
        out = []
        for step in reversed(timeline):
            entry_id = marker_entry_id(await self.client.get(part.seen(step.event)))
            event = await self._entry_event(part, entry_id) if entry_id else None
            states = {
                name: await self._state(part, spec, entry_id, event, groups) for name, spec in self.handlers.items()
            }
            out.append((step, event, entry_id, states))
        return out

    async def entry_for(self, webhook_id: str) -> tuple[str, Event | None] | None:
        """The entry a webhook id (or any event id) created, while its dedupe marker lives."""
        for part in self.keys.parts:  # the event's job (so its partition) is what we look for
            entry_id = marker_entry_id(await self.client.get(part.seen(webhook_id)))
            if entry_id:
                return entry_id, await self._entry_event(part, entry_id)
        return None

    async def _groups(self, part: PartitionKeys) -> dict[str, dict[str, Any]]:
        try:
            return {text(g["name"]): g for g in await self.client.xinfo_groups(part.events)}
        except ResponseError:  # no stream yet
            return {}

    async def _entry_event(self, part: PartitionKeys, entry_id: str) -> Event | None:
        raw: Any = await self.client.xrange(part.events, entry_id, entry_id)
        return _decoded(raw[0][1]) if raw else None

    async def _state(
        self,
        part: PartitionKeys,
        spec: HandlerSpec,
        entry_id: str,
        event: Event | None,
        groups: dict[str, Any],
        replays: int = 0,
    ) -> State:
        """Gather the facts about one entry in one handler's group, and decide. An entry whose dead letter was
        replayed stands where its replay stands (followed up to `MAX_REPLAYS` times)."""
        if not entry_id:
            return unknown("no entry: its dedupe marker expired")
        name, client, partition = spec.name, self.client, self.keys.parts.index(part)
        dead = await self._dead_letter(name, partition, entry_id)
        if dead is None:
            marker: Any = await client.get(self.keys.dlq_marker(name, partition, entry_id))
            if marker is not None:
                return await self._replayed(part, spec, text(marker), groups, replays)
        if event is None and dead is None:
            return unknown("the entry was trimmed from the stream")
        group = groups.get(name)
        if group is None:
            return unknown("the handler's group does not exist yet")
        pending: Any = await client.xpending_range(part.events, name, min=entry_id, max=entry_id, count=1)
        retry_at = await client.zscore(part.retry(name), entry_id)
        attempts, error = await client.hmget(part.attempts(name), [entry_id, f"{entry_id}:error"])
        skip = ""
        if event is not None:
            if event.target and event.target != name:
                skip = f"a replay meant for {event.target}"
            else:
                skip = spec.when.mismatch(await self._hydrated(event))
        facts = Facts(
            read=_id(entry_id) <= _id(text(group.get("last-delivered-id"))),
            pending=bool(pending),
            retry_at=retry_at,
            attempts=int(attempts or 0),
            error=text(error),
            dead=dead,
            skip=skip,
            done_marker=event is not None and bool(await client.exists(part.done(name, event.id))),
        )
        return decide(facts)

    async def _replayed(
        self, part: PartitionKeys, spec: HandlerSpec, replay_id: str, groups: dict[str, Any], replays: int
    ) -> State:
        """The state of a dead-lettered entry whose letter is gone: replayed (the marker names the replay's
        entry, whose state it takes), or dropped (an older version's replay marked nothing either)."""
        if not ENTRY_ID.fullmatch(replay_id):
            return State(kind="dead", detail="dead-lettered; the letter was dropped (or replayed by an older version)")
        if replays >= MAX_REPLAYS:
            return unknown(f"dead-lettered and replayed {MAX_REPLAYS} times over; the replays are not followed further")
        state = await self._state(part, spec, replay_id, await self._entry_event(part, replay_id), groups, replays + 1)
        return msgspec.structs.replace(state, detail=f"dead-lettered, replayed as {replay_id}: {state.detail}")

    async def _dead_letter(self, handler: str, partition: int, entry_id: str) -> tuple[str, float, int, str] | None:
        """The dead letter of `entry_id` (of `partition`), searched among those written after it was added."""
        raw: Any = await self.client.xrange(self.keys.dlq(handler), entry_id, "+", count=DEAD_LETTER_SCAN)
        for letter_id, fields in raw:
            record = DeadLetterRecord.from_fields(fields)
            if record.entry_id == entry_id and record.partition == partition:
                failed_at, attempts = float(fields.get(b"failed_at", b"0")), int(fields.get(b"attempts", b"0"))
                return text(letter_id), failed_at, attempts, text(fields.get(b"error"))
        return None

    async def _hydrated(self, event: Event) -> Event:
        """A thin event with the job the worker fetched for it (cached in Redis), so rules on the job apply."""
        if event.job is not None:
            return event
        cached: Any = await self.client.get(self.keys.hydrated(event.id))
        if not cached or cached.startswith(b"!"):
            return event
        try:
            return msgspec.structs.replace(event, job=_job_decoder.decode(cached))
        except msgspec.DecodeError:
            return event


def _decoded(fields: dict[bytes, bytes]) -> Event | None:
    try:
        return judge(decode_event(fields.get(RECORD_FIELD, b"")), fields.get(VERDICT_FIELD, b""))
    except msgspec.DecodeError:
        return None


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms or 0), int(seq or 0)) if ENTRY_ID.fullmatch(entry_id) else (0, 0)
