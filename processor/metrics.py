"""Prometheus metrics: what a scrape of `GET /metrics` (or `ftjobs work --metrics-port N`) shows.

Counters and histograms here, updated on the hot paths at the cost of a dictionary lookup; the queue gauges
(lag, pending, dead letters, heartbeats...) are read from Redis at scrape time by `processor.gauges`.
`listener` serves the scrape endpoint on its own address when `receiver.metrics_port` is set, off the public
webhook port. No `_created` series: they double the series count and no dashboard or alert uses them.

`ftjobs receive --workers N` forks N processes that answer scrapes in turn; `share_between_processes` (called
before the fork) switches to prometheus_client's multiprocess mode, so whichever process answers reports the
sum over all of them, and a counter never goes backwards between two scrapes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from processor import httpserver

_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client


def _instruments(registry: CollectorRegistry | None) -> tuple[Counter, Histogram, Counter, Histogram]:
    """The counters and histograms, registered in `registry` (None: in none, for multiprocess mode)."""
    return (
        Counter(
            "ftjobs_requests",
            "Webhook requests answered, by outcome: accepted, duplicate, quarantined, or the error code.",
            ["outcome"],
            registry=registry,
        ),
        Histogram(
            "ftjobs_enqueue_seconds",
            "Time to dedupe and durably append one request (Redis acknowledged).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        Counter(
            "ftjobs_deliveries",
            "Events handed to handlers, by outcome: delivered, retry, dead_letter, deferred, already_done.",
            ["handler", "outcome"],
            registry=registry,
        ),
        Histogram(
            "ftjobs_handler_seconds",
            "Duration of successful handler calls.",
            ["handler"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
    )


REQUESTS, ENQUEUE_SECONDS, DELIVERIES, HANDLER_SECONDS = _instruments(REGISTRY)
#: `REQUESTS`' child per outcome, looked up once: `labels()` takes a lock and builds a key (~2 µs a call),
#: the child's `inc()` alone costs a quarter of that.
_outcomes: dict[str, Counter] = {}


def count_request(outcome: str) -> None:
    """Count one answered webhook request under `outcome`."""
    child = _outcomes.get(outcome)
    if child is None:
        child = _outcomes[outcome] = REQUESTS.labels(outcome)
    child.inc()


#: The folder of the per-process files once `share_between_processes` was called (None: one process).
_shared_dir: str | None = None


def share_between_processes(directory: str) -> None:
    """Keep the counters in files under `directory` (empty, this run's own) from now on, so that processes
    forked afterwards each write their own file and any of them can report the sum. Call before forking."""
    global _shared_dir, REQUESTS, ENQUEUE_SECONDS, DELIVERIES, HANDLER_SECONDS
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # where prometheus_client's files and its reader look
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]  # untyped upstream
    for metric in (REQUESTS, ENQUEUE_SECONDS, DELIVERIES, HANDLER_SECONDS):
        REGISTRY.unregister(metric)
    REQUESTS, ENQUEUE_SECONDS, DELIVERIES, HANDLER_SECONDS = _instruments(None)
    _outcomes.clear()
    _shared_dir = directory


def source() -> Collector:
    """What a scrape reports besides the gauges: this process' registry, or the sum over every process'
    files in multiprocess mode (where per-process figures such as CPU time have no meaning and are left out)."""
    if _shared_dir is None:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=_shared_dir)  # type: ignore[no-untyped-call]  # untyped upstream
    return registry


def listener(
    host: str, port: int, endpoint: Callable[[web.Application], Awaitable[web.StreamResponse]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context (for `app.cleanup_ctx`) serving `GET /metrics` on `host:port` while the app runs;
    `endpoint(app)` answers, with the app that runs it (its Redis connection, its settings).

    The port is bound with SO_REUSEPORT, as the webhook port is with `ftjobs receive --workers N`: each
    process then answers some scrapes with its own counters, exactly as on the webhook port.
    """

    async def serve(app: web.Application) -> AsyncIterator[None]:
        async def scrape(request: web.Request) -> web.StreamResponse:
            return await endpoint(app)

        metrics_app = httpserver.application()
        metrics_app.router.add_get("/metrics", scrape)
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=True).start()
            structlog.get_logger().info("metrics_listening", address=f"http://{host}:{port}/metrics")
            yield
        finally:
            await runner.cleanup()

    return serve
