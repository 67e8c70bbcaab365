"""Queue gauges for alerting, read from Redis at scrape time: lag, pending, retrying, dead letters, circuits,
the poller's last success and the workers' heartbeats, plus `ftjobs_build_info`.

They are read when Prometheus scrapes (never cached, so any process answers with the same figures) from the
same functions `ftjobs status` uses (`Streams.status`, `retention.sizes`, `Guard.state`), within
`READ_TIMEOUT_S`: when Redis does not answer in time the scrape still succeeds with the counters, and
`ftjobs_redis_up` is 0.

`exposition` renders one scrape; `serving` runs an endpoint for `ftjobs work --metrics-port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from processor import __version__, httpserver, metrics, poller, retention
from processor.client import REDIS_ERRORS
from processor.limits import Guard
from processor.settings import HandlerSpec
from processor.stream import Streams

log = structlog.get_logger()

#: A scrape waits this long for Redis; Prometheus' own default scrape timeout is 10 s.
READ_TIMEOUT_S: Final = 2.0


class _Families:
    """Metric families already read, as a collector for `generate_latest`."""

    def __init__(self, sources: Sequence[Collector], families: list[Metric]) -> None:
        self.sources = sources
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()
        yield from self.families


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


async def read(streams: Streams, specs: Iterable[HandlerSpec], now: float | None = None) -> list[Metric]:
    """The gauges' current values, read from Redis (raises on a Redis error)."""
    now = time.time() if now is None else now
    specs = list(specs)
    groups = [spec.name for spec in specs]
    status = await streams.status(groups)
    sizes = await retention.sizes(streams.client, streams.keys)
    circuits = [await Guard(streams.client, streams.keys, spec).state(now) for spec in specs]
    last_poll = await streams.client.hget(streams.keys.poller, poller.LAST_SUCCESS)

    lag = _gauge("ftjobs_handler_lag", "Events in the stream not yet read by the handler's group.", ["handler"])
    pending = _gauge(
        "ftjobs_handler_pending", "Events read by the handler's group and not yet acknowledged.", ["handler"]
    )
    retrying = _gauge("ftjobs_handler_retrying", "Events waiting for their next attempt.", ["handler"])
    dead = _gauge("ftjobs_dead_letters", "Entries in the handler's dead-letter stream.", ["handler"])
    circuit = _gauge("ftjobs_circuit_open", "1 while the handler's circuit breaker is open.", ["handler"])
    for group, circuit_state in zip(groups, circuits, strict=True):
        handler = status["handlers"][group]
        if handler["lag"] is not None:  # Redis cannot always tell (after some deletions): no sample then
            lag.add_metric([group], float(handler["lag"]))
        pending.add_metric([group], float(handler["pending"]))
        retrying.add_metric([group], float(handler["retrying"]))
        dead.add_metric([group], float(handler["dead_letters"]))
        circuit.add_metric([group], 1.0 if circuit_state.get("circuit") == "open" else 0.0)
    heartbeat = _gauge(
        "ftjobs_worker_heartbeat_timestamp_seconds",
        "When each live worker's slowest handler loop last turned (Unix time); gone once its heartbeat expired.",
        ["consumer"],
    )
    for worker in status["workers"]:
        if worker.get("last_loop"):
            heartbeat.add_metric([worker.get("consumer", "")], float(worker["last_loop"]))
    families: list[Metric] = [lag, pending, retrying, dead, circuit, heartbeat]
    families.append(
        GaugeMetricFamily("ftjobs_quarantine_entries", "Entries in the quarantine stream.", status["quarantine"])
    )
    families.append(GaugeMetricFamily("ftjobs_events_entries", "Entries in the events stream.", status["events"]))
    families.append(GaugeMetricFamily("ftjobs_jobs_tracked", "Fine-tuning jobs whose state is kept.", sizes["jobs"]))
    families.append(
        GaugeMetricFamily("ftjobs_redis_used_memory_bytes", "Memory the Redis server uses.", sizes["used_memory_bytes"])
    )
    if last_poll is not None:
        families.append(
            GaugeMetricFamily(
                "ftjobs_poller_last_success_timestamp_seconds",
                "When a poll of the OpenAI API last succeeded (Unix time).",
                float(last_poll),
            )
        )
    return families


def _build_info() -> GaugeMetricFamily:
    info = _gauge("ftjobs_build_info", "The ftjobs version this process runs (always 1).", ["version"])
    info.add_metric([__version__], 1.0)
    return info


async def exposition(streams: Streams, specs: Iterable[HandlerSpec]) -> bytes:
    """One scrape: counters and histograms (`metrics.source()`), build info, and the gauges read from Redis."""
    families: list[Metric] = [_build_info()]
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            families += await read(streams, specs)
        up = 1.0
    except (TimeoutError, *REDIS_ERRORS, OSError) as exc:
        log.warning("metrics_redis_unavailable", error=type(exc).__name__)
        up = 0.0
    families.append(GaugeMetricFamily("ftjobs_redis_up", "1 when the last scrape could read Redis.", up))
    return generate_latest(_Families([metrics.source()], families))


async def endpoint(streams: Streams, specs: Iterable[HandlerSpec]) -> web.Response:
    """The `GET /metrics` answer."""
    body = await exposition(streams, specs)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@contextlib.asynccontextmanager
async def serving(host: str, port: int | None, streams: Streams, specs: Sequence[HandlerSpec]) -> AsyncIterator[None]:
    """Serve `GET /metrics` on `host:port` while the block runs (nothing when `port` is None)."""
    if port is None:
        yield
        return

    async def scrape(request: web.Request) -> web.Response:
        return await endpoint(streams, specs)

    app = httpserver.application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics_listening", address=f"http://{host}:{port}/metrics")
    try:
        yield
    finally:
        await runner.cleanup()
