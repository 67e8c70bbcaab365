"""Dead letters and quarantine, as an operator handles them: list, replay (to one handler), drop."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from processor.deadletters import DeadLetter, EntryFilter, Quarantined, parse_time
from processor.eventrecord import EVENT_RECORD_VERSION
from processor.models import Event, decode_body
from processor.records import DeadLetterRecord
from processor.runtime import open_runtime
from processor.settings import RedisSettings, Settings
from tests.conftest import ROOT, compact, eventually, sample, signed, sink


def ftjobs(config: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "processor", "-c", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dead_letter_replay_goes_to_its_handler_only(
    rig: Any, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    broken = sink("flaky", redis_url, prefix, fail_times=-1, max_attempts=2, backoff_s=0.01)
    fine = sink("fine", redis_url, prefix)
    async with rig([broken, fine]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")), "wh_dlq")

        async def dead() -> bool:
            return len(await r.dead("flaky")) == 1

        await eventually(dead)
    config = tmp_path / "ftjobs.toml"
    config.write_text(
        f'[redis]\nprefix = "{prefix}"\n[[handlers]]\nname = "flaky"\ntype = "log"\n'
        '[[handlers]]\nname = "fine"\ntype = "log"\n'
    )
    listed = ftjobs(config, redis_url, "dlq", "list", "flaky")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["ID", "EVENT", "JOB", "ATTEMPTS", "ERROR"]
    assert row.split()[1:4] == ["fine_tuning.job.failed", "ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD", "2"]
    assert "RetryLater: sink flaky fails attempt 2" in listed.stdout
    assert ftjobs(config, redis_url, "dlq", "list", "nope").returncode != 0
    # The handler is fixed (it now succeeds); replay its dead letters.
    async with rig([sink("flaky", redis_url, prefix), fine]) as r:
        replayed = ftjobs(config, redis_url, "dlq", "replay", "flaky", "--all")
        assert replayed.returncode == 0 and "replayed 1 to flaky" in replayed.stdout

        async def delivered() -> bool:
            return len(await r.delivered("flaky")) == 1

        await eventually(delivered)
        await eventually(r.settled)
        [event] = await r.delivered("flaky")
        assert event.target == "flaky" and event.id == "wh_dlq"
        assert event.history and "dead-lettered after 2 attempt(s)" in event.history[0]
        assert len(await r.delivered("fine")) == 1  # the other handler did not get it twice
        assert await r.dead("flaky") == []


async def test_a_dead_letter_written_by_an_earlier_release_replays(rig: Any, redis_url: str, prefix: str) -> None:
    """Dead letters keep the record as it was: one from before version 2 (a msgpack map by field name) still
    lists and replays, and goes back on the stream in this release's format."""
    job = decode_body(compact(sample("fine_tuning_job.failed.json")))
    event = Event.from_body(job, webhook_id="wh_v1", received_at=time.time())
    old = DeadLetterRecord(
        entry_id="1700000000000-0",
        record=msgspec.msgpack.Encoder().encode(event),  # how earlier releases wrote the record
        verdict=b"new||",
        error="boom",
        attempts=3,
        failed_at=time.time(),
    )
    async with rig([sink("a", redis_url, prefix)]) as r:
        letter_id = await r.rclient.xadd(f"{prefix}:{{dlq}}:a", old.to_fields())
        async with open_runtime(r.settings, redis_url) as runtime:
            [letter] = await runtime.dead_letters.letters("a")
            assert letter.event == event
            [new_id] = await runtime.dead_letters.replay("a", [letter_id.decode()])

        async def delivered() -> bool:
            return len(await r.delivered("a")) == 1

        await eventually(delivered)
        [got] = await r.delivered("a")
        assert (got.id, got.job, got.target) == ("wh_v1", job, "a")
        [(_, fields)] = await r.rclient.xrange(f"{prefix}:{{p0}}:events", new_id, new_id)
        assert fields[b"e"][1] == EVENT_RECORD_VERSION


