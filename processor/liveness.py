"""Is this worker alive and working: supervised tasks, the heartbeat in Redis, and the health endpoint.

Every long-running task of a worker process runs under `supervise`: an unexpected error is logged and the
task restarted with backoff; a `TaskDied` (or too many quick failures in a row) ends it for good, and the
process then exits non-zero so its supervisor (compose, systemd, Kubernetes) restarts it.

Each runner reports its loop turns to a `Progress`. The heartbeat (`{p}:worker:{consumer}`, a hash with
handlers, pid, host and the last loop time, expiring after one lease) tells `ftjobs status` who is working and
tells other workers whose pending entries must not be taken over. `ftjobs work --health-port` answers
`GET /healthz` with 503 when a runner made no turn for `stuck_after_s`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web

from processor import httpserver
from processor.client import REDIS_ERRORS
from processor.stream import Streams

log = structlog.get_logger()

#: A task that failed this many times in a row, each soon after its start, has died for good.
_MAX_QUICK_FAILURES: Final = 10
#: A task that ran this long before failing starts a new count of failures.
_HEALTHY_RUN_S: Final = 60.0


class TaskDied(Exception):
    """A supervised task cannot go on (e.g. finished work could not be recorded before the deadline)."""


def retry_delay(failures: int, cap_s: float = 2.0) -> float:
    """Backoff while something (Redis, mostly) is away: 0.2 s doubling, capped."""
    return float(min(cap_s, 0.1 * 2 ** min(failures, 16)))


def cancel_requested() -> bool:
    """True when the current task was asked to stop. Loops that run until cancelled check it on each turn:
    a cancel can be consumed inside a client library (seen with redis-py while a command was in flight), and
    a loop that went on would then never stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def supervise(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run `run()` until it returns; restart it with backoff when it fails, until it died for good."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except TaskDied:
            raise
        except Exception as exc:
            if cancel_requested():  # a cancel that a library turned into another error: stop, never restart
                raise asyncio.CancelledError from exc
            failures = 1 if time.monotonic() - started > _HEALTHY_RUN_S else failures + 1
            if failures >= _MAX_QUICK_FAILURES:
                raise TaskDied(f"task {name} failed {failures} times in a row: {exc!r}") from exc
            delay = retry_delay(failures, cap_s=5.0)
            if isinstance(exc, REDIS_ERRORS):
                log.warning("task_waiting_for_redis", task=name, error=str(exc), retry_in_s=delay)
            else:
                log.exception("task_failed", task=name, retry_in_s=delay)
            await asyncio.sleep(delay)


class Progress:
    """The last loop turn of each runner (monotonic clock), to tell a stuck worker from a slow one."""

    def __init__(self, names: list[str], stuck_after_s: float) -> None:
        now = time.monotonic()
        self.stuck_after_s = stuck_after_s
        self._turns = dict.fromkeys(names, now)

    def turn(self, name: str) -> None:
        self._turns[name] = time.monotonic()

    def stuck(self) -> dict[str, float]:
        """Runners with no turn for `stuck_after_s`: name → seconds since their last turn."""
        now = time.monotonic()
        return {n: round(now - t, 1) for n, t in self._turns.items() if now - t > self.stuck_after_s}

    def last_loop(self) -> float:
        """Wall-clock time of the oldest runner's last turn (what the heartbeat shows)."""
        return time.time() - (time.monotonic() - min(self._turns.values(), default=time.monotonic()))


class Heartbeat:
    """Writes `{p}:worker:{consumer}` every third of a lease while the worker runs; removes it at the end."""

    def __init__(
        self, streams: Streams, consumer: str, handlers: list[str], progress: Progress, lease_s: float
    ) -> None:
        self.streams = streams
        self.consumer = consumer
        self.progress = progress
        self.lease_s = lease_s
        self.fields: dict[str, str | int | float] = {
            "consumer": consumer,
            "handlers": ",".join(handlers),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": round(time.time(), 3),
        }

    async def beat_once(self) -> None:
        fields = self.fields | {
            "last_loop": round(self.progress.last_loop(), 3),
            "stuck": ",".join(self.progress.stuck()),
        }
        await self.streams.beat(self.consumer, fields, self.lease_s)

    async def run(self) -> None:
        """Beat until cancelled; Redis errors are logged and retried at the next beat."""
        while not cancel_requested():
            try:
                await self.beat_once()
            except REDIS_ERRORS as exc:
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.lease_s / 3)

    async def stop(self) -> None:
        try:
            await self.streams.stop_beating(self.consumer)
        except REDIS_ERRORS as exc:
            log.warning("heartbeat_not_removed", error=str(exc))


def health_app(progress: Progress, consumer: str, failed: Callable[[], str]) -> web.Application:
    """`GET /healthz`: 200 while every runner turns, 503 with the stuck ones (or the failure) otherwise."""

    async def healthz(request: web.Request) -> web.Response:
        stuck, failure = progress.stuck(), failed()
        body = {"consumer": consumer, "stuck": stuck, "stuck_after_s": progress.stuck_after_s}
        if stuck or failure:
            return web.json_response({"status": "unhealthy", "failure": failure, **body}, status=503)
        return web.json_response({"status": "ok", **body})

    app = httpserver.application()
    app.router.add_get("/healthz", healthz)
    return app
