"""Job state at enqueue: each status a job reaches is announced once, whatever the order, source or clock.

The verdicts come from the real enqueue Lua on the real server; the property test drives it with arbitrary
arrival orders, duplicates, sources (webhook / poll / push) and skews between the API's clock and ours.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.client import Client
from processor.enqueue import Enqueuer, Verdict
from processor.eventrecord import encode_event
from processor.jobstate import JobState
from processor.keys import Keys
from processor.models import TERMINAL_STATUSES, Event, FineTuningJob, decode_job
from processor.stream import RECORD_FIELD
from tests.clients import async_client
from tests.conftest import compact, eventually, sample, sink

SUCCEEDED = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))


def push_body(status: str, job_id: str, **changes: Any) -> bytes:
    """A full job object as another system pushes it (the sample's `finished_at` is long past)."""
    finished = {} if status in TERMINAL_STATUSES else {"finished_at": None}
    return compact(msgspec.json.encode(SUCCEEDED | {"id": job_id, "status": status} | finished | changes))


async def test_terminal_status_after_running_is_announced(rig: Any, redis_url: str, prefix: str) -> None:
    """The newcomer's repro: `running` is received now (our clock), `succeeded` finished earlier by the API's
    clock. Both are announced; a second `succeeded` says it is a repeat; the timeline shows all three."""
    async with rig([sink("all", redis_url, prefix)]) as r:
        job_id = "ftjob-demo1"
        first = await r.post(push_body("running", job_id))
        done = await r.post(push_body("succeeded", job_id))
        again = await r.post(push_body("succeeded", job_id))
        assert "skipped" not in first and "skipped" not in done
        assert again["skipped"] == f"repeat of {done['webhook_id']}"
        await eventually(r.settled)
        delivered = await r.delivered("all")
        assert [(e.status, e.previous_status) for e in delivered] == [("running", None), ("succeeded", "running")]
        timeline = await JobState(r.rclient, Keys(prefix), 3600).timeline(job_id)
        assert [(t.status, t.skipped) for t in timeline] == [
            ("running", ""),
            ("succeeded", ""),
            ("succeeded", f"repeat of {done['webhook_id']}"),
        ]
        assert (await r.rclient.hget(f"{prefix}:{{p0}}:job:{job_id}", "status")) == b"succeeded"


async def test_late_non_terminal_status_after_the_end_is_stale(rig: Any, redis_url: str, prefix: str) -> None:
    async with rig([sink("all", redis_url, prefix)]) as r:
        await r.post(push_body("failed", "ftjob-late"))
        late = await r.post(push_body("running", "ftjob-late"))
        assert late["skipped"] == "stale"
        await eventually(r.settled)
        assert [e.status for e in await r.delivered("all")] == ["failed"]


# --- the property -------------------------------------------------------------------------------------------


#: A job's life: optional early stages, maybe a pause and resume, then exactly one terminal status.
def _life(early: set[str], ran: bool, paused: bool, end: str) -> list[str]:
    stages = [s for s in ("validating_files", "queued") if s in early]
    stages += ["running"] if ran or paused else []
    stages += ["paused", "running"] if paused else []
    return [*stages, end]


lives = st.builds(
    _life,
    st.sets(st.sampled_from(["validating_files", "queued"])),
    st.booleans(),
    st.booleans(),
    st.sampled_from(sorted(TERMINAL_STATUSES)),
)


@st.composite
def observations(draw: st.DrawFn) -> tuple[list[str], list[tuple[int, str, int]]]:
    """A life, and what ftjobs hears of it: (stage index, source, webhook-id tag) in arrival order. Only
    terminal statuses come by webhook (as from OpenAI); a repeated tag is a sender's retry (same id)."""
    life = draw(lives)
    heard = []
    for index, status in enumerate(life):
        sources = ["poll", "push"] + (["webhook"] if status in TERMINAL_STATUSES else [])
        for source in draw(st.lists(st.sampled_from(sources), min_size=0 if index < len(life) - 1 else 1, max_size=3)):
            heard.append((index, source, draw(st.integers(0, 1))))
    return life, draw(st.permutations(heard))


def _event(job_id: str, status: str, source: str, stage_at: int, local_at: float, webhook_id: str) -> Event:
    if source == "webhook":
        return Event(
            id=webhook_id,
            type=f"fine_tuning.job.{status}",
            job_id=job_id,
            source="webhook",
            created_at=stage_at,
            received_at=local_at,
        )
    finished = stage_at if status in TERMINAL_STATUSES else None
    job: FineTuningJob = decode_job(msgspec.json.encode(SUCCEEDED | {"id": job_id, "status": status}))
    job = msgspec.structs.replace(job, finished_at=finished)
    return Event(
        id=webhook_id,
        type=job.event_type,
        job_id=job_id,
        source=source,
        created_at=finished or int(local_at),
        received_at=local_at,
        job=job,
    )


#: Generated histories per run: 80 in CI; `FTJOBS_PROPERTY_EXAMPLES=2000` for a long run.
EXAMPLES = int(os.environ.get("FTJOBS_PROPERTY_EXAMPLES", "80"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heard=observations(), skew=st.integers(-3600, 3600), gap=st.floats(0.0, 120.0))
def test_every_status_is_announced_at_most_once_and_the_terminal_exactly_once(
    redis_url: str, prefix: str, rclient: Client, heard: tuple[list[str], list[Any]], skew: int, gap: float
) -> None:
    life, arrivals = heard
    job_id = f"ftjob-prop{uuid.uuid4().hex[:12]}"
    api_start = 1_800_000_000  # the API's clock; ours is `skew` seconds off, and events arrive `gap` apart

    async def run() -> list[tuple[str, Verdict | None]]:
        client = await async_client(redis_url)
        try:
            enqueuer = Enqueuer(client, Keys(prefix), ttl_s=3600, state_ttl_s=3600)
            out = []
            for n, (index, source, tag) in enumerate(arrivals):
                status = life[index]
                event = _event(
                    job_id,
                    status,
                    source,
                    stage_at=api_start + 60 * index,
                    local_at=api_start + skew + n * gap,
                    webhook_id=f"wh_{job_id}_{index}_{source}_{tag}",
                )
                result = await enqueuer.add(event.id, {RECORD_FIELD: encode_event(event)}, event)
                if result.new:
                    out.append((status, result.verdict))
            return out
        finally:
            await client.aclose()

    judged = asyncio.run(run())
    announced = [status for status, verdict in judged if verdict is not None and verdict.kind == "new"]
    assert all(verdict is not None for _, verdict in judged)
    assert len(announced) == len(set(announced)), f"announced twice: {announced}"
    assert announced.count(life[-1]) == 1, f"terminal {life[-1]} announced {announced.count(life[-1])} times"
    assert set(announced) <= set(life)
    # Nothing is announced after the terminal status.
    assert announced[-1] == life[-1], announced


def test_verdict_parse_round_trip() -> None:
    assert Verdict.parse(b"") is None
    assert Verdict.parse(b"repeat|succeeded|wh_1") == Verdict("repeat", "succeeded", "wh_1")
    assert Verdict.parse("repeat|succeeded|wh_1").skipped == "repeat of wh_1"  # type: ignore[union-attr]
    assert Verdict.parse(b"stale|failed|").skipped == "stale"  # type: ignore[union-attr]
    assert Verdict.parse(b"new||").skipped == ""  # type: ignore[union-attr]
