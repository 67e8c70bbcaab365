"""Prometheus metrics: what a scrape of `GET /metrics` (or `ftjobs work --metrics-port N`) shows.

Counters and histograms only, updated on the hot paths at the cost of a dictionary lookup. Queue depths
(lag, pending, dead letters) live in Redis and are read with `ftjobs status --json`.
"""

from __future__ import annotations

from typing import Final

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
