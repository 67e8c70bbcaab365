"""Dead letters and quarantine, for operators: list, show, replay, drop (`ftjobs dlq`, `ftjobs quarantine`).

A dead letter is replayed to its own handler only: the event goes back on the events stream with `target`
set (other handlers skip it) and with the failures so far in `history`, so a second dead-lettering still
shows the first. A quarantined body is decoded again with the current code (after an upgrade that
understands it) and, when it decodes, enqueued as a normal event and removed from quarantine.

Bulk actions read the streams in pages (`scan`, `scan_quarantined`), so nothing past a fixed count is
silently left out; `EntryFilter` picks the entries a bulk action or a listing takes (by job, time, error).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from msgspec import Struct

from processor.client import text
from processor.enqueue import Enqueuer
from processor.eventrecord import decode_event, encode_event
from processor.models import Event, decode_body
from processor.records import DeadLetterRecord, QuarantineRecord
from processor.settings import explain
from processor.stream import RECORD_FIELD, VERDICT_FIELD, Streams, dead_letter_mark_s


class DeadLetter(Struct, kw_only=True):
    id: str
    entry_id: str
    error: str
    attempts: int
    failed_at: float
    event: Event | None
    #: The job-state verdict the original entry carried (kept, so a replay is judged the same).
    verdict: str = ""
    #: The partition of the events stream the entry was in.
    partition: int = 0


class Quarantined(Struct, kw_only=True):
    id: str
    webhook_id: str
    error: str
    received_at: float
    body: bytes


#: Entries read per XRANGE call when going through a whole stream.
PAGE: Final = 500

_RELATIVE: Final = re.compile(r"(\d+)([smhdw])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str, now: float) -> float:
    """A moment as epoch seconds, from ISO-8601 (`2026-05-01`, `2026-05-01T12:00:00+02:00`; UTC when no offset
    is given) or an age before `now` (`90s`, `30m`, `2h`, `1d`, `1w`). Raises `ValueError` otherwise."""
    value = value.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - int(relative[1]) * _UNIT_S[relative[2]]
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"{value!r} is neither an ISO-8601 time nor an age like 30m, 2h or 1d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


class EntryFilter(Struct, frozen=True, kw_only=True):
    """Which dead letters or quarantined bodies an operator action takes. Every field set must match; an
    empty filter takes everything.

    `job`: the job id (a quarantined body's, when it is JSON with one); `since`/`until`: epoch seconds,
    inclusive, against when the entry failed (dead letter) or arrived (quarantine); `error`: a substring of
    the recorded error, ignoring case.
    """

    job: str | None = None
    since: float | None = None
    until: float | None = None
    error: str | None = None

    @property
    def active(self) -> bool:
        """True when any field narrows the selection."""
        return any(v is not None for v in (self.job, self.since, self.until, self.error))

    def matches(self, record: DeadLetter | Quarantined) -> bool:
        if self.error is not None and self.error.lower() not in record.error.lower():
            return False
        if self.since is not None or self.until is not None:
            at = _moment(record)
            if (self.since is not None and at < self.since) or (self.until is not None and at > self.until):
                return False
        return self.job is None or _job_id(record) == self.job


def _moment(record: DeadLetter | Quarantined) -> float:
    """When the entry failed or arrived; the entry id's milliseconds for a record that lacks the field."""
    at = record.failed_at if isinstance(record, DeadLetter) else record.received_at
    return at or int(record.id.split("-", 1)[0]) / 1000


def _job_id(record: DeadLetter | Quarantined) -> str | None:
    """The job a record is about: the decoded event's; for a body that did not decode, `data.id` (an event
    envelope) or `id` (a job object) when it is a JSON object at all."""
    if isinstance(record, DeadLetter):
        return record.event.job_id if record.event is not None else None
    try:
        body = msgspec.json.decode(record.body)
    except msgspec.DecodeError:
        return None
    if not isinstance(body, dict):
        return None
    data = body.get("data")
    found = data.get("id") if isinstance(data, dict) else body.get("id")
    return found if isinstance(found, str) else None


class DeadLetters:
    """Operator actions on one deployment's dead-letter and quarantine streams."""

    def __init__(self, streams: Streams, *, enqueuer: Enqueuer, retention_s: int = 0) -> None:
        """`enqueuer`: the process's (`runtime.Runtime.enqueuer`), so a replayed quarantine entry is deduped
        and judged with the same windows as a fresh delivery; `retention_s`: `redis.retention_s`. Built by
        `runtime.Runtime` only."""
        self.streams = streams
        self.retention_s = retention_s
        self.client = streams.client
        self.keys = streams.keys
        self.enqueuer = enqueuer

    async def letters(self, handler: str, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` dead letters of `handler` (one page; `scan` goes through them all)."""
        raw: Any = await self.client.xrange(self.keys.dlq(handler), count=count)
        return [_dead_letter(entry_id, fields) for entry_id, fields in raw]

    async def scan(self, handler: str, page: int = PAGE) -> AsyncIterator[DeadLetter]:
        """Every dead letter of `handler`, oldest first, read `page` at a time."""
        async for entry_id, fields in self._pages(self.keys.dlq(handler), page):
            yield _dead_letter(entry_id, fields)

    async def count(self, handler: str) -> int:
        """How many dead letters `handler` has."""
        return int(await self.client.xlen(self.keys.dlq(handler)))

    async def get(self, handler: str, ids: list[str]) -> list[DeadLetter]:
        """The named dead letters that exist, in the order named (one round trip)."""
        return [_dead_letter(i, fields) for i, fields in await self._by_id(self.keys.dlq(handler), ids)]

    async def replay(self, handler: str, ids: list[str]) -> list[str]:
        """Put dead letters back for `handler` only; returns the new entry ids (undecodable ones are kept)."""
        return await self.replay_letters(handler, await self.get(handler, ids))

    async def replay_letters(self, handler: str, letters: list[DeadLetter]) -> list[str]:
        """`replay` for letters already read (`get`): each goes back and leaves the dead-letter stream."""
        await self.streams.ensure_groups([handler])
        new_ids = []
        for letter in letters:
            if letter.event is None:
                continue
            note = f"dead-lettered after {letter.attempts} attempt(s) at {letter.failed_at:.0f}: {letter.error}"
            event = msgspec.structs.replace(letter.event, target=handler, history=[*letter.event.history, note])
            # Back on the events stream (in the job's partition) under a dedupe id of its own, then out of the
            # dead letters: a crash between the two steps makes a second replay find the first, not add another.
            fields = {RECORD_FIELD: encode_event(event), VERDICT_FIELD: letter.verdict.encode()}
            added = await self.enqueuer.add(f"dlq:{handler}:{letter.id}", fields, event, judge=False)
            # The original entry's dead-letter marker names its replay, so the dashboard follows it there; written
            # anew when it expired (an older version's lived 7 days, whatever the entry's retention).
            marker = self.keys.dlq_marker(handler, letter.partition, letter.entry_id)
            await self.client.set(marker, added.entry_id, ex=dead_letter_mark_s(self.retention_s))
            await self.client.xdel(self.keys.dlq(handler), letter.id)
            new_ids.append(added.entry_id)
        return new_ids

    async def drop(self, handler: str, ids: list[str]) -> int:
        return int(await self.client.xdel(self.keys.dlq(handler), *ids)) if ids else 0

    async def quarantined(self, count: int = 100) -> list[Quarantined]:
        """The oldest `count` quarantined bodies (one page; `scan_quarantined` goes through them all)."""
        raw: Any = await self.client.xrange(self.keys.quarantine, count=count)
        return [_quarantined(entry_id, fields) for entry_id, fields in raw]

    async def scan_quarantined(self, page: int = PAGE) -> AsyncIterator[Quarantined]:
        """Every quarantined body, oldest first, read `page` at a time."""
        async for entry_id, fields in self._pages(self.keys.quarantine, page):
            yield _quarantined(entry_id, fields)

    async def count_quarantined(self) -> int:
        """How many bodies are quarantined."""
        return int(await self.client.xlen(self.keys.quarantine))

    async def get_quarantined(self, ids: list[str]) -> list[Quarantined]:
        """The named quarantined bodies that exist, in the order named (one round trip)."""
        return [_quarantined(i, fields) for i, fields in await self._by_id(self.keys.quarantine, ids)]

    async def replay_quarantined(self, ids: list[str], groups: list[str]) -> list[tuple[str, str]]:
        """Decode each body again; enqueue what decodes now. Returns (id, outcome) per entry that exists."""
        await self.streams.ensure_groups(groups)
        outcomes = []
        for item in await self.get_quarantined(ids):
            try:
                body = decode_body(item.body)
            except msgspec.ValidationError as exc:
                outcomes.append((item.id, f"still not readable: {explain(exc)}"))
                continue
            except msgspec.DecodeError as exc:
                outcomes.append((item.id, f"still not readable: {exc}"))
                continue
            event = Event.from_body(body, webhook_id=item.webhook_id, received_at=time.time())
            # Enqueued like a fresh delivery (judged against the job's state), under its own dedupe id: the
            # webhook-id already names the quarantine entry.
            replay_id = f"{item.webhook_id}:replayed"
            new, entry_id, _ = await self.enqueuer.add(replay_id, {RECORD_FIELD: encode_event(event)}, event)
            await self.client.xdel(self.keys.quarantine, item.id)
            what = f"enqueued as {event.type} for {event.job_id}" if new else f"already replayed as {entry_id}"
            outcomes.append((item.id, what))
        return outcomes

    async def drop_quarantined(self, ids: list[str]) -> int:
        return int(await self.client.xdel(self.keys.quarantine, *ids)) if ids else 0

    async def _pages(self, key: str, page: int) -> AsyncIterator[tuple[Any, dict[bytes, bytes]]]:
        """Every entry of stream `key`, `page` per XRANGE, each page starting after the last id seen (so
        entries deleted meanwhile, as a replay does, do not shift what is read next)."""
        start = "-"
        while True:
            raw: Any = await self.client.xrange(key, start, "+", count=page)
            for entry_id, fields in raw:
                yield entry_id, fields
            if len(raw) < page:
                return
            start = f"({text(raw[-1][0])}"

    async def _by_id(self, key: str, ids: list[str]) -> list[tuple[Any, dict[bytes, bytes]]]:
        """The entries of `key` with these ids (missing ones left out), in one pipelined round trip."""
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(key, entry_id, entry_id)
            found: list[Any] = await pipe.execute()
        return [entry for raw in found for entry in raw]


def _dead_letter(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    record = DeadLetterRecord.from_fields(fields)
    try:
        event: Event | None = decode_event(record.record)
    except msgspec.DecodeError:
        event = None
    return DeadLetter(
        id=text(entry_id),
        entry_id=record.entry_id,
        error=record.error,
        attempts=record.attempts,
        failed_at=record.failed_at,
        event=event,
        verdict=record.verdict.decode(errors="replace"),
        partition=record.partition,
    )


def _quarantined(entry_id: Any, fields: dict[bytes, bytes]) -> Quarantined:
    record = QuarantineRecord.from_fields(fields)
    return Quarantined(
        id=text(entry_id),
        webhook_id=record.webhook_id,
        error=record.error,
        received_at=record.received_at,
        body=record.body,
    )
