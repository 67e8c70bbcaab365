"""Prometheus metrics: what a scrape of `GET /metrics` (or `ftjobs work --metrics-port N`) shows.

Counters and histograms only, updated on the hot paths at the cost of a dictionary lookup. Queue depths
(lag, pending, dead letters) live in Redis and are read with `ftjobs status --json`. `listener` serves the
scrape endpoint on its own address when `receiver.metrics_port` is set, off the public webhook port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS: Final = Counter(
    "ftjobs_requests",
    "Webhook requests answered, by outcome: accepted, duplicate, quarantined, or the error code.",
    ["outcome"],
)
ENQUEUE_SECONDS: Final = Histogram(
    "ftjobs_enqueue_seconds",
    "Time to dedupe and durably append one request (Redis acknowledged).",
    buckets=_LATENCY_BUCKETS,
)
DELIVERIES: Final = Counter(
    "ftjobs_deliveries",
    "Events handed to handlers, by outcome: delivered, retry, dead_letter, deferred, already_done.",
    ["handler", "outcome"],
)
HANDLER_SECONDS: Final = Histogram(
    "ftjobs_handler_seconds", "Duration of successful handler calls.", ["handler"], buckets=_LATENCY_BUCKETS
)


def listener(
    host: str, port: int, endpoint: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context (for `app.cleanup_ctx`) serving `GET /metrics` on `host:port` while the app runs.

    The port is bound with SO_REUSEPORT, as the webhook port is with `ftjobs receive --workers N`: each
    process then answers some scrapes with its own counters, exactly as on the webhook port.
    """

    async def serve(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", endpoint)
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=True).start()
            yield
        finally:
            await runner.cleanup()

    return serve
