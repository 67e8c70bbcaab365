"""The HTTP edge: `create_app(settings)` → an aiohttp app that verifies, decodes and durably enqueues.

The handler only reads the request and calls the pure core (`signatures.verify`, `models.decode_body`);
one middleware turns every `RequestError` into a JSON answer with its status. A 2xx is sent only after
Redis acknowledged the write; when it cannot, the answer is 503 with `Retry-After` and the sender retries.

    200 accepted · 200 duplicate · 200 quarantined · 200 ignored · 400 not JSON · 401 signature · 408 body too slow
    413 too large · 415 content type or encoding · 503 Redis unavailable
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog
from aiohttp import hdrs, web
from redis.exceptions import ResponseError

from processor import gauges, httpserver, metrics, signatures, tracing
from processor.batch import NotReplicated
from processor.client import REDIS_ERRORS
from processor.deadline import SharedDeadline
from processor.enqueue import Enqueued, Enqueuer
from processor.errors import (
    BodyTimeoutError,
    NotJSONError,
    PayloadTooLargeError,
    RequestError,
    UnavailableError,
    UnsupportedMediaError,
)
from processor.eventrecord import encode_event
from processor.httpserver import SERVER_OPTIONS, server_options
from processor.models import JOB_EVENT_PREFIX, Envelope, Event, decode_body
from processor.records import QuarantineRecord
from processor.runtime import open_runtime
from processor.settings import Settings, explain
from processor.stream import RECORD_FIELD, Streams

log = structlog.get_logger()

SETTINGS: Final = web.AppKey("settings", Settings)
STREAMS: Final = web.AppKey("streams", Streams)
ENQUEUER: Final = web.AppKey("enqueuer", Enqueuer)
SIGNING_KEYS: Final = web.AppKey("signing_keys", list[bytes])


class _Groups:
    """Whether every handler's consumer group is known to exist; then `_enqueue` skips `ensure_groups`, whose
    call alone (a generator and a coroutine per request) costs more than its cached answer. Mutable, so it
    can be set after the app is frozen."""

    ready: bool = False


GROUPS: Final = web.AppKey("groups", _Groups)


class _Readiness:
    """`/readyz`'s last "ready" (reused for `READY_REUSE_S`, so load balancers' probes, or a stranger's
    flood of them, cost Redis at most one round of probe writes a second) and the probe under way, which
    concurrent requests share. A refused enqueue forgets "ready" at once. Mutable, like `_Groups`."""

    def __init__(self) -> None:
        self.ready_until = 0.0
        self.generation = 0
        self.probe: asyncio.Future[str | None] | None = None

    async def check(self, probe: Callable[[], Awaitable[str | None]]) -> str | None:
        """Why the receiver is not ready, or None: the "ready" still reused, else the probe under way, else a
        new one (`probe`)."""
        if time.monotonic() < self.ready_until:
            return None
        if self.probe is None or self.probe.done():
            self.probe = asyncio.ensure_future(probe())
        generation = self.generation
        problem = await asyncio.shield(self.probe)
        if problem is None and generation == self.generation:  # no enqueue was refused meanwhile
            self.ready_until = time.monotonic() + READY_REUSE_S
        return problem

    def forget(self) -> None:
        """Forget "ready": the next check probes again."""
        self.ready_until = 0.0
        self.generation += 1


READINESS: Final = web.AppKey("readiness", _Readiness)


DEADLINE: Final = web.AppKey("enqueue_deadline", SharedDeadline)

_json: Final = msgspec.json.Encoder()
#: `/readyz` answers within this long, even when Redis stalls.
READY_TIMEOUT_S: Final = 1.0
#: How long `/readyz` reuses a "ready" it found.
READY_REUSE_S: Final = 1.0


def reply(http_status: int, /, **body: Any) -> web.Response:
    """A JSON response (every answer, errors included, is JSON with a `status` or `error` word)."""
    return web.Response(status=http_status, body=_json.encode(body), content_type="application/json")


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map domain errors (and aiohttp's own 404/405) to JSON answers; never leak a traceback."""
    try:
        return await handler(request)
    except RequestError as exc:
        metrics.count_request(exc.code)
        response = reply(int(exc.status), error=exc.code, message=exc.message)
        if isinstance(exc, UnavailableError):
            response.headers["Retry-After"] = str(exc.retry_after)
        log.info("request_rejected", status=int(exc.status), error=exc.code, message=exc.message, path=request.path)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return reply(exc.status, error=exc.reason.lower().replace(" ", "_"), message=exc.reason)
    except Exception as exc:  # a bug: count it, and log one line (a traceback per request floods the logs)
        metrics.count_request("internal_error")
        where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-1:]]
        log.error("request_failed", path=request.path, error=type(exc).__name__, at=",".join(where))
        return reply(
            500,
            error="internal_error",
            message="internal error; retry (a retried webhook-id is never enqueued twice)",
        )


