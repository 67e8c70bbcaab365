"""The Slack handler end to end: real worker, real Redis, a local server that checks Block Kit."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
import redis.asyncio as redis
import structlog

from handlers.slack import SlackHandler, SlackOptions
from processor.eventrecord import decode_event, encode_event
from processor.handler import Delivery, HandlerContext
from processor.models import Event, decode_job
from tests.conftest import build_fails, compact, eventually, sample
from tests.fake_targets import Recorder, catch_all_app, redirect_app, slack_app

HOOK_SECRET_PATH = "T000/B000/s3cr3tHookPart"


def failed_with_metadata(**metadata: str) -> bytes:
    doc = msgspec.json.decode(sample("fine_tuning_job.failed.json"))
    doc["metadata"] = metadata
    return msgspec.json.encode(doc)


def texts(message: dict[str, Any]) -> str:
    return msgspec.json.encode(message).decode()


def live_tokens(message: dict[str, Any]) -> list[str]:
    """Everything Slack would act on in a message: each `<...>` (a link, or a mention such as `<!channel>`)
    in the fallback text and in every mrkdwn text of the blocks."""
    mrkdwn = [message["text"]]
    for block in message["attachments"][0]["blocks"]:
        parts = [block.get("text"), *block.get("fields", []), *block.get("elements", [])]
        mrkdwn += [part["text"] for part in parts if part and part["type"] == "mrkdwn"]
    return [token for text in mrkdwn for token in re.findall(r"<([^<>]*)>", text)]


async def test_failed_job_posts_a_block_kit_message(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    handler = {
        "name": "slack",
        "type": "slack",
        "webhook_url": str(server.make_url("/hook")),
        "when": {"status": ["failed", "cancelled"]},
    }
    async with rig([handler]) as r:
        await r.post(compact(sample("fine_tuning_job.succeeded.json")))
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def posted() -> bool:
            return len(seen) == 1

        await eventually(posted)
        message = seen[0]["json"]
        attachment = message["attachments"][0]
        assert attachment["color"] == "#d40e0d"
        assert attachment["blocks"][0]["text"]["text"] == "❌ Fine-tuning job failed"
        body = texts(message)
        assert "invalid_training_file" in body and "Line 214" in body
        assert "gpt-4o-mini-2024-07-18" in body
        assert "https://platform.openai.com/finetune/ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD" in body


async def test_user_text_cannot_mention_or_link(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    handler = {
        "name": "slack",
        "type": "slack",
        "webhook_url": str(server.make_url("/hook")),
        "text": "Owner: {{ metadata.owner }}",
    }
    async with rig([handler]) as r:
        await r.post(failed_with_metadata(owner="<!channel> <https://evil.example|click>", note="a & b"))

        async def posted() -> bool:
            return len(seen) == 1

        await eventually(posted)
        body = texts(seen[0]["json"])
        assert "<!channel>" not in body and "<https://evil" not in body
        assert "&lt;!channel&gt;" in body and "&lt;https://evil.example|click&gt;" in body
        assert "a &amp; b" in body


async def test_error_text_cannot_mention_or_link(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    doc = msgspec.json.decode(sample("fine_tuning_job.failed.json"))
    doc["error"] = {"code": "<!here>", "message": "<!channel> see <https://evil.example|the fix> & retry"}
    async with rig([{"name": "slack", "type": "slack", "webhook_url": str(server.make_url("/hook"))}]) as r:
        await r.post(msgspec.json.encode(doc))

        async def posted() -> bool:
            return len(seen) == 1

        await eventually(posted)
    message = seen[0]["json"]
    job_id = doc["id"]
    # The one live token in the whole message is our own dashboard link.
    assert live_tokens(message) == [f"https://platform.openai.com/finetune/{job_id}|{job_id}"]
    assert "&lt;!channel&gt; see &lt;https://evil.example|the fix&gt; &amp; retry" in texts(message)


async def test_job_id_cannot_mention_or_link(
    rig: Any, aiohttp_server: Callable[..., Any], rclient: redis.Redis, prefix: str
) -> None:
    """Such an id is quarantined at the receiver (its schema); and an event carrying one anyway (built by
    another producer or a plug-in) still cannot put a mention or a link of its own into the message."""
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    bad_id = "ftjob-x><!channel>|<https://evil.example|click>&"
    job = msgspec.structs.replace(decode_job(sample("fine_tuning_job.failed.json")), id=bad_id)
    async with rig([{"name": "slack", "type": "slack", "webhook_url": str(server.make_url("/hook"))}]) as r:
        answer = await r.post(msgspec.json.encode(job))
        assert answer["status"] == "quarantined" and "(id: Expected a job id (1 to 128" in answer["message"]
    handler = SlackHandler("slack", SlackOptions(webhook_url=str(server.make_url("/hook"))))
    await handler.setup(HandlerContext(redis=rclient, key_prefix=f"{prefix}:h:slack"))
    try:
        event = Event.from_body(job, webhook_id="wh_other_producer", received_at=time.time())
        await handler(Delivery(event=event, handler="slack", attempt=1, idempotency_key="slack:wh_other_producer"))
    finally:
        await handler.close()
    [request] = seen
    label = "ftjob-x&gt;&lt;!channel&gt;|&lt;https://evil.example|click&gt;&amp;"
    assert live_tokens(request["json"]) == [f"https://platform.openai.com/finetune/{quote(bad_id, safe='')}|{label}"]


async def test_status_cannot_mention_or_link(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    """A status is sender text too (a pushed job's, or the end of a thin event's type), and the message's
    fallback `text`, which Slack shows and notifies with, is mrkdwn."""
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    pushed = msgspec.json.decode(sample("fine_tuning_job.failed.json")) | {"status": "<!channel>"}
    thin = {
        "id": "evt_status_text",
        "object": "event",
        "type": "fine_tuning.job.<!here|x>",
        "created_at": int(time.time()),
        "data": {"id": "ftjob-thin-status"},
    }
    async with rig([{"name": "slack", "type": "slack", "webhook_url": str(server.make_url("/hook"))}]) as r:
        await r.post(msgspec.json.encode(pushed))
        await r.post(msgspec.json.encode(thin))

        async def posted() -> bool:
            return len(seen) == 2

        await eventually(posted)
    by_text = {request["json"]["text"]: request["json"] for request in seen}  # delivered in either order
    expected = {pushed["id"]: "&lt;!channel&gt;", "ftjob-thin-status": "&lt;!here|x&gt;"}
    for job_id, status in expected.items():
        [message] = [m for text, m in by_text.items() if text.endswith(f" {status}: {job_id}")]
        assert live_tokens(message) == [f"https://platform.openai.com/finetune/{job_id}|{job_id}"]


async def test_redirect_is_dead_lettered_and_not_followed(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    elsewhere: Recorder = []
    other = await aiohttp_server(catch_all_app(elsewhere))
    server = await aiohttp_server(redirect_app(lambda: str(other.make_url("/collect")), status=302))
    url = str(server.make_url(f"/hook/{HOOK_SECRET_PATH}"))
    async with rig([{"name": "slack", "type": "slack", "webhook_url": url}]) as r:
        with structlog.testing.capture_logs() as logs:
            await r.post(compact(sample("fine_tuning_job.failed.json")))

            async def dead() -> bool:
                return len(await r.dead("slack")) == 1

            await eventually(dead)
        error = (await r.dead("slack"))[0][b"error"].decode()
    assert elsewhere == []
    assert f"redirected (302) to {other.make_url('/collect')}; redirects are not followed" in error
    assert not [line for line in logs if line["event"] == "event_delivered"]
    assert HOOK_SECRET_PATH not in error and HOOK_SECRET_PATH not in repr(logs)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for i in range(400) %}{{ job.id }} {% endfor %}", "cut"),  # ~12,000 characters
        ("{% if false %}never{% endif %}  ", "absent"),  # renders empty (or blank)
    ],
)
async def test_text_block_is_cut_to_block_kits_limit_and_never_empty(
    rig: Any, aiohttp_server: Callable[..., Any], template: str, expected: str
) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))  # refuses (400) what Slack would refuse
    handler = {"name": "slack", "type": "slack", "webhook_url": str(server.make_url("/hook")), "text": template}
    async with rig([handler]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def posted() -> bool:
            return len(seen) == 1

        await eventually(posted)
        await eventually(r.settled)
        assert await r.dead("slack") == []
        sections = [b for b in seen[0]["json"]["attachments"][0]["blocks"] if b["type"] == "section" and "text" in b]
        texts_ = [b["text"]["text"] for b in sections]
        if expected == "cut":
            assert len(texts_[0]) == 3000 and texts_[0].endswith("…")
        else:
            assert all(t.strip() for t in texts_) and not any("never" in t for t in texts_)


async def test_redelivery_does_not_post_twice(rig: Any, aiohttp_server: Callable[..., Any], prefix: str) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    async with rig([{"name": "slack", "type": "slack", "webhook_url": str(server.make_url("/hook"))}]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")), "wh_once")

        async def posted() -> bool:
            return len(seen) == 1

        await eventually(posted)
        # The same event again in the stream, as after a crash between the post and the ack.
        await r.redeliver_first()
        await eventually(r.settled)
        assert len(seen) == 1


async def test_rate_limit_is_retried_after_retry_after(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen, status=lambda n: 429 if n == 1 else 200))
    async with rig([{"name": "slack", "type": "slack", "webhook_url": str(server.make_url("/hook"))}]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def twice() -> bool:
            return len(seen) == 2

        await eventually(twice)
        assert await r.dead("slack") == []


async def test_client_error_is_dead_lettered_with_slacks_answer_and_no_url(
    rig: Any, aiohttp_server: Callable[..., Any]
) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen, status=lambda n: 404, error="no_service"))
    url = str(server.make_url(f"/hook/{HOOK_SECRET_PATH}"))
    async with rig([{"name": "slack", "type": "slack", "webhook_url": url}]) as r:
        with structlog.testing.capture_logs() as logs:
            await r.post(compact(sample("fine_tuning_job.failed.json")))

            async def dead() -> bool:
                return len(await r.dead("slack")) == 1

            await eventually(dead)
        error = (await r.dead("slack"))[0][b"error"].decode()
        assert "refused with 404" in error
        assert HOOK_SECRET_PATH not in error
        assert HOOK_SECRET_PATH not in repr(logs)


async def test_web_api_threads_later_events_of_a_job(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen))
    handler = {
        "name": "slack",
        "type": "slack",
        "token": "xoxb-test-token",
        "channel": "C0FT",
        "api_url": str(server.make_url("/api")),
    }
    async with rig([handler]) as r:
        running = msgspec.json.decode(sample("fine_tuning_job.running.json"))
        await r.post(msgspec.json.encode(running))

        async def first() -> bool:
            return len(seen) == 1

        await eventually(first)
        running["status"] = "succeeded"
        await r.post(msgspec.json.encode(running))

        async def second() -> bool:
            return len(seen) == 2

        await eventually(second)
        assert "thread_ts" not in seen[0]["json"]
        assert seen[1]["json"]["thread_ts"] == "1700000000.000001"
        assert seen[1]["json"]["channel"] == "C0FT"


async def test_web_api_errors(rig: Any, aiohttp_server: Callable[..., Any]) -> None:
    seen: Recorder = []
    server = await aiohttp_server(slack_app(seen, error="channel_not_found"))
    handler = {
        "name": "slack",
        "type": "slack",
        "token": "xoxb-test-token",
        "channel": "C0NOPE",
        "api_url": str(server.make_url("/api")),
    }
    async with rig([handler]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("slack")) == 1

        await eventually(dead)
        error = (await r.dead("slack"))[0][b"error"].decode()
        assert "chat.postMessage refused: channel_not_found" in error
        assert "xoxb-test-token" not in error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "set either webhook_url, or token and channel"),
        ({"webhook_url": "https://x", "token": "t"}, "set either webhook_url"),
        ({"token": "t"}, "channel is required"),
        ({"webhook_url": "https://x", "text": "{{ job.id"}, "template syntax error"),
        ({"webhook_url": "https://x", "text": "{{ job.nope }}"}, "template fails on a sample"),
        ({"webhook_url": "not a url"}, "webhook_url: an http:// or https:// URL is required"),
        ({"webhook_url": "https://"}, "webhook_url: an http:// or https:// URL is required"),
        ({"token": "t", "channel": "c", "api_url": "slack.com/api"}, "api_url: an http:// or https:// URL"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, str], message: str) -> None:
    build_fails({"name": "s", "type": "slack", **options}, message)


def test_thin_event_message_still_reads_well() -> None:
    handler = SlackHandler("s", SlackOptions(webhook_url="https://x"))
    event = Event(
        id="wh", type="fine_tuning.job.cancelled", job_id="ftjob-1", source="webhook", created_at=1, received_at=2.0
    )
    message = handler.message(decode_event(encode_event(event)))
    assert message["text"] == "🚫 Fine-tuning job cancelled: ftjob-1"
