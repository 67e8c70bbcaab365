"""The metrics to alert on: queue gauges read from Redis at scrape time, and counters that stay right with
`ftjobs receive --workers N` (real processes, scraped many times)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from processor import __version__
from processor.openai import OpenAIClient
from tests.conftest import compact, eventually, free_port, make_poller, sample, signed, sink
from tests.fake_openai import KEY, FakeOpenAI
from tests.processes import Proc, base_env, http_ready, post, wait_for, write_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) → value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def scrape(client: TestClient) -> tuple[str, Samples]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    return text, parse(text)


async def test_gauges_show_the_queue_as_status_does(
    rig: Any, redis_url: str, prefix: str, aiohttp_server: Callable[..., Any]
) -> None:
    """Dead letters, an open circuit, a worker's heartbeat, the poller's last success and the build's version
    appear in the scrape with the values Redis holds; no `_created` series."""
    fake = FakeOpenAI()
    api_url = str((await aiohttp_server(fake.app())).make_url("/v1"))
    handlers = [
        sink("ok", redis_url, prefix),
        sink("broken", redis_url, prefix, fail_times=-1, permanent=True, breaker_threshold=1),
    ]
    async with rig(handlers, openai={"api_key": KEY, "base_url": api_url, "timeout_s": 2.0}) as r:
        before = time.time()
        await r.post(compact(sample("fine_tuning_job.succeeded.json")))
        await eventually(r.settled)
        async with OpenAIClient(r.settings.openai) as api:
            await make_poller(r.settings, r.rclient, api).poll_once()
        text, samples = await scrape(r.client)
    assert value(samples, "ftjobs_dead_letters", handler="broken") == 1
    assert value(samples, "ftjobs_dead_letters", handler="ok") == 0
    assert value(samples, "ftjobs_circuit_open", handler="broken") == 1
    assert value(samples, "ftjobs_circuit_open", handler="ok") == 0
    for handler in ("ok", "broken"):
        assert value(samples, "ftjobs_handler_lag", handler=handler) == 0
        assert value(samples, "ftjobs_handler_pending", handler=handler) == 0
        assert value(samples, "ftjobs_handler_retrying", handler=handler) == 0
    assert value(samples, "ftjobs_quarantine_entries") == 0
    assert (value(samples, "ftjobs_poller_last_success_timestamp_seconds") or 0) >= before
    [(_, consumer)] = [labels[0] for name, labels in samples if name == "ftjobs_worker_heartbeat_timestamp_seconds"]
    assert value(samples, "ftjobs_worker_heartbeat_timestamp_seconds", consumer=consumer) == pytest.approx(
        time.time(), abs=60
    )
    assert value(samples, "ftjobs_build_info", version=__version__) == 1
    assert value(samples, "ftjobs_redis_up") == 1
    assert "_created" not in text


async def test_lag_and_pending_count_what_no_worker_took(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    """With no worker running, every accepted event is lag for each handler."""
    from processor.receiver import create_app

    settings = make_settings([sink("a", redis_url, prefix)])
    client = await aiohttp_client(create_app(settings, redis_url))
    for status in ("succeeded", "failed"):
        body = compact(sample(f"fine_tuning_job.{status}.json"))
        assert (await client.post("/webhooks/openai", data=body, headers=signed(body))).status == 200
    _, samples = await scrape(client)
    assert value(samples, "ftjobs_handler_lag", handler="a") == 2
    assert value(samples, "ftjobs_handler_pending", handler="a") == 0


def _get(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def test_forked_receivers_report_counters_that_never_go_backwards(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    """`receive --workers 3`: whichever process answers a scrape, `ftjobs_requests_total` only grows and ends
    at the number of requests sent (each process counted only its own before)."""
    port = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "secrets": ["whsec_ZmluZS10dW5pbmctd2ViaG9va3MtdGVzdC1rZXktMzI="]},
        redis={"url": redis_url, "prefix": prefix},
    )
    proc = procs(["receive", "--workers", "3"], tmp_path, base_env(FTJOBS_CONFIG=str(config)), "receive")
    wait_for(http_ready(port), what="receivers ready")
    body = compact(sample("fine_tuning_job.succeeded.json"))
    sent, seen = 0, []
    for _ in range(30):
        assert post(port, body, signed(body))[0] == 200
        sent += 1
        for _ in range(3):
            seen.append(value(parse(_get(port)), "ftjobs_requests_total", outcome="accepted") or 0)
    assert seen == sorted(seen), f"a counter went backwards: {seen}"
    assert seen[-1] == sent
    assert proc.stop() == 0


def test_worker_process_serves_the_gauges(
    tmp_path: Path, procs: Callable[..., Proc], redis_url: str, prefix: str, rclient: object
) -> None:
    """`ftjobs work --metrics-port` reports its own heartbeat and the handlers' gauges."""
    port = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml", redis={"url": redis_url, "prefix": prefix}, handlers=[{"name": "l", "type": "log"}]
    )
    procs(["work", "--metrics-port", str(port)], tmp_path, base_env(FTJOBS_CONFIG=str(config)), "work")

    def beating() -> bool:
        try:
            samples = parse(_get(port))
        except OSError:
            return False
        return any(name == "ftjobs_worker_heartbeat_timestamp_seconds" for name, _ in samples)

    wait_for(beating, what="a heartbeat in the worker's scrape")
    samples = parse(_get(port))
    assert value(samples, "ftjobs_handler_pending", handler="l") == 0
    assert value(samples, "ftjobs_build_info", version=__version__) == 1