async def receive_webhook(request: web.Request) -> web.Response:
    """POST {receiver.path}: verify → decode → dedupe + enqueue → answer."""
    settings = request.app[SETTINGS].receiver
    sent_encodings = request.headers.getall(hdrs.CONTENT_ENCODING, ())
    encodings = [e.strip().lower() for e in sent_encodings] if sent_encodings else []
    if any(e not in ("", "identity") for e in encodings):  # the server never inflates: httpserver.py
        raise UnsupportedMediaError(
            f"content encoding {','.join(encodings)[:40]!r} is not accepted; send the body uncompressed "
            "(its signature is over the bytes as sent)"
        )
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLargeError(f"body is {request.content_length} bytes; the limit is {settings.max_body_bytes}")
    if request.content_type != "application/json" and not request.content_type.endswith("+json"):
        raise UnsupportedMediaError(f"content type must be application/json, not {request.content_type!r}")
    try:
        if request.content.is_eof():  # the whole body is already here (the common case): nothing to wait for
            body = await request.read()
        else:
            async with asyncio.timeout(settings.body_timeout_s):  # unlike wait_for, no task per request
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"body is over the limit of {settings.max_body_bytes} bytes") from None
    except TimeoutError:
        raise BodyTimeoutError(f"the body did not arrive within {settings.body_timeout_s} s") from None
    if settings.verify_signatures:
        signing_keys: list[bytes] = request.app[SIGNING_KEYS]
        webhook_id = signatures.verify(request.headers, body, signing_keys, tolerance_s=settings.tolerance_s)
    else:
        webhook_id = request.headers.get(signatures.ID_HEADER) or f"unsigned_{uuid.uuid4().hex}"
    signatures.check_webhook_id(webhook_id)
    try:
        decoded = decode_body(body)
    except msgspec.ValidationError as exc:
        return await _quarantine(request, webhook_id, body, explain(exc))
    except msgspec.DecodeError as exc:
        raise NotJSONError(f"body is not valid JSON: {exc}") from None
    if isinstance(decoded, Envelope) and not _accepted_type(decoded.type, settings.accept_event_types):
        metrics.count_request("ignored")
        log.info("event_ignored", webhook_id=webhook_id, event_type=decoded.type)
        return reply(
            200,
            status="ignored",
            webhook_id=webhook_id,
            event_type=decoded.type,
            message="not a fine-tuning job event; nothing was enqueued (list it in receiver.accept_event_types "
            "to accept it)",
        )
    event = Event.from_body(decoded, webhook_id=webhook_id, received_at=time.time())
    fields = {RECORD_FIELD: encode_event(event)}
    new, entry_id, verdict = await _enqueue(request, webhook_id, fields, event)
    metrics.count_request("accepted" if new else "duplicate")
    if not new:
        return reply(
            200,
            status="duplicate",
            webhook_id=webhook_id,
            entry_id=entry_id,
            message="this webhook-id was already accepted; nothing was enqueued",
        )
    log.debug("event_accepted", webhook_id=webhook_id, job_id=event.job_id, event_type=event.type)
    answer: dict[str, Any] = {
        "status": "accepted",
        "webhook_id": webhook_id,
        "entry_id": entry_id,
        "job_id": event.job_id,
        "event_type": event.type,
    }
    if verdict is not None and verdict.skipped:  # stored, but handlers will skip it: say so to whoever sent it
        answer["skipped"] = verdict.skipped
        answer["message"] = f"stored; handlers skip it ({verdict.skipped}), unless a rule asks for such events"
    return reply(200, **answer)


