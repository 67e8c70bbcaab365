"""Traces with OpenTelemetry (the optional extra `ftjobs[otel]`): follow one event from the webhook request,
through the stream, to each handler call and the HTTP requests it makes.

* the receiver: a server span per webhook request (continuing the sender's `traceparent` when it sends one),
  and an `ftjobs.enqueue` span whose context travels in the stream entry (`TRACE_FIELD`, a W3C
  `traceparent`, optional: entries without it are handled as before);
* the worker: a span per handler call, a child of the entry's context;
* outgoing HTTP requests (`processor.outbound`) carry `traceparent` (and `tracestate`).

Spans go to whatever tracer provider the process configured (e.g. `opentelemetry-instrument ftjobs serve`
with the OTLP exporter, or the SDK in code). Without the extra installed every function here returns a
constant at once: tracing is off and costs nothing on the hot paths. With the extra installed but no tracer
provider set, OpenTelemetry's spans would be no-ops that still cost ~1/3 of a webhook request's CPU: `active()`
tells, and the hot paths skip them then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Final

from aiohttp import web

from processor.stream import TRACE_FIELD

try:
    from opentelemetry import context, propagate, trace
except ImportError:  # the extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

if trace is not None:
    trace.get_tracer_provider()  # sets the provider named by OTEL_PYTHON_TRACER_PROVIDER, if any, now

ENABLED: Final = trace is not None
_NAME: Final = "ftjobs"
_NO_FIELDS: Final[dict[bytes, bytes]] = {}
_NO_HEADERS: Final[dict[str, str]] = {}
#: What the span functions return when tracing is off: no generator, no allocation per call.
_OFF_FIELDS: Final = contextlib.nullcontext(_NO_FIELDS)
_OFF: Final = contextlib.nullcontext()
_GONE: Final = object()


def active() -> bool:
    """Whether spans go anywhere: the extra is installed and the process set a tracer provider (until it does,
    OpenTelemetry hands out its proxy, whose spans are dropped). Asked per call, so a provider set after the
    server started still gets every span from then on.

    It reads the module global that `trace.set_tracer_provider` sets (once) rather than calling
    `trace.get_tracer_provider()`, which looks up an environment variable on every call while none is set:
    ~3 µs a webhook request, where this costs nanoseconds. Falls back to the public call if the global is gone.
    """
    if trace is None:
        return False
    provider = getattr(trace, "_TRACER_PROVIDER", _GONE)
    if provider is _GONE:
        return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return provider is not None


def _carrier() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def enqueue_span(webhook_id: str) -> contextlib.AbstractContextManager[dict[bytes, bytes]]:
    """A span around one enqueue; yields the stream entry's trace field (empty when there is no trace)."""
    return _enqueue_span(webhook_id) if active() else _OFF_FIELDS


def handler_span(traceparent: bytes, handler: str, job_id: str) -> contextlib.AbstractContextManager[None]:
    """A span around one handler call, continuing the trace the entry carries (a new trace when none)."""
    return _handler_span(traceparent, handler, job_id) if active() else _OFF


@contextlib.contextmanager
def _enqueue_span(webhook_id: str) -> Iterator[dict[bytes, bytes]]:
    with trace.get_tracer(_NAME).start_as_current_span("ftjobs.enqueue", kind=trace.SpanKind.PRODUCER) as span:
        span.set_attribute("ftjobs.webhook_id", webhook_id)
        parent = _carrier().get("traceparent")
        yield {TRACE_FIELD: parent.encode()} if parent else _NO_FIELDS


@contextlib.contextmanager
def _handler_span(traceparent: bytes, handler: str, job_id: str) -> Iterator[None]:
    parent = propagate.extract({"traceparent": traceparent.decode(errors="replace")}) if traceparent else None
    tracer = trace.get_tracer(_NAME)
    with tracer.start_as_current_span(
        f"ftjobs.handler {handler}", context=parent, kind=trace.SpanKind.CONSUMER
    ) as span:
        span.set_attribute("ftjobs.handler", handler)
        span.set_attribute("ftjobs.job_id", job_id)
        yield


def outgoing_headers() -> Mapping[str, str]:
    """`traceparent`/`tracestate` for an outgoing request made in the current span (empty when none)."""
    if not active():
        return _NO_HEADERS
    return _carrier()


def middlewares(path: str) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The receiver's tracing middleware (a server span per webhook request), or none when tracing is off."""
    if not ENABLED:
        return []

    @web.middleware
    async def traced(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != path or not active():
            return await handler(request)
        token = context.attach(propagate.extract(dict(request.headers)))
        try:
            name = f"{request.method} {path}"
            with trace.get_tracer(_NAME).start_as_current_span(name, kind=trace.SpanKind.SERVER) as span:
                response = await handler(request)
                span.set_attribute("http.response.status_code", response.status)
                return response
        finally:
            context.detach(token)

    return [traced]
