"""Records written to Redis streams: written and read by the same definition, and old entries still read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from processor.records import DeadLetterRecord, QuarantineRecord


@given(
    entry_id=st.text(),
    record=st.binary(),
    error=st.text(),
    attempts=st.integers(min_value=0, max_value=10**6),
    failed_at=st.integers(min_value=0, max_value=2**40).map(lambda ms: ms / 1000),
)
def test_a_dead_letter_reads_back_as_written(
    entry_id: str, record: bytes, error: str, attempts: int, failed_at: float
) -> None:
    letter = DeadLetterRecord(
        entry_id=entry_id, record=record, verdict=b"new||", error=error, attempts=attempts, failed_at=failed_at
    )
    fields = letter.to_fields()
    assert set(fields) == {b"entry_id", b"e", b"v", b"error", b"attempts", b"failed_at", b"partition"}
    assert DeadLetterRecord.from_fields(fields) == letter


def test_entries_written_before_the_records_were_defined_still_read() -> None:
    """The field layout the worker and the receiver wrote by hand (a dead letter from before verdicts)."""
    old = {b"entry_id": b"17-0", b"e": b"\x81", b"error": b"boom", b"attempts": b"3", b"failed_at": b"1700000000.125"}
    assert DeadLetterRecord.from_fields(old) == DeadLetterRecord(
        entry_id="17-0", record=b"\x81", error="boom", attempts=3, failed_at=1700000000.125
    )
    quarantined = {b"body": b"{", b"error": b"not JSON", b"webhook_id": b"wh_1", b"received_at": b"12.5"}
    assert QuarantineRecord.from_fields(quarantined) == QuarantineRecord(
        body=b"{", error="not JSON", webhook_id="wh_1", received_at=12.5
    )
    assert QuarantineRecord.from_fields(QuarantineRecord(body=b"\xff", webhook_id="wh").to_fields()).body == b"\xff"