def _accepted_type(event_type: str, extra: list[str]) -> bool:
    """Fine-tuning job events, and the other types the receiver is told to accept (one OpenAI endpoint may be
    subscribed to batch, response and eval events too)."""
    return event_type.startswith(JOB_EVENT_PREFIX) or event_type in extra


async def _quarantine(request: web.Request, webhook_id: str, body: bytes, error: str) -> web.Response:
    """A signed body we cannot read: keep it for replay (the sender cannot fix it; we can) and answer 2xx."""
    fields = QuarantineRecord(body=body, error=error, webhook_id=webhook_id, received_at=time.time()).to_fields()
    new, entry_id, _ = await _enqueue(request, webhook_id, fields)
    metrics.count_request("quarantined" if new else "duplicate")
    log.warning("event_quarantined", webhook_id=webhook_id, error=error)
    return reply(
        200,
        status="quarantined" if new else "duplicate",
        webhook_id=webhook_id,
        entry_id=entry_id,
        message=f"signed but not a fine-tuning job or event ({error}); kept in quarantine for replay",
    )


def _no_answer(webhook_id: str, deadline_s: float) -> UnavailableError:
    """The 503 for a write Redis did not answer in time (it may have been applied: the retry is safe)."""
    log.error("enqueue_failed", webhook_id=webhook_id, error=f"no answer from Redis within {deadline_s} s")
    return UnavailableError(
        f"the queue did not answer within {deadline_s} s; the event may or may not be stored: retry "
        "(a retried webhook-id is never enqueued twice)"
    )


async def _enqueue(
    request: web.Request, webhook_id: str, fields: dict[bytes, bytes], event: Event | None = None
) -> Enqueued:
    """Store the event (without one: the quarantine record), or raise `UnavailableError` (503) when Redis
    refuses or does not answer in time."""
    app = request.app
    settings = app[SETTINGS]
    deadline = app[DEADLINE]
    deadline_s = deadline.seconds
    task = deadline.start()  # a stalled Redis must not hold the sender past its own timeout
    try:
        groups = app[GROUPS]
        if not groups.ready:
            await app[STREAMS].ensure_groups(h.name for h in settings.handlers)
            groups.ready = True
        started = time.perf_counter()  # cheaper than `Histogram.time()`'s context manager object
        try:
            with tracing.enqueue_span(webhook_id) as trace_fields:
                return await app[ENQUEUER].add(webhook_id, fields | trace_fields, event)
        finally:
            metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
    except asyncio.CancelledError:
        if not deadline.expired(task):
            raise
        raise _no_answer(webhook_id, deadline_s) from None
    except TimeoutError:  # before OSError, its base class: the write may have been applied after all
        raise _no_answer(webhook_id, deadline_s) from None
    except NotReplicated as exc:  # before RedisError, its base class
        app[READINESS].forget()
        log.error("enqueue_unconfirmed", webhook_id=webhook_id, error=str(exc))
        raise UnavailableError(
            "the event is stored but its copies (replicas or append-only file, `[redis] wait_*`) were not "
            "confirmed in time; retry (a retried webhook-id is never enqueued twice)"
        ) from None
    except (*REDIS_ERRORS, OSError) as exc:
        app[READINESS].forget()
        log.error("enqueue_failed", webhook_id=webhook_id, error=type(exc).__name__)
        raise UnavailableError("the queue is unavailable; nothing was stored, retry later") from None
    finally:
        deadline.stop(task)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text exposition of `processor.metrics`, the process collectors and the queue gauges."""
    return await scrape(request.app)


async def scrape(app: web.Application) -> web.Response:
    return await gauges.endpoint(app[STREAMS], app[SETTINGS].handlers)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return reply(200, status="ok")


async def readyz(request: web.Request) -> web.Response:
    """Redis answers, every handler's consumer group exists, and every partition takes writes (`_probe`)."""
    app = request.app
    problem = await app[READINESS].check(lambda: _probe(app))
    if problem is not None:
        return reply(503, status="unavailable", message=problem)
    return reply(200, status="ready")