async def test_drop(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix, fail_times=-1, permanent=True)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("a")) == 1

        await eventually(dead)
        async with open_runtime(r.settings, redis_url) as runtime:
            letters = runtime.dead_letters
            [letter] = await letters.letters("a")
            assert await letters.drop("a", [letter.id]) == 1
            assert await r.dead("a") == []


async def test_quarantine_replay_after_an_upgrade(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("a", redis_url, prefix)]) as r:
        answer = await r.post(
            b'{"object":"fine_tuning.job","id":"ftjob-q","created_at":"soon","model":"m","status":"x"}'
        )
        assert answer["status"] == "quarantined"
        # A body an older version could not read but this one can (as after an upgrade).
        readable = compact(sample("fine_tuning_job.failed.json"))
        await r.rclient.xadd(
            f"{prefix}:{{q}}:quarantine",
            {
                b"body": readable,
                b"error": b"old decoder",
                b"webhook_id": b"wh_old",
                b"received_at": str(time.time()).encode(),
            },
        )
        async with open_runtime(r.settings, redis_url) as runtime:
            letters = runtime.dead_letters
            items = await letters.quarantined()
            outcomes = dict(await letters.replay_quarantined([i.id for i in items], ["a"]))
            assert sorted(outcomes.values()) == [
                "enqueued as fine_tuning.job.failed for ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD",
                "still not readable: created_at: Expected `int`, got `str`",
            ]

            async def delivered() -> bool:
                return len(await r.delivered("a")) == 1

            await eventually(delivered)
            assert len(await letters.quarantined()) == 1  # the unreadable one stays


async def test_a_sender_cannot_take_the_id_a_quarantine_replay_will_use(rig: Any, redis_url: str, prefix: str) -> None:
    """Replays enqueue under `<webhook-id>:replayed`. A sender who could send that id first would make the
    replay a "duplicate", and the quarantined body would be deleted without ever being delivered."""
    async with rig([sink("a", redis_url, prefix)]) as r:
        # A body an older version could not read but this one can (as after an upgrade).
        await r.rclient.xadd(
            f"{prefix}:{{q}}:quarantine",
            {
                b"body": compact(sample("fine_tuning_job.failed.json")),
                b"error": b"old decoder",
                b"webhook_id": b"wh_old",
                b"received_at": str(time.time()).encode(),
            },
        )
        decoy = compact(sample("fine_tuning_job.succeeded.json"))
        resp = await r.client.post("/webhooks/openai", data=decoy, headers=signed(decoy, "wh_old:replayed"))
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_webhook_id"
        async with open_runtime(r.settings, redis_url) as runtime:
            letters = runtime.dead_letters
            [item] = await letters.quarantined()
            outcomes = dict(await letters.replay_quarantined([item.id], ["a"]))
            assert outcomes == {item.id: "enqueued as fine_tuning.job.failed for ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD"}

            async def delivered() -> bool:
                return len(await r.delivered("a")) == 1

            await eventually(delivered)
            [event] = await r.delivered("a")
            assert event.job_id == "ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD"


# --- choosing entries: the filter, the times it reads, and paging through a whole stream -----------------

NOW = 1_800_000_000.0


def _letter(job: str | None = "ftjob-a", error: str = "RetryLater: 503", failed_at: float = NOW) -> DeadLetter:
    event = None
    if job is not None:
        body = decode_body(
            msgspec.json.encode({**msgspec.json.decode(sample("fine_tuning_job.failed.json")), "id": job})
        )
        event = Event.from_body(body, webhook_id="wh_x", received_at=failed_at)
    return DeadLetter(id="1-0", entry_id="1-0", error=error, attempts=3, failed_at=failed_at, event=event)


