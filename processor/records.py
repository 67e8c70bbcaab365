"""The records ftjobs writes to Redis streams besides events, each defined once and read back by the same code.

A stream entry is a flat map of fields; each record here is a Struct whose fields are the entry's fields
(`to_fields` writes them, `from_fields` reads them), so the writer and the readers cannot drift apart.
Like every record we write, they are `frozen` and `kw_only`, and every field has a default: entries written
by an older version still read, and old and new workers can run side by side during a deploy.

- `DeadLetterRecord`: an entry a handler gave up on, in `{p}:{dlq}:{handler}`;
- `QuarantineRecord`: a signed body that did not decode, in `{p}:{q}:quarantine`.

(The event itself is `models.Event`, in the entry's `e` field: a versioned msgpack record written by
`eventrecord.encode_event` and read by `eventrecord.decode_event`, the only code that touches it. Version 2 is an
array of the fields in order (the version first), version 1 was a map by name; both read. A job's
timeline items are written by the enqueue script and read as `jobstate.Transition`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import msgspec
from msgspec import Struct, field


class StreamRecord(Struct, frozen=True, kw_only=True):
    """A record stored as the fields of one stream entry: bytes as they are, text as UTF-8, numbers as text
    (times with millisecond precision)."""

    def to_fields(self) -> dict[bytes, bytes]:
        """The entry's fields, for XADD."""
        out: dict[bytes, bytes] = {}
        for info in msgspec.structs.fields(self):
            value = getattr(self, info.name)
            if isinstance(value, bytes):
                out[info.encode_name.encode()] = value
            elif isinstance(value, float):
                out[info.encode_name.encode()] = f"{value:.3f}".encode()
            else:
                out[info.encode_name.encode()] = str(value).encode()
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Self:
        """The record in an entry's fields (as XRANGE returns them); missing fields take their defaults."""
        raw: dict[str, Any] = {}
        for info in msgspec.structs.fields(cls):
            value = fields.get(info.encode_name.encode())
            if value is not None:
                raw[info.encode_name] = value if info.type is bytes else value.decode(errors="replace")
        return msgspec.convert(raw, cls, strict=False)


class DeadLetterRecord(StreamRecord, frozen=True, kw_only=True):
    """An entry of the events stream that a handler gave up on, moved to its dead-letter stream."""

    #: The id the entry had in the events stream.
    entry_id: str = ""
    #: The event record, as it was in the events stream (`eventrecord.encode_event`; possibly undecodable).
    record: bytes = field(default=b"", name="e")
    #: The job-state verdict the entry carried (kept, so a replay is judged the same).
    verdict: bytes = field(default=b"", name="v")
    error: str = ""
    attempts: int = 0
    failed_at: float = 0.0
    #: The partition of the events stream the entry was in (`entry_id` is unique only within it).
    partition: int = 0


class QuarantineRecord(StreamRecord, frozen=True, kw_only=True):
    """A signed body that did not decode as a job or an event, kept for a replay after an upgrade."""

    body: bytes = b""
    error: str = ""
    webhook_id: str = ""
    received_at: float = 0.0
