"""The worker of one process: a runner per handler (`runner.py`), their lease renewers, the heartbeat and the
periodic trimmer (with the retention sweep), each supervised; a graceful stop gives in-flight work
`grace_s`, and a task that died for good fails the worker (`WorkerFailed`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import structlog
from redis.exceptions import RedisError

from processor import retention
from processor.handler import Handler
from processor.hydration import Preparer
from processor.liveness import Heartbeat, Progress, cancel_requested, supervise
from processor.runner import Runner
from processor.settings import HandlerSpec, RedisSettings, WorkerSettings
from processor.stream import Streams

log = structlog.get_logger()


#: A group's consumers that hold nothing and were idle this long (workers gone) are deleted by the trimmer.
_FORGET_CONSUMERS_AFTER_S: Final = 3600.0


def consumer_name() -> str:
    """A consumer name unique to this process start: host, pid and a random tag (a restarted container can
    have the same host and pid, and its predecessor's entries must count as another consumer's)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class WorkerFailed(Exception):
    """A supervised task of the worker died for good; the process should exit non-zero."""


class Worker:
    """All runners of one process, their lease renewers, the heartbeat and the periodic trimmer, each
    supervised; `run()` returns after a graceful stop and raises `WorkerFailed` when a task died for good."""

    def __init__(
        self,
        handlers: list[Handler],
        specs: list[HandlerSpec],
        streams: Streams,
        settings: WorkerSettings,
        storage: RedisSettings,
        preparer: Preparer,
        tasks: dict[str, Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        """`storage`: how long things are kept (`retention.sweep`); `tasks`: more long-running tasks (the
        poller) supervised with the worker's own."""
        self.consumer = consumer_name()
        self.tasks = tasks or {}
        self.streams = streams
        self.settings = settings
        self.storage = storage
        retention_s = self.retention_s = storage.retention_s
        names = [spec.name for spec in specs]
        block_s = settings.block_ms / 1000
        stuck_after_s = settings.stuck_after_s or 2 * max((s.timeout_s for s in specs), default=0) + block_s + 30
        self.progress = Progress(names, stuck_after_s)
        self.runners = [
            Runner(h, s, streams, settings, self.consumer, retention_s, preparer, self.progress)
            for h, s in zip(handlers, specs, strict=True)
        ]
        self.heartbeat = Heartbeat(streams, self.consumer, names, self.progress, settings.lease_s)
        #: Why the worker failed for good ("" while it did not); the health endpoint reports it.
        self.failure = ""
        #: Set when `run()` returned (stopped, or failed).
        self.finished = asyncio.Event()
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """Begin a graceful stop (safe to call from a signal handler)."""
        self._stopped.set()
        for runner in self.runners:
            runner.stop()

    async def run(self) -> None:
        """Run until `stop()` or a task's death; then give in-flight work `grace_s`, and leave the rest pending
        (this consumer's heartbeat is removed, so other workers take it over after the lease)."""
        try:
            await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> None:
        helpers = [asyncio.create_task(supervise("heartbeat", self.heartbeat.run), name="heartbeat")]
        helpers += [
            asyncio.create_task(supervise(f"renewer:{r.group}", r.renew_leases), name=f"renewer:{r.group}")
            for r in self.runners
        ]
        helpers.append(asyncio.create_task(supervise("trimmer", self._trim_forever), name="trimmer"))
        helpers += [asyncio.create_task(supervise(name, run), name=name) for name, run in self.tasks.items()]
        runners = [
            asyncio.create_task(supervise(f"runner:{r.group}", r.run), name=f"runner:{r.group}") for r in self.runners
        ]
        log.info("worker_started", handlers=[r.group for r in self.runners], consumer=self.consumer)
        stopped = asyncio.create_task(self._stopped.wait())
        await asyncio.wait([*runners, *helpers, stopped], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in (*runners, *helpers) if t.done() and not t.cancelled() and t.exception()]
        if failed:
            error = failed[0].exception()
            self.failure = f"{failed[0].get_name()}: {error}"
            log.critical("worker_failed", task=failed[0].get_name(), error=str(error))
        self.stop()
        _, late = await asyncio.wait(runners, timeout=self.settings.grace_s)
        for task in (*late, *helpers, stopped):
            task.cancel()
        await asyncio.gather(*runners, *helpers, stopped, return_exceptions=True)
        await self.heartbeat.stop()
        log.info("worker_stopped", cut_off=len(late))
        if failed:
            raise WorkerFailed(self.failure)

    async def _trim_forever(self) -> None:
        while not cancel_requested():
            await asyncio.sleep(self.settings.trim_interval_s)
            try:
                trimmed = await self.streams.trim(self.retention_s)
                if trimmed:
                    log.info("stream_trimmed", entries=trimmed)
                groups = [runner.group for runner in self.runners]
                for group in groups:
                    await self.streams.forget_consumers(group, _FORGET_CONSUMERS_AFTER_S)
                swept = await retention.sweep(self.streams.client, self.streams.keys, groups, self.storage)
                if swept:
                    log.info("retention_swept", **msgspec.structs.asdict(swept))
            except RedisError as exc:
                log.warning("trim_failed", error=str(exc))