def _quarantined(body: bytes, received_at: float = NOW, error: str = "bad") -> Quarantined:
    return Quarantined(id="1700000000000-0", webhook_id="wh_q", error=error, received_at=received_at, body=body)


def test_an_empty_filter_takes_everything() -> None:
    assert not EntryFilter().active
    assert EntryFilter().matches(_letter()) and EntryFilter().matches(_letter(job=None))
    assert EntryFilter().matches(_quarantined(b"not json"))


def test_filter_by_job_error_and_time() -> None:
    letter = _letter(job="ftjob-a", error="RetryLater: upstream 503", failed_at=NOW - 3600)
    assert EntryFilter(job="ftjob-a").matches(letter) and not EntryFilter(job="ftjob-b").matches(letter)
    assert not EntryFilter(job="ftjob-a").matches(_letter(job=None))  # an undecodable record has no job
    assert EntryFilter(error="UPSTREAM 503").matches(letter) and not EntryFilter(error="timeout").matches(letter)
    assert EntryFilter(since=NOW - 7200, until=NOW).matches(letter)
    assert EntryFilter(since=NOW - 3600, until=NOW - 3600).matches(letter)  # both ends inclusive
    assert not EntryFilter(since=NOW - 1800).matches(letter) and not EntryFilter(until=NOW - 7200).matches(letter)
    assert not EntryFilter(job="ftjob-a", error="timeout").matches(letter)  # every field given must match


def test_filter_reads_a_quarantined_body_for_its_job_and_the_entry_id_for_a_missing_time() -> None:
    envelope = b'{"object":"event","id":"evt_1","type":"fine_tuning.job.failed","data":{"id":"ftjob-q"}}'
    assert EntryFilter(job="ftjob-q").matches(_quarantined(envelope))
    assert not EntryFilter(job="evt_1").matches(_quarantined(envelope))
    assert EntryFilter(job="ftjob-j").matches(_quarantined(b'{"object":"fine_tuning.job","id":"ftjob-j"}'))
    assert not EntryFilter(job="ftjob-j").matches(_quarantined(b"[1, 2]"))
    assert not EntryFilter(job="ftjob-j").matches(_quarantined(b"\xff not json"))
    undated = _quarantined(b"x", received_at=0.0)  # id 1700000000000-0: 1,700,000,000 s
    assert EntryFilter(since=1_700_000_000, until=1_700_000_000).matches(undated)
    assert not EntryFilter(since=1_700_000_001).matches(undated)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - 90),
        ("30m", NOW - 1800),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1w", NOW - 7 * 86400),
        ("2027-01-15T08:00:00Z", 1_800_000_000.0),
        ("2027-01-15T10:00:00+02:00", 1_800_000_000.0),
        ("2027-01-15T08:00:00", 1_800_000_000.0),  # no offset: UTC
        ("2027-01-15", 1_800_000_000.0 - 8 * 3600),
    ],
)
def test_parse_time_takes_iso_8601_and_ages(text: str, expected: float) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "2x", "", "2027-13-01"])
def test_parse_time_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="neither an ISO-8601 time nor an age"):
        parse_time(text, NOW)


async def test_scan_reads_every_page_while_entries_are_deleted(redis_url: str, prefix: str, rclient: Any) -> None:
    """No cap: a stream longer than a page is read to its end, even when each page is deleted as it is read
    (as a bulk replay does)."""
    settings = Settings(redis=RedisSettings(prefix=prefix))
    ids = [
        (await rclient.xadd(f"{prefix}:{{q}}:quarantine", {b"body": b"x", b"error": str(i).encode()})).decode()
        for i in range(7)
    ]
    async with open_runtime(settings, redis_url) as runtime:
        dead = runtime.dead_letters
        seen = []
        async for item in dead.scan_quarantined(page=2):
            seen.append(item.id)
            await dead.drop_quarantined([item.id])
        assert seen == ids and await dead.count_quarantined() == 0
        assert await dead.get_quarantined(ids[:2]) == []
