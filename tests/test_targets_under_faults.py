"""Faults from the outside, at targets that do not deduplicate: real `ftjobs` processes, real local targets."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from tests.conftest import free_port
from tests.processes import Proc, base_env, write_config
from tests.test_reliability import enqueue, logged, settled, until


class ReceiptTarget:
    """A pipeline trigger that starts its work on receipt (as GitHub's dispatch or a CI trigger does): every
    POST counts, whether or not the caller waits for the answer, which comes `delay_s` later."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.counts: Counter[str] = Counter()
        self.running = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        return app

    async def hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.counts[request.headers["Idempotency-Key"]] += 1
        self.running += 1
        try:
            await asyncio.sleep(self.delay_s)
            return web.json_response({"ok": True})
        finally:
            self.running -= 1


async def test_sigterm_starts_no_new_call_so_the_grace_period_cuts_none_off(
    aiohttp_server: Callable[..., Any], tmp_path: Path, redis_url: str, prefix: str, rclient: redis.Redis
) -> None:
    """SIGTERM while a batch has calls in flight and more waiting: the calls in flight finish within
    `grace_s` and are acknowledged; the waiting entries are not started (they stay pending for the next owner).
    A stop that went on through the batch would start calls the grace period then cuts off: their requests
    reached the target, and the next worker sends them again."""
    target = ReceiptTarget(delay_s=1.5)
    hook = str((await aiohttp_server(target.app())).make_url("/hook"))
    n = 16
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": free_port()},
        redis={"url": redis_url, "prefix": prefix},
        # A batch of 16 in 2 lanes at 1.5 s lasts 12 s; the calls in flight at the stop need 1.5 s of the 4 s.
        worker={"lease_s": 30.0, "block_ms": 100, "batch_size": n, "grace_s": 4.0},
        handlers=[{"name": "pipe", "type": "http", "url": hook, "concurrency": 2}],
    )
    await enqueue(rclient, prefix, ["pipe"], n)
    env = base_env(FTJOBS_CONFIG=str(config))
    worker = await asyncio.to_thread(Proc, ["work"], tmp_path, env, "work-1")
    try:
        assert await until(lambda: target.running == 2, 30)
        assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 30) == 0
        cut_off = [line.get("cut_off") for line in worker.lines() if line.get("event") == "worker_stopped"]
        before_restart = sum(target.counts.values())
        worker = await asyncio.to_thread(Proc, ["work"], tmp_path, env, "work-2")

        async def done() -> bool:
            return len(target.counts) == n and await settled(rclient, prefix)

        assert await until(done, 60)
        assert await logged(worker, "worker_started")
    finally:
        await asyncio.to_thread(worker.stop, signal.SIGKILL)
    resent = sum(c - 1 for c in target.counts.values())
    print(
        f"\nFIGURE sigterm-slow-target: {n} calls, SIGTERM with 2 in flight: {before_restart} made before the "
        f"restart, cut off {cut_off}, {resent} sent twice"
    )
    assert resent == 0, target.counts
