"""The `slack` handler: a Block Kit message per event, by incoming webhook or by the Web API.

With the Web API (`token` + `channel`), later events of a job reply in the thread of its first message
(the thread's `ts` is kept in Redis for 30 days). Job data is escaped so it cannot mention `@channel` or
add links; the webhook URL and the token never appear in logs or dead letters.
Docs: https://api.slack.com/messaging/webhooks, https://api.slack.com/methods/chat.postMessage,
https://api.slack.com/reference/surfaces/formatting#escaping
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import msgspec
import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster

from handlers.templates import Template, context, slack_escape, slack_link
from processor import outbound
from processor.client import REDIS_ERRORS
from processor.handler import ConfigError, Delivery, HandlerContext, PermanentFailure, RetryLater
from processor.models import Event

log = structlog.get_logger()

THREAD_TTL_S: Final = 30 * 24 * 3600
#: chat.postMessage errors worth retrying; every other `ok: false` is a configuration problem.
_TRANSIENT: Final = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)
_json: Final = msgspec.json.Encoder()
#: Block Kit's limits: a section's text, and each of its fields.
_TEXT_MAX: Final = 3000
_FIELD_MAX: Final = 2000


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _cut(text: str, limit: int) -> str:
    """`text` within `limit` characters, with an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SlackOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Incoming-webhook URL (`https://hooks.slack.com/services/...`); or use `token` + `channel`.
    webhook_url: str = ""
    #: Bot token (`xoxb-...`) for the Web API.
    token: str = ""
    channel: str = ""
    #: Web API base URL (for proxies and tests).
    api_url: str = "https://slack.com/api"
    #: Optional template for the message text (mrkdwn; job values are escaped).
    text: str | None = None


class SlackHandler:
    """Posts one message per event; never twice for the same event (effectively once)."""

    Options = SlackOptions
    effectively_once = True

    def __init__(self, name: str, options: SlackOptions) -> None:
        if bool(options.webhook_url) == bool(options.token):
            raise ConfigError("set either webhook_url, or token and channel")
        if options.token and not options.channel:
            raise ConfigError("channel is required with token")
        for key in ("webhook_url", "api_url"):
            url = getattr(options, key)
            if url and not _is_http_url(url):
                raise ConfigError(f"{key}: an http:// or https:// URL is required")
        self.name = name
        self.options = options
        self.text = Template(options.text, "slack", f"{name}.text") if options.text else None
        self._session: aiohttp.ClientSession | None = None
        self._redis: redis.Redis | RedisCluster | None = None
        self._thread_prefix = ""
        self.timeout_s = HandlerContext.timeout_s

    async def setup(self, context: HandlerContext) -> None:
        self.timeout_s = context.timeout_s
        self._session = aiohttp.ClientSession()
        self._redis = context.redis
        self._thread_prefix = f"{context.key_prefix}:thread:"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, delivery: Delivery) -> None:
        assert self._session is not None, "setup() was not called"
        message = self.message(delivery.event)
        if self.options.webhook_url:
            await outbound.request(
                self._session,
                f"slack:{self.name}",
                "POST",
                self.options.webhook_url,
                data=_json.encode(message),
                headers={"Content-Type": "application/json"},
                timeout_s=self.timeout_s,
            )
            return
        await self._post_in_thread(delivery.event, message)

    async def _post_in_thread(self, event: Event, message: dict[str, Any]) -> None:
        assert self._session is not None and self._redis is not None
        thread_key = self._thread_prefix + event.job_id
        thread_ts = await self._redis.get(thread_key)
        payload = {"channel": self.options.channel, **message}
        if thread_ts:
            payload["thread_ts"] = thread_ts.decode() if isinstance(thread_ts, bytes) else thread_ts
        _, body = await outbound.request(
            self._session,
            f"slack:{self.name}",
            "POST",
            f"{self.options.api_url}/chat.postMessage",
            data=_json.encode(payload),
            timeout_s=self.timeout_s,
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "Authorization": f"Bearer {self.options.token}",
            },
        )
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise RetryLater(f"slack:{self.name}: chat.postMessage answered with non-JSON") from None
        if not answer.get("ok"):
            error = str(answer.get("error", "unknown_error"))
            if error in _TRANSIENT:
                raise RetryLater(f"slack:{self.name}: chat.postMessage failed: {error}")
            raise PermanentFailure(f"slack:{self.name}: chat.postMessage refused: {error}")
        if not thread_ts and answer.get("ts"):
            # Posted: a Redis error now must not fail the call (it would be retried, and posted twice). The
            # job's next message then starts a thread of its own.
            try:
                await self._redis.set(thread_key, answer["ts"], ex=THREAD_TTL_S, nx=True)
            except REDIS_ERRORS as exc:
                log.warning("slack_thread_not_kept", handler=self.name, job_id=event.job_id, error=str(exc))

    def message(self, event: Event) -> dict[str, Any]:
        """The Block Kit payload: a coloured attachment with a header, the job's facts and any error."""
        ctx = context(event)
        job, status = ctx["job"], ctx["status"]
        title = f"{ctx['emoji']} Fine-tuning job {status}"
        facts = [f"*Job*\n{slack_link(ctx['dashboard_url'], job.id)}"]
        if job.model:
            facts.append(f"*Base model*\n{slack_escape(job.model)}")
        if job.fine_tuned_model:
            facts.append(f"*Fine-tuned model*\n`{slack_escape(job.fine_tuned_model)}`")
        if ctx["duration"] and job.finished_at:
            facts.append(f"*Duration*\n{ctx['duration']}")
        if ctx["trained_tokens"]:
            facts.append(f"*Trained tokens*\n{ctx['trained_tokens']}")
        if event.previous_status:
            facts.append(f"*Previous status*\n{slack_escape(event.previous_status)}")
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": title, "emoji": True}},
        ]
        if self.text is not None and (text := self.text.render(event).strip()):  # Slack refuses an empty block
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(text, _TEXT_MAX)}})
        fields = [{"type": "mrkdwn", "text": _cut(f, _FIELD_MAX)} for f in facts[:10]]
        blocks.append({"type": "section", "fields": fields})
        if (error := ctx["error"]) is not None:
            detail = f"*Error* `{slack_escape(error.code)}`: {slack_escape(error.message)}"
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(detail, _TEXT_MAX)}})
        if ctx["metadata"]:
            pairs = ", ".join(f"{slack_escape(k)}={slack_escape(v)}" for k, v in ctx["metadata"].items())
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(pairs, _TEXT_MAX)}]})
        # The fallback `text` is mrkdwn (shown, and used in notifications): the status is sender data too.
        fallback = f"{ctx['emoji']} Fine-tuning job {slack_escape(status)}: {slack_escape(job.id)}"
        return {"text": fallback, "attachments": [{"color": ctx["color"], "blocks": blocks}]}