async def _probe(app: web.Application) -> str | None:
    """Why the receiver is not ready (one readiness check), or None. A refusal is named by its kind only (an
    ACL's text names its user): the endpoint answers anyone."""
    streams = app[STREAMS]
    groups = [h.name for h in app[SETTINGS].handlers]
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await streams.client.ping()
            missing = await streams.missing_groups(groups)
            if missing:  # Redis came back empty: make them again, as at start (a 503 here would keep senders away)
                streams.forget_groups(missing)
                await streams.ensure_groups(groups)
                missing = await streams.missing_groups(groups)
            await streams.probe_writes()
    except TimeoutError:  # before OSError, its base class
        return f"redis did not answer within {READY_TIMEOUT_S} s"
    except ResponseError as exc:  # it answers, but refuses writes: every webhook would get a 503
        return f"redis refuses writes: {_refusal(exc)}"
    except (*REDIS_ERRORS, OSError) as exc:
        return f"redis is unreachable: {type(exc).__name__}"
    except Exception as exc:  # anything else the client raises: not ready, and never a 500
        return f"redis could not be checked: {type(exc).__name__}"
    if missing:
        return f"consumer groups missing: {', '.join(missing)}"
    return None


def _refusal(exc: ResponseError) -> str:
    """The kind of a refusal: its class (`OutOfMemoryError`, `ReadOnlyError`, ...), and the server's error
    code when redis-py has no class of its own for it (`MISCONF`, `NOREPLICAS`)."""
    code = str(exc).split(" ", 1)[0]
    return f"{type(exc).__name__} {code}" if code.isalpha() and code.isupper() else type(exc).__name__


def create_app(settings: Settings, redis_url: str) -> web.Application:
    """The receiver app. It opens Redis (and creates the handlers' groups) at start and closes it at cleanup."""
    receiver = settings.receiver
    middlewares = [*tracing.middlewares(receiver.path), errors_middleware]
    app = httpserver.application(client_max_size=receiver.max_body_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    app[SERVER_OPTIONS] = server_options(receiver)
    app[SIGNING_KEYS] = [signatures.parse_secret(s) for s in receiver.secrets]
    app[GROUPS] = _Groups()
    app[READINESS] = _Readiness()
    app[DEADLINE] = SharedDeadline(receiver.enqueue_timeout_s)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_runtime(settings, redis_url) as runtime:
            app[STREAMS] = runtime.streams
            app[ENQUEUER] = runtime.enqueuer
            try:
                await app[STREAMS].ensure_groups(h.name for h in settings.handlers)
            except (*REDIS_ERRORS, OSError) as exc:  # start anyway: answer 503 until Redis is back
                log.warning("redis_unavailable_at_start", error=type(exc).__name__)
            yield

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_post(receiver.path, receive_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if receiver.metrics_port:
        app.cleanup_ctx.append(metrics.listener(receiver.metrics_host, receiver.metrics_port, scrape))
    else:
        app.router.add_get("/metrics", metrics_endpoint)
    return app
