"""The HTTP edge against a real Redis/Valkey: every documented answer, and what (if anything) was stored."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as redis
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from processor.eventrecord import decode_event
from processor.models import FineTuningJob
from processor.receiver import create_app
from processor.settings import Settings
from processor.stream import RECORD_FIELD
from tests.conftest import compact, free_port, sample, signed

PATH = "/webhooks/openai"
Client = Callable[..., Any]


@pytest.fixture
async def client(aiohttp_client: Client, make_settings: Callable[..., Settings], redis_url: str) -> TestClient:
    settings = make_settings()
    return await aiohttp_client(create_app(settings, redis_url))


async def _events(rclient: redis.Redis, prefix: str) -> list[Any]:
    return await rclient.xrange(f"{prefix}:{{p0}}:events")


async def test_full_job_is_accepted_and_stored_as_sent(client: TestClient, rclient: redis.Redis, prefix: str) -> None:
    body = compact(sample("fine_tuning_job.failed.json"))
    resp = await client.post(PATH, data=body, headers=signed(body, "wh_full"))
    assert resp.status == 200
    answer = await resp.json()
    assert answer["status"] == "accepted" and answer["webhook_id"] == "wh_full"
    assert answer["job_id"] == "ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD" and answer["event_type"] == "fine_tuning.job.failed"
    [(entry_id, fields)] = await _events(rclient, prefix)
    assert entry_id.decode() == answer["entry_id"]
    event = decode_event(fields[RECORD_FIELD])
    assert event.job == msgspec.json.decode(body, type=FineTuningJob)
    assert (event.id, event.source) == ("wh_full", "push")


async def test_thin_envelope_is_accepted(client: TestClient, rclient: redis.Redis, prefix: str) -> None:
    body = compact(sample("webhook_event.fine_tuning.job.succeeded.json"))
    resp = await client.post(PATH, data=body, headers=signed(body))
    assert resp.status == 200 and (await resp.json())["status"] == "accepted"
    [(_, fields)] = await _events(rclient, prefix)
    event = decode_event(fields[RECORD_FIELD])
    assert (event.type, event.job_id, event.event_id, event.job) == (
        "fine_tuning.job.succeeded",
        "ftjob-7cQm2VfRZk1LwN8xTa4YpE3u",
        "evt_68ff4b09d3f48190a6c2e1b7f05d9a34",
        None,
    )


async def test_duplicate_webhook_id_is_enqueued_once(client: TestClient, rclient: redis.Redis, prefix: str) -> None:
    body = compact(sample("fine_tuning_job.succeeded.json"))
    first = await client.post(PATH, data=body, headers=signed(body, "wh_dup"))
    # A retry carries the same webhook-id with a new timestamp (and so a new signature).
    again = await client.post(PATH, data=body, headers=signed(body, "wh_dup"))
    assert first.status == again.status == 200
    a, b = await first.json(), await again.json()
    assert (a["status"], b["status"]) == ("accepted", "duplicate")
    assert a["entry_id"] == b["entry_id"]
    assert len(await _events(rclient, prefix)) == 1
    ttl = await rclient.ttl(f"{prefix}:{{p0}}:seen:wh_dup")
    assert ttl > 72 * 3600


async def test_signed_but_off_schema_is_quarantined(client: TestClient, rclient: redis.Redis, prefix: str) -> None:
    body = b'{"object":"fine_tuning.job","id":"ftjob-1","created_at":"yesterday","model":"m","status":"failed"}'
    resp = await client.post(PATH, data=body, headers=signed(body, "wh_q"))
    assert resp.status == 200
    answer = await resp.json()
    assert answer["status"] == "quarantined"
    assert "created_at" in answer["message"]
    assert await _events(rclient, prefix) == []
    [(_, fields)] = await rclient.xrange(f"{prefix}:{{q}}:quarantine")
    assert fields[b"body"] == body and fields[b"webhook_id"] == b"wh_q"
    assert b"created_at: Expected `int`, got `str`" in fields[b"error"]


def _job(**changes: Any) -> bytes:
    doc: dict[str, Any] = msgspec.json.decode(sample("fine_tuning_job.failed.json"))
    return msgspec.json.encode(doc | changes)


def _nested(depth: int) -> bytes:
    """A job whose `usage_metrics` nests `depth` arrays: the body nests depth + 2 levels."""
    return _job(usage_metrics={"a": "D"}).replace(b'"D"', b"[" * depth + b"]" * depth)


def _envelope(**changes: Any) -> bytes:
    doc: dict[str, Any] = msgspec.json.decode(sample("webhook_event.fine_tuning.job.succeeded.json"))
    return msgspec.json.encode(doc | changes)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_job(created_at=10**30), "an integer is out of range (more than 64 bits)"),
        (_job(finished_at=-(10**19)), "an integer is out of range (more than 64 bits)"),
        (_job(usage_metrics={"tokens": 2**64}), "an integer is out of range (more than 64 bits)"),
        (_envelope(created_at=int("9" * 400)), "an integer is out of range (more than 64 bits)"),
        (_job(id="x" * 129), "id: Expected `str` of length <= 128"),
        (_job(id="x" * 200_000), "id: Expected `str` of length <= 128"),
        (_job(id="../../files"), "id: Expected a job id (1 to 128 of A-Z a-z 0-9"),
        (_job(status="s" * 65), "status: Expected `str` of length <= 64"),
        (_job(status=""), "status: Expected `str` of length >= 1"),
        (_envelope(data={"id": "ftjob-a/b"}), "data.id: Expected a job id (1 to 128"),
        (_envelope(type="fine_tuning.job." + "x" * 65), "type: Expected `str` of length <= 80"),
        (_envelope(type="fine_tuning.job."), "type: `fine_tuning.job.` names no status"),  # found by a review
        (_envelope(id="evt_" + "x" * 125), "id: Expected `str` of length <= 128"),
        (_nested(63), "nested more than 64 levels deep"),  # its record could not be read back (a review)
        (_nested(5000), "nested more than 64 levels deep"),  # beyond msgspec's own limit: not a 500
    ],
    ids=lambda v: v[:40].decode(errors="replace") if isinstance(v, bytes) else v[:20],
)
async def test_signed_bodies_beyond_our_limits_are_quarantined(
    client: TestClient, rclient: redis.Redis, prefix: str, body: bytes, message: str
) -> None:
    """A huge integer (msgpack holds 64 bits) or an oversized or path-like id is a schema mismatch: 200
    quarantined, never a 500 the sender would retry for 72 h."""
    resp = await client.post(PATH, data=body, headers=signed(body))
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["status"] == "quarantined" and message in answer["message"]
    assert await _events(rclient, prefix) == []
    [(_, fields)] = await rclient.xrange(f"{prefix}:{{q}}:quarantine")
    assert fields[b"body"] == body


@pytest.mark.parametrize(
    ("webhook_id", "message"),
    [
        ("poll:ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD:failed", "webhook-id may contain only letters, digits"),
        ("wh_1:replayed", "webhook-id may contain only letters, digits"),
        ("wh|1", "webhook-id may contain only letters, digits"),
        ("wh/../1", "webhook-id may contain only letters, digits"),
        ("w" * 200, "webhook-id has 200 characters; at most 128 are accepted"),  # over 256: a 401 (signatures)
    ],
    ids=lambda v: v[:24],
)
async def test_webhook_ids_outside_their_grammar_are_refused(
    client: TestClient, rclient: redis.Redis, prefix: str, webhook_id: str, message: str
) -> None:
    """Internal ids (`poll:…`, `…:replayed`) contain `:`, so no header can collide with one; ids are bounded."""
    body = compact(sample("fine_tuning_job.failed.json"))
    resp = await client.post(PATH, data=body, headers=signed(body, webhook_id))
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "invalid_webhook_id" and message in answer["message"]
    unsigned = await client.post(PATH, data=body, headers=signed(body, webhook_id) | {"webhook-signature": "v1,AA"})
    assert unsigned.status == 401  # a stranger learns nothing more than "not signed"
    assert await _events(rclient, prefix) == []
    assert await rclient.xlen(f"{prefix}:{{q}}:quarantine") == 0
    assert [key async for key in rclient.scan_iter(match=f"{prefix}:{{p0}}:seen:*")] == []


async def test_webhook_ids_are_accepted_up_to_128_characters(client: TestClient) -> None:
    body = compact(sample("fine_tuning_job.failed.json"))
    usual = ["wh_685342e6c53c8190a1be43f081506c52", "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", "a.b-C_9" * 18 + "xy"]
    for webhook_id in usual:
        resp = await client.post(PATH, data=body, headers=signed(body, webhook_id))
        assert resp.status == 200 and (await resp.json())["webhook_id"] == webhook_id
    resp = await client.post(PATH, data=body, headers=signed(body, "w" * 129))
    assert resp.status == 400
    assert (await resp.json())["message"] == "webhook-id has 129 characters; at most 128 are accepted"


@pytest.mark.parametrize(
    ("body", "headers", "status", "error", "message"),
    [
        (b"{not json", "signed", 400, "invalid_json", "not valid JSON"),
        (b"\xff\xfe", "signed", 400, "invalid_json", "not valid JSON"),
        (b'{"object":"\x89"}', "signed", 400, "invalid_json", "not valid UTF-8"),  # found by the fuzzer
        (
            b"{}",
            {},
            401,
            "invalid_signature",
            "missing header: webhook-id, webhook-timestamp, webhook-signature",
        ),
        (b"{}", "bad-signature", 401, "invalid_signature", "does not match"),
        (b"{}", "old", 401, "invalid_signature", "s old"),
        (b"{}", "text/plain", 415, "unsupported_media_type", "application/json"),
    ],
)
async def test_rejects(
    client: TestClient,
    rclient: redis.Redis,
    prefix: str,
    body: bytes,
    headers: Any,
    status: int,
    error: str,
    message: str,
) -> None:
    if headers == "signed":
        headers = signed(body)
    elif headers == "bad-signature":
        headers = signed(body) | {"webhook-signature": "v1,AAAA"}
    elif headers == "old":
        from processor import signatures
        from tests.conftest import SECRET

        headers = signatures.signed_headers([signatures.parse_secret(SECRET)], "wh", body, timestamp=1000)
        headers["content-type"] = "application/json"
    elif headers == "text/plain":
        headers = signed(body) | {"content-type": "text/plain"}
    else:
        headers = {"content-type": "application/json"}
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.status == status
    answer = await resp.json()
    assert answer["error"] == error and message in answer["message"]
    assert await _events(rclient, prefix) == []
    assert await rclient.xlen(f"{prefix}:{{q}}:quarantine") == 0


async def test_oversized_body_is_refused_by_its_content_length(
    client: TestClient, rclient: redis.Redis, prefix: str
) -> None:
    body = b'{"pad":"' + b"x" * (300 * 1024) + b'"}'
    resp = await client.post(PATH, data=body, headers=signed(body))
    assert resp.status == 413
    assert "limit is 262144" in (await resp.json())["message"]
    assert await _events(rclient, prefix) == []


async def test_oversized_chunked_body_is_refused(client: TestClient, rclient: redis.Redis, prefix: str) -> None:
    async def chunks() -> Any:
        for _ in range(400):
            yield b"x" * 1024

    headers = signed(b"{}")
    resp = await client.post(PATH, data=chunks(), headers=headers)
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    assert await _events(rclient, prefix) == []


async def test_redis_down_answers_503_with_retry_after(
    aiohttp_client: Client, make_settings: Callable[..., Settings]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await aiohttp_client(create_app(make_settings(redis={"url": dead}), dead))
    body = compact(sample("fine_tuning_job.succeeded.json"))
    resp = await client.post(PATH, data=body, headers=signed(body))
    assert resp.status == 503
    assert resp.headers["Retry-After"].isdigit()
    assert (await resp.json())["error"] == "unavailable"
    ready = await client.get("/readyz")
    assert ready.status == 503 and "unreachable" in (await ready.json())["message"]


async def test_health_and_readiness(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_unknown_route_and_method_answer_json(client: TestClient) -> None:
    missing = await client.post("/nope", data=b"{}")
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"
    wrong = await client.get(PATH)
    assert wrong.status == 405


async def test_unsigned_mode_accepts_without_headers(
    aiohttp_client: Client,
    make_settings: Callable[..., Settings],
    redis_url: str,
    rclient: redis.Redis,
    prefix: str,
) -> None:
    settings = make_settings(receiver={"verify_signatures": False, "secrets": []})
    client = await aiohttp_client(create_app(settings, redis_url))
    body = compact(sample("fine_tuning_job.running.json"))
    resp = await client.post(PATH, data=body, headers={"content-type": "application/json"})
    assert resp.status == 200 and (await resp.json())["status"] == "accepted"
    assert len(await _events(rclient, prefix)) == 1
    # Without verification the id namespace is still kept.
    poll_id = {"content-type": "application/json", "webhook-id": "poll:ftjob-1:running"}
    resp = await client.post(PATH, data=body, headers=poll_id)
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_webhook_id"
    assert len(await _events(rclient, prefix)) == 1


async def test_concurrent_requests_share_round_trips(client: TestClient, rclient: redis.Redis, prefix: str) -> None:

    body = compact(sample("fine_tuning_job.succeeded.json"))
    ids = [f"wh_{uuid.uuid4().hex}" for _ in range(200)]
    answers = await asyncio.gather(*(client.post(PATH, data=body, headers=signed(body, i)) for i in ids))
    assert [a.status for a in answers] == [200] * 200
    assert await rclient.xlen(f"{prefix}:{{p0}}:events") == 200


async def test_metrics_count_outcomes(client: TestClient) -> None:
    def count(text: str, outcome: str) -> float:
        for line in text.splitlines():
            if line.startswith(f'ftjobs_requests_total{{outcome="{outcome}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = await (await client.get("/metrics")).text()
    body = compact(sample("fine_tuning_job.succeeded.json"))
    await client.post(PATH, data=body, headers=signed(body))
    await client.post(PATH, data=body, headers={"content-type": "application/json"})
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    after = await resp.text()
    assert count(after, "accepted") == count(before, "accepted") + 1
    assert count(after, "invalid_signature") == count(before, "invalid_signature") + 1
    assert "ftjobs_enqueue_seconds_bucket" in after


def _batch_event(event_id: str = "evt_b1") -> bytes:
    """An event of another kind that the same OpenAI endpoint may be subscribed to."""
    doc = {"object": "event", "id": event_id, "type": "batch.completed", "created_at": 1750000000}
    return msgspec.json.encode(doc | {"data": {"id": "batch_123"}})


async def test_events_that_are_not_about_fine_tuning_are_ignored(
    client: TestClient, rclient: redis.Redis, prefix: str
) -> None:
    body = _batch_event()
    resp = await client.post(PATH, data=body, headers=signed(body))
    answer = await resp.json()
    assert resp.status == 200 and answer["status"] == "ignored" and answer["event_type"] == "batch.completed"
    assert "accept_event_types" in answer["message"]
    assert await _events(rclient, prefix) == []
    assert [k async for k in rclient.scan_iter(match=f"{prefix}:job*")] == []  # no job state either


async def test_listed_event_types_are_accepted_without_job_state(
    aiohttp_client: Client, make_settings: Callable[..., Settings], redis_url: str, rclient: redis.Redis, prefix: str
) -> None:
    settings = make_settings(receiver={"accept_event_types": ["batch.completed"]})
    client = await aiohttp_client(create_app(settings, redis_url))
    body = _batch_event()
    resp = await client.post(PATH, data=body, headers=signed(body))
    assert resp.status == 200 and (await resp.json())["status"] == "accepted"
    [(_, fields)] = await _events(rclient, prefix)
    assert b"v" not in fields  # not judged against any job
    assert [k async for k in rclient.scan_iter(match=f"{prefix}:job*")] == []


async def test_stalled_redis_answers_503_within_the_enqueue_deadline(
    aiohttp_client: Client, make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    """SIGSTOP, not kill: the socket stays open and nothing answers. The sender gets a 503 that says the write
    may have been applied, instead of its own timeout; /readyz answers too."""
    import os
    import signal

    import aiohttp

    from processor.embedded import EmbeddedValkey

    server = EmbeddedValkey(tmp_path / "stalled")
    server.start()
    assert server.pid is not None
    try:
        settings = make_settings(redis={"url": server.url}, receiver={"enqueue_timeout_s": 0.3})
        client = await aiohttp_client(create_app(settings, server.url))
        body = compact(sample("fine_tuning_job.succeeded.json"))
        assert (await client.post(PATH, data=body, headers=signed(body))).status == 200
        os.kill(server.pid, signal.SIGSTOP)
        try:
            # A sender that gives up after 4 s, as many do (the old path took 5 s per stalled batch, in turn).
            patience = aiohttp.ClientTimeout(total=4)
            answers = await asyncio.gather(
                *(client.post(PATH, data=body, headers=signed(body), timeout=patience) for _ in range(6))
            )
            for resp in answers:
                assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
                assert "may or may not be stored" in (await resp.json())["message"]
            ready = await client.get("/readyz", timeout=patience)
            assert ready.status == 503 and "did not answer" in (await ready.json())["message"]
        finally:
            os.kill(server.pid, signal.SIGCONT)
    finally:
        server.stop()


def _count(text: str, outcome: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'ftjobs_requests_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_an_internal_error_is_counted_and_logged_in_one_line(
    aiohttp_client: Client, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    """A bug behind the middleware: a JSON 500, `internal_error` in the metrics, one log line, no traceback."""
    app = create_app(make_settings(), redis_url)

    async def broken(request: web.Request) -> web.Response:
        raise OverflowError("int too large to convert to float")

    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    before = await (await client.get("/metrics")).text()
    with structlog.testing.capture_logs() as logs:
        resp = await client.get("/broken")
    assert resp.status == 500 and (await resp.json())["error"] == "internal_error"
    after = await (await client.get("/metrics")).text()
    assert _count(after, "internal_error") == _count(before, "internal_error") + 1
    [line] = [entry for entry in logs if entry["event"] == "request_failed"]
    assert line["error"] == "OverflowError" and line["at"].startswith("test_receiver.py:")
    assert "exc_info" not in line and "int too large" not in str(line)


async def test_metrics_on_their_own_listener(
    aiohttp_client: Client, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    """With `metrics_port` set, `/metrics` leaves the webhook port and is served on loopback by default."""
    port = free_port()
    settings = make_settings(receiver={"metrics_port": port})
    assert settings.receiver.metrics_host == "127.0.0.1"
    client = await aiohttp_client(create_app(settings, redis_url))
    assert (await client.get("/metrics")).status == 404
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200 and "ftjobs_requests_total" in await resp.text()
    await client.close()  # the listener closes with the app
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics"):
            pass
