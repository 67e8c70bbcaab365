"""OpenAI integration against a local fake API: the client, hydration, the poller and job state."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from processor.errors import PermanentFailure, RetryLater
from processor.hydration import API_LAG_S
from processor.jobstate import JobState
from processor.keys import Keys
from processor.models import Event, decode_job
from processor.openai import JobNotFound, OpenAIAuthError, OpenAIClient, OpenAIError
from processor.runtime import open_runtime
from processor.settings import OpenAISettings, Settings
from tests.conftest import compact, eventually, make_poller, sample, sink
from tests.fake_openai import KEY, FakeOpenAI
from tests.fake_targets import Recorder, catch_all_app, redirect_app

SUCCEEDED = "fine_tuning_job.succeeded.json"
JOB_ID = "ftjob-7cQm2VfRZk1LwN8xTa4YpE3u"


def job_doc(name: str = SUCCEEDED, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode(sample(name))
    return doc | changes


@pytest.fixture
async def api(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    yield fake, str(server.make_url("/v1"))


def openai_table(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"api_key": KEY, "base_url": base_url, "timeout_s": 2.0, "max_retries": 2, "hydrate_retry_s": 0.2} | extra


def thin(job_id: str = JOB_ID, status: str = "succeeded") -> bytes:
    body = {
        "object": "event",
        "id": f"evt_{job_id}_{status}",
        "type": f"fine_tuning.job.{status}",
        "created_at": int(time.time()),
        "data": {"id": job_id},
    }
    return msgspec.json.encode(body)


# The client


async def test_client_decodes_live_quirks(api: tuple[FakeOpenAI, str]) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc(
        error={},
        status="paused",
        user_provided_suffix="v3",
        usage_metrics={"x": 1},
        shared_with_openai=False,
        eval_id=None,
        something_new=[1, 2],
    )
    async with OpenAIClient(OpenAISettings(**openai_table(url), organization="org-1", project="proj-1")) as client:
        job = await client.retrieve_job(JOB_ID)
        events = await client.list_events(JOB_ID)
    assert job.status == "paused" and job.failed_error is None and job.user_provided_suffix == "v3"
    assert events.data[0].message == "Job started"
    assert fake.headers[0]["OpenAI-Organization"] == "org-1" and fake.headers[0]["OpenAI-Project"] == "proj-1"


async def test_client_lists_with_pagination_and_metadata_filter(api: tuple[FakeOpenAI, str]) -> None:
    fake, url = api
    for i in range(5):
        fake.jobs[f"ftjob-{i}"] = job_doc(
            id=f"ftjob-{i}", created_at=1000 + i, metadata={"team": "search" if i % 2 else "support"}
        )
    async with OpenAIClient(OpenAISettings(**openai_table(url))) as client:
        everything = [j.id async for j in client.iter_jobs(page_size=2)]
        search = [j.id async for j in client.iter_jobs(page_size=2, metadata={"team": "search"})]
    assert everything == ["ftjob-4", "ftjob-3", "ftjob-2", "ftjob-1", "ftjob-0"]
    assert search == ["ftjob-3", "ftjob-1"]
    assert fake.calls["/v1/fine_tuning/jobs"] == 3 + 1


async def test_client_retries_429_and_5xx(api: tuple[FakeOpenAI, str]) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc()
    fake.failures[JOB_ID] = [429, 500]
    async with OpenAIClient(OpenAISettings(**openai_table(url))) as client:
        job = await client.retrieve_job(JOB_ID)
    assert job.id == JOB_ID and fake.calls[f"/v1/fine_tuning/jobs/{JOB_ID}"] == 3


async def test_client_errors_are_clear(api: tuple[FakeOpenAI, str]) -> None:
    fake, url = api
    fake.failures[JOB_ID] = [500, 500, 500]
    async with OpenAIClient(OpenAISettings(**openai_table(url))) as client:
        with pytest.raises(JobNotFound, match="Could not find fine-tune job: ftjob-nope"):
            await client.retrieve_job("ftjob-nope")
        with pytest.raises(OpenAIError, match="500"):
            await client.retrieve_job(JOB_ID)
    async with OpenAIClient(OpenAISettings(**openai_table(url) | {"api_key": "sk-wrong-key-456"})) as client:
        with pytest.raises(OpenAIAuthError) as info:
            await client.retrieve_job(JOB_ID)
    assert "401" in str(info.value) and "Incorrect API key" in str(info.value)
    assert "sk-wrong-key-456" not in str(info.value) and KEY not in str(info.value)


async def test_client_timeouts_are_bounded(api: tuple[FakeOpenAI, str]) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc()
    fake.delay_s = 1.0
    async with OpenAIClient(OpenAISettings(**openai_table(url) | {"timeout_s": 0.2, "max_retries": 1})) as client:
        with pytest.raises(OpenAIError):
            await client.retrieve_job(JOB_ID)
    assert fake.calls[f"/v1/fine_tuning/jobs/{JOB_ID}"] == 2


async def test_client_puts_a_job_id_in_one_path_segment(api: tuple[FakeOpenAI, str]) -> None:
    fake, url = api
    async with OpenAIClient(OpenAISettings(**openai_table(url))) as client:
        with pytest.raises(JobNotFound, match=re.escape("Could not find fine-tune job: ftjob-a/../../files")):
            await client.retrieve_job("ftjob-a/../../files?purpose=x#y")
        for dots in (".", ".."):
            with pytest.raises(JobNotFound, match="is not a job id"):
                await client.list_events(dots)
    assert dict(fake.calls) == {"/v1/fine_tuning/jobs/ftjob-a%2F..%2F..%2Ffiles%3Fpurpose=x%23y": 1}


async def test_client_does_not_follow_a_redirect(aiohttp_server: Callable[..., Any]) -> None:
    elsewhere: Recorder = []
    other = await aiohttp_server(catch_all_app(elsewhere))
    api = await aiohttp_server(redirect_app(lambda: str(other.make_url("/v1/steal")), status=307))
    async with OpenAIClient(OpenAISettings(**openai_table(str(api.make_url("/v1"))))) as client:
        with pytest.raises(OpenAIError) as info:
            await client.retrieve_job(JOB_ID)
    assert elsewhere == []
    assert f"redirected (307) to http://127.0.0.1:{other.port}/…/steal; check openai.base_url" in str(info.value)


# Hydration


async def test_thin_webhook_reaches_handlers_as_a_full_job_fetched_once(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc()
    handlers = [sink("a", redis_url, prefix), sink("b", redis_url, prefix), sink("c", redis_url, prefix)]
    async with rig(handlers, openai=openai_table(url)) as r:
        await r.post(thin())

        async def all_three() -> bool:
            return all([len(await r.delivered(n)) == 1 for n in "abc"])

        await eventually(all_three)
        for name in "abc":
            [event] = await r.delivered(name)
            assert event.job == decode_job(sample(SUCCEEDED))
    assert fake.calls[f"/v1/fine_tuning/jobs/{JOB_ID}"] == 1


async def test_a_cached_job_another_version_wrote_is_fetched_again(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    """A hydration cache entry this release cannot read (written by another version, or damaged) is a miss:
    the job is fetched again. It raised in the batch's preparation, so the batch failed again and again."""
    fake, url = api
    fake.jobs[JOB_ID] = job_doc()
    async with rig([sink("a", redis_url, prefix)], openai=openai_table(url)) as r:
        await r.rclient.set(Keys(prefix).hydrated("wh_cached"), b"\xc1 not a job")
        await r.post(thin(), webhook_id="wh_cached")

        async def delivered() -> bool:
            return len(await r.delivered("a")) == 1

        await eventually(delivered)
        [event] = await r.delivered("a")
        assert event.job == decode_job(sample(SUCCEEDED))
    assert fake.calls[f"/v1/fine_tuning/jobs/{JOB_ID}"] == 1


