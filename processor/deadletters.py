"""Dead letters and quarantine, for operators: list, show, replay, drop (`ftjobs dlq`, `ftjobs quarantine`).

A dead letter is replayed to its own handler only: the event goes back on the events stream with `target`
set (other handlers skip it) and with the failures so far in `history`, so a second dead-lettering still
shows the first. A quarantined body is decoded again with the current code (after an upgrade that
understands it) and, when it decodes, enqueued as a normal event and removed from quarantine.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from msgspec import Struct

from processor.enqueue import Enqueuer
from processor.models import Event, decode_body, decode_event, encode_event
from processor.records import DeadLetterRecord, QuarantineRecord
from processor.settings import explain
from processor.stream import RECORD_FIELD, VERDICT_FIELD, Streams, text


class DeadLetter(Struct, kw_only=True):
    id: str
    entry_id: str
    error: str
    attempts: int
    failed_at: float
    event: Event | None
    #: The job-state verdict the original entry carried (kept, so a replay is judged the same).
    verdict: str = ""


class Quarantined(Struct, kw_only=True):
    id: str
    webhook_id: str
    error: str
    received_at: float
    body: bytes


class DeadLetters:
    """Operator actions on one deployment's dead-letter and quarantine streams."""

    def __init__(self, streams: Streams, *, enqueuer: Enqueuer) -> None:
        """`enqueuer`: the process's (`runtime.Runtime.enqueuer`), so a replayed quarantine entry is deduped
        and judged with the same windows as a fresh delivery. Built by `runtime.Runtime` only."""
        self.streams = streams
        self.client = streams.client
        self.keys = streams.keys
        self.enqueuer = enqueuer

    async def letters(self, handler: str, count: int = 100) -> list[DeadLetter]:
        raw: Any = await self.client.xrange(self.keys.dlq(handler), count=count)
        return [_dead_letter(entry_id, fields) for entry_id, fields in raw]

    async def get(self, handler: str, ids: list[str]) -> list[DeadLetter]:
        out = []
        for entry_id in ids:
            raw: Any = await self.client.xrange(self.keys.dlq(handler), entry_id, entry_id)
            out += [_dead_letter(i, fields) for i, fields in raw]
        return out

    async def replay(self, handler: str, ids: list[str]) -> list[str]:
        """Put dead letters back for `handler` only; returns the new entry ids (undecodable ones are kept)."""
        await self.streams.ensure_groups([handler])
        new_ids = []
        for letter in await self.get(handler, ids):
            if letter.event is None:
                continue
            note = f"dead-lettered after {letter.attempts} attempt(s) at {letter.failed_at:.0f}: {letter.error}"
            event = msgspec.structs.replace(letter.event, target=handler, history=[*letter.event.history, note])
            # Back on the events stream (in the job's partition) under a dedupe id of its own, then out of the
            # dead letters: a crash between the two steps makes a second replay find the first, not add another.
            fields = {RECORD_FIELD: encode_event(event), VERDICT_FIELD: letter.verdict.encode()}
            added = await self.enqueuer.add(f"dlq:{handler}:{letter.id}", fields, event, judge=False)
            await self.client.xdel(self.keys.dlq(handler), letter.id)
            new_ids.append(added.entry_id)
        return new_ids

    async def drop(self, handler: str, ids: list[str]) -> int:
        return int(await self.client.xdel(self.keys.dlq(handler), *ids)) if ids else 0

    async def quarantined(self, count: int = 100) -> list[Quarantined]:
        raw: Any = await self.client.xrange(self.keys.quarantine, count=count)
        return [_quarantined(entry_id, fields) for entry_id, fields in raw]

    async def replay_quarantined(self, ids: list[str], groups: list[str]) -> list[tuple[str, str]]:
        """Decode each body again; enqueue what decodes now. Returns (id, outcome) per entry."""
        await self.streams.ensure_groups(groups)
        outcomes = []
        for item in await self.quarantined(10_000):
            if item.id not in ids:
                continue
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