async def test_missing_job_is_dead_lettered_with_the_reason(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    _, url = api
    async with rig([sink("a", redis_url, prefix)], openai=openai_table(url)) as r:
        await r.post(thin("ftjob-gone"))

        async def dead() -> bool:
            return len(await r.dead("a")) == 1

        await eventually(dead)
        assert b"job ftjob-gone not found" in (await r.dead("a"))[0][b"error"]


async def test_a_dead_letter_for_a_missing_job_replays_once_the_job_is_found(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    """The API answered 404 (the key of another project, or a job the API did not show yet): the event is
    dead-lettered. Once the API finds the job, a replay asks it again and is delivered, instead of failing at
    once on the 404 remembered for the first attempt."""
    fake, url = api
    async with rig([sink("a", redis_url, prefix)], openai=openai_table(url)) as r:
        await r.post(thin("ftjob-late"))

        async def dead() -> bool:
            return len(await r.dead("a")) == 1

        await eventually(dead)
        fake.jobs["ftjob-late"] = job_doc(id="ftjob-late")
        async with open_runtime(r.settings, redis_url) as runtime:
            [letter] = await runtime.dead_letters.letters("a")
            await runtime.dead_letters.replay("a", [letter.id])

        async def delivered() -> bool:
            return len(await r.delivered("a")) == 1

        await eventually(delivered)
        [event] = await r.delivered("a")
        assert event.job is not None and event.job.id == "ftjob-late" and await r.dead("a") == []
    assert fake.calls["/v1/fine_tuning/jobs/ftjob-late"] == 2


async def test_a_webhook_ahead_of_the_api_waits_for_the_api_to_show_its_status(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    """`succeeded` arrives while the API still shows the job `running`: routed on that job, a rule on
    `succeeded` would filter it out, and the poller's later `succeeded` is a repeat of it; nobody would hear
    of the success. The event waits until the API shows it, then is delivered once."""
    fake, url = api
    fake.jobs["ftjob-lag"] = job_doc(id="ftjob-lag", status="running", finished_at=None, fine_tuned_model=None)
    handlers = [sink("done", redis_url, prefix, when={"status": "succeeded"})]
    async with rig(handlers, openai=openai_table(url, poll_backfill=True)) as r:
        await r.post(thin("ftjob-lag"))

        async def asked_twice() -> bool:
            return fake.calls["/v1/fine_tuning/jobs/ftjob-lag"] >= 2

        await eventually(asked_twice)
        assert await r.delivered("done") == []
        fake.jobs["ftjob-lag"] = job_doc(id="ftjob-lag")
        async with OpenAIClient(r.settings.openai) as client:
            await make_poller(r.settings, r.rclient, client).poll_once(now=0)  # sees it too: a repeat

        async def delivered() -> bool:
            return len(await r.delivered("done")) == 1 and await r.settled()

        await eventually(delivered)
        [event] = await r.delivered("done")
        assert event.job is not None and event.job.status == "succeeded" and event.source == "webhook"


async def test_a_webhook_the_api_never_catches_up_with_is_dead_lettered_after_an_hour(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    """The wait for the API to show a webhook's status is bounded: an hour after the event came, the API
    still showing `running` for a `succeeded` event is a dead letter saying so, not a retry for ever."""
    fake, url = api
    fake.jobs["ftjob-stuck"] = job_doc(id="ftjob-stuck", status="running", finished_at=None, fine_tuned_model=None)
    now = time.time()

    def event(received_at: float) -> Event:
        return Event(
            id=f"wh_{received_at}",
            type="fine_tuning.job.succeeded",
            job_id="ftjob-stuck",
            source="webhook",
            created_at=int(received_at),
            received_at=received_at,
        )

    handlers = [sink("a", redis_url, prefix)]
    async with rig(handlers, openai=openai_table(url)) as r, open_runtime(r.settings, redis_url) as rt:
        events = [event(now), event(now - 300), event(now - API_LAG_S + 60), event(now - API_LAG_S - 1)]
        fresh, later, last, old = await (await rt.preparer()).prepare_many(events)
    assert isinstance(fresh, RetryLater) and "not 'succeeded' yet" in str(fresh)
    # It asks again soon at first, then less and less often (a tenth of the event's age, at most a minute).
    assert isinstance(later, RetryLater) and isinstance(last, RetryLater)
    assert fresh.after == 0.2 and later.after == pytest.approx(30, abs=1) and last.after == 60
    assert isinstance(old, PermanentFailure) and "60 minutes after the event came" in str(old)


async def test_a_job_id_that_leaves_its_path_is_quarantined_and_never_fetched(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc()
    async with rig([sink("a", redis_url, prefix)], openai=openai_table(url)) as r:
        for job_id in ("../../files", "..", "ftjob-1/../../../models", "ftjob-1?x=1", "ftjob-%2e%2e", "x" * 129):
            answer = await r.post(thin(job_id))
            assert answer["status"] == "quarantined" and "id: Expected " in answer["message"], job_id
        await r.post(thin())

        async def delivered() -> bool:
            return len(await r.delivered("a")) == 1

        await eventually(delivered)
        await eventually(r.settled)
    assert dict(fake.calls) == {f"/v1/fine_tuning/jobs/{JOB_ID}": 1}


async def test_api_outage_delays_only_the_thin_event(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc()
    fake.failures[JOB_ID] = [503] * 6  # three failed hydrations (each retried twice by the client)
    async with rig([sink("a", redis_url, prefix)], openai=openai_table(url)) as r:
        await r.post(thin())
        await r.post(compact(sample("fine_tuning_job.failed.json")))  # a full job flows meanwhile

        async def other_first() -> bool:
            return [e.job_id for e in await r.delivered("a")] == ["ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD"]

        await eventually(other_first)

        async def hydrated_later() -> bool:
            return len(await r.delivered("a")) == 2

        await eventually(hydrated_later, within=30)
        assert await r.dead("a") == []


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "usage_metrics",
    [{"tokens": 2**64}, {"tokens": -(2**63) - 1}, {"deep": _nested(70)}],
    ids=["over-2**64", "under-2**63", "nested-70"],
)
async def test_client_refuses_a_job_a_stream_record_cannot_hold(
    api: tuple[FakeOpenAI, str], usage_metrics: dict[str, Any]
) -> None:
    """An answer whose job could not become a stream record (an integer beyond 64 bits, or nesting beyond the
    webhook limit, in a free-form field) is an unexpected document, like a schema mismatch."""
    fake, url = api
    fake.jobs[JOB_ID] = job_doc(usage_metrics=usage_metrics)
    async with OpenAIClient(OpenAISettings(**openai_table(url))) as client:
        with pytest.raises(OpenAIError, match="unexpected document"):
            await client.retrieve_job(JOB_ID)
        page = await client.list_jobs()
    [(job_id, why)] = page.skipped
    assert page.data == [] and job_id == JOB_ID and "unexpected document" in why


async def test_a_hydrated_job_with_a_too_large_integer_does_not_stop_the_batch(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str
) -> None:
    """The API's job carried an integer beyond 64 bits in `usage_metrics`: caching it raised `OverflowError`
    while the batch was prepared, so the batch (and every event after it) failed again and again. Now the
    thin event waits like during an outage, and the others are delivered."""
    fake, url = api
    fake.jobs[JOB_ID] = job_doc(usage_metrics={"tokens": 2**64})
    async with rig([sink("a", redis_url, prefix)], openai=openai_table(url)) as r:
        await r.post(thin())
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def other_delivered() -> bool:
            return [e.job_id for e in await r.delivered("a")] == ["ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD"]

        await eventually(other_delivered)
        assert await r.dead("a") == []


# Poller and job state


async def test_poller_and_webhook_give_three_transitions_and_one_notification(
    rig: Any, api: tuple[FakeOpenAI, str], redis_url: str, prefix: str, make_settings: Callable[..., Settings]
) -> None:
    fake, url = api
    handlers = [sink("all", redis_url, prefix), sink("done", redis_url, prefix, when={"status": "succeeded"})]
    async with rig(handlers, openai=openai_table(url)) as r:
        async with OpenAIClient(r.settings.openai) as client:
            poller = make_poller(r.settings, r.rclient, client)
            await poller.poll_once()  # first start: nothing yet
            fake.jobs[JOB_ID] = job_doc(status="queued", created_at=int(time.time()), finished_at=None)
            for status in ("queued", "running", "succeeded"):
                fake.jobs[JOB_ID]["status"] = status
                assert await poller.poll_once() == 1
                assert await poller.poll_once() == 0  # no change, no event

                async def seen(n: int = {"queued": 1, "running": 2, "succeeded": 3}[status]) -> bool:
                    return len(await r.delivered("all")) == n

                await eventually(seen)
        answer = await r.post(thin())  # OpenAI's webhook for the same success, arriving after the poll
        assert answer["status"] == "accepted"
        await r.post(compact(msgspec.json.encode(job_doc(status="running", created_at=int(time.time())))))

        await eventually(r.settled)
        delivered = await r.delivered("all")
        assert [(e.status, e.previous_status) for e in delivered] == [
            ("queued", None),
            ("running", "queued"),
            ("succeeded", "running"),
        ]
        assert [e.source for e in delivered] == ["poll", "poll", "poll"]
        assert len(await r.delivered("done")) == 1
        timeline = await JobState(r.rclient, Keys(prefix), 3600).timeline(JOB_ID)
        assert [(t.status, t.source, t.skipped) for t in timeline] == [
            ("queued", "poll", ""),
            ("running", "poll", ""),
            ("succeeded", "poll", ""),
            ("succeeded", "webhook", f"repeat of poll:{JOB_ID}:succeeded"),
            ("running", "push", "stale"),
        ]
        # The webhook was judged a repeat of the poll, the late `running` push stale: the verdict is in each entry.
        verdicts = [f[b"v"].decode() for _, f in await r.rclient.xrange(f"{prefix}:{{p0}}:events")]
        assert verdicts == [
            "new||",
            "new|queued|",
            "new|running|",
            f"repeat|succeeded|poll:{JOB_ID}:succeeded",
            "stale|succeeded|",
        ]


async def test_first_start_does_not_flood_unless_backfilling(
    api: tuple[FakeOpenAI, str], make_settings: Callable[..., Settings], rclient: Any, prefix: str
) -> None:
    fake, url = api
    for i in range(3):
        fake.jobs[f"ftjob-old-{i}"] = job_doc(id=f"ftjob-old-{i}", created_at=1000 + i)
    quiet = make_settings(openai=openai_table(url))
    async with OpenAIClient(quiet.openai) as client:
        assert await make_poller(quiet, rclient, client).poll_once() == 0
        fake.jobs["ftjob-old-0"]["status"] = "cancelled"  # an old job changing later is announced
        fake.jobs["ftjob-new"] = job_doc(id="ftjob-new", created_at=int(time.time()) + 5)
        assert await make_poller(quiet, rclient, client).poll_once() == 2
    other = f"{prefix}-backfill"
    loud = make_settings(openai=openai_table(url, poll_backfill=True), redis={"prefix": other})
    async with OpenAIClient(loud.openai) as client:
        assert await make_poller(loud, rclient, client).poll_once() == 4  # every job


async def test_a_listed_job_that_cannot_be_read_is_skipped_and_the_others_are_polled(
    api: tuple[FakeOpenAI, str], make_settings: Callable[..., Settings], rclient: Any
) -> None:
    """A job with an integer beyond 64 bits raised `OverflowError` while its event was encoded (`ftjobs poll`
    ended with a traceback); then one such job failed every poll as an API error, hiding every other job.
    Now it is skipped (logged), on every page, and the pages after it are still followed."""
    fake, url = api
    now = int(time.time())
    for n in range(5):  # pages of 2, newest first: bad (ftjob-4), 3 | 2, bad (ftjob-1) | 0
        bad = {"usage_metrics": {"n": -(2**64)}} if n in (1, 4) else {}
        fake.jobs[f"ftjob-{n}"] = job_doc(id=f"ftjob-{n}", created_at=now + n, **bad)
    settings = make_settings(openai=openai_table(url, poll_backfill=True))
    async with OpenAIClient(settings.openai) as client:
        page = await client.list_jobs(limit=2)
        assert [j.id for j in page.data] == ["ftjob-3"] and page.last_id == "ftjob-3"
        assert [job_id for job_id, _ in page.skipped] == ["ftjob-4"] and "out of range" in page.skipped[0][1]
        assert [j.id async for j in client.iter_jobs(page_size=2)] == ["ftjob-3", "ftjob-2", "ftjob-0"]
        assert await make_poller(settings, rclient, client).poll_once() == 3


async def test_a_job_unreadable_for_a_poll_keeps_what_the_poller_saw(
    api: tuple[FakeOpenAI, str], make_settings: Callable[..., Settings], rclient: Any
) -> None:
    """A job listed but unreadable is still in the listing: the poller keeps the status it saw. Forgotten as
    if it had left the listing, its next status had no previous one, and for a job older than the poller's
    first start that means quiet: its `succeeded` was never announced."""
    fake, url = api
    for job_id, created_at in (("ftjob-a", 1000), ("ftjob-b", 999)):  # both older than the first start
        fake.jobs[job_id] = job_doc(id=job_id, status="running", created_at=created_at, finished_at=None)
    settings = make_settings(openai=openai_table(url))
    async with OpenAIClient(settings.openai) as client:
        poller = make_poller(settings, rclient, client)
        assert await poller.poll_once() == 0  # seen, not announced (no backfill)
        fake.jobs["ftjob-a"]["usage_metrics"] = {"n": 2**64}  # unreadable for one poll
        assert await poller.poll_once() == 0
        assert await rclient.hget(poller.seen_key, "ftjob-a") == b"running"
        fake.jobs["ftjob-a"] = job_doc(id="ftjob-a", created_at=1000)  # succeeded
        assert await poller.poll_once() == 1


async def test_the_pollers_memory_is_as_large_as_one_listing(
    api: tuple[FakeOpenAI, str], make_settings: Callable[..., Settings], rclient: Any, prefix: str
) -> None:
    fake, url = api
    for i in range(3):
        fake.jobs[f"ftjob-old-{i}"] = job_doc(id=f"ftjob-old-{i}", created_at=1000 + i)
    settings = make_settings(openai=openai_table(url))
    async with OpenAIClient(settings.openai) as client:
        poller = make_poller(settings, rclient, client)
        await poller.poll_once()
        assert await rclient.hlen(poller.seen_key) == 3
        del fake.jobs["ftjob-old-0"]  # out of the listing (newest first: it never comes back)
        await poller.poll_once()
        assert sorted(await rclient.hkeys(poller.seen_key)) == [b"ftjob-old-1", b"ftjob-old-2"]


# The command line


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    import asyncio
    import sys

    from tests.conftest import ROOT

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "processor",
        *args,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)} | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_poll_jobs_and_job_commands(
    api: tuple[FakeOpenAI, str], redis_url: str, prefix: str, rclient: Any, tmp_path: Any
) -> None:
    fake, url = api
    fake.jobs[JOB_ID] = job_doc(created_at=int(time.time()) + 1)
    config = tmp_path / "ftjobs.toml"
    config.write_text(f'[redis]\nprefix = "{prefix}"\n[openai]\nbase_url = "{url}"\n')
    env = {"REDIS_URL": redis_url, "OPENAI_API_KEY": KEY, "FTJOBS_CONFIG": str(config)}
    code, out, err = await run_cli("poll", "--once", env=env)
    assert (code, out.strip()) == (0, "enqueued 1 status change(s)"), err
    code, out, _ = await run_cli("jobs", env=env)  # enqueueing recorded the transition
    assert code == 0 and JOB_ID in out and "succeeded" in out
    code, out, _ = await run_cli("job", JOB_ID, env=env)
    assert code == 0 and "(new) → succeeded" in out and "via poll" in out
    code, _, err = await run_cli("job", "ftjob-unknown", env=env)
    assert code == 1 and "no status changes recorded" in err
    code, _, err = await run_cli("poll", "--once", env={"REDIS_URL": redis_url, "FTJOBS_CONFIG": str(config)})
    assert code == 2 and "OPENAI_API_KEY" in err
