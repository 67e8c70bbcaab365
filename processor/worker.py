"""The worker of one process: a runner per handler (`runner.py`), their lease renewers, the heartbeat and the
periodic trimmer (with the retention sweep), each supervised; a graceful stop gives in-flight work
`grace_s`, and a task that died for good fails the worker (`WorkerFailed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import structlog

from processor import retention
from processor.client import REDIS_ERRORS
from processor.handler import Handler
from processor.hydration import Preparer
from processor.liveness import Heartbeat, Progress, cancel_requested, retry_delay, supervise
from processor.partitions import Leases, plan
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
    supervised; `run()` returns after a graceful stop and raises `WorkerFailed` when a task died for good.

    A runner works on one handler and one partition; which partitions this worker runs for each handler is
    decided by the partition leases (`partitions`), looked at every third of a lease.
    """

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
        self.retention_s = storage.retention_s
        self.handlers = list(zip(handlers, specs, strict=True))
        self.preparer = preparer
        names = [spec.name for spec in specs]
        block_s = settings.block_ms / 1000
        stuck_after_s = settings.stuck_after_s or 2 * max((s.timeout_s for s in specs), default=0) + block_s + 30
        self.progress = Progress(names, stuck_after_s)
        self.leases = Leases(streams.client, streams.keys, self.consumer, settings.lease_s)
        #: The runners now running: (handler, partition) → the runner and its tasks (loop, lease renewer).
        self.runners: dict[tuple[str, int], tuple[Runner, asyncio.Task[None], asyncio.Task[None]]] = {}
        self.heartbeat = Heartbeat(streams, self.consumer, names, self.progress, settings.lease_s)
        #: Why the worker failed for good ("" while it did not); the health endpoint reports it.
        self.failure = ""
        #: Set when `run()` returned (stopped, or failed).
        self.finished = asyncio.Event()
        self._stopped = asyncio.Event()
        #: Set when a runner died for good (`TaskDied`: finished work could not be recorded).
        self._died = asyncio.Event()
        self._handovers: set[asyncio.Task[None]] = set()
        #: Runners stopped for a hand-over that is not done yet.
        self._stopping: set[tuple[str, int]] = set()

    def stop(self) -> None:
        """Begin a graceful stop (safe to call from a signal handler)."""
        self._stopped.set()
        for runner, _, _ in self.runners.values():
            runner.stop()

    def partitions(self, group: str) -> list[int]:
        """The partitions this worker runs `group` on now."""
        return sorted(p for g, p in self.runners if g == group)

    async def run(self) -> None:
        """Run until `stop()` or a task's death; then give in-flight work `grace_s`, and leave the rest pending
        (this consumer's heartbeat is removed, so other workers take it over after the lease)."""
        try:
            await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> None:
        await self._beat_once()
        helpers = [asyncio.create_task(supervise("heartbeat", self.heartbeat.run), name="heartbeat")]
        helpers += [
            asyncio.create_task(supervise(f"partitions:{spec.name}", self._assign_forever(handler, spec)))
            for handler, spec in self.handlers
        ]
        helpers.append(asyncio.create_task(supervise("trimmer", self._trim_forever), name="trimmer"))
        helpers += [asyncio.create_task(supervise(name, run), name=name) for name, run in self.tasks.items()]
        log.info("worker_started", handlers=[spec.name for _, spec in self.handlers], consumer=self.consumer)
        stopped = asyncio.create_task(self._stopped.wait())
        died = asyncio.create_task(self._died.wait())
        await asyncio.wait([*helpers, stopped, died], return_when=asyncio.FIRST_COMPLETED)
        died.cancel()
        failed = [t for t in helpers if t.done() and not t.cancelled() and t.exception()]
        if failed and not self.failure:
            self.failure = f"{failed[0].get_name()}: {failed[0].exception()}"
        if self.failure:
            log.critical("worker_failed", error=self.failure)
        self.stop()
        for task in helpers:  # no new runners from here on
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        loops = [loop for _, loop, _ in self.runners.values()]
        late: set[asyncio.Task[Any]] = set()
        if loops:
            _, late = await asyncio.wait(loops, timeout=self.settings.grace_s)
        for task in (*late, *(renewer for _, _, renewer in self.runners.values()), stopped):
            task.cancel()
        await asyncio.gather(*loops, *(r for _, _, r in self.runners.values()), stopped, return_exceptions=True)
        for task in self._handovers:
            task.cancel()
        for group, partition in list(self.runners):  # what was cut off goes to the partitions' next owners now
            with contextlib.suppress(*REDIS_ERRORS):
                await self._hand_over(group, partition)
        await self.heartbeat.stop()
        log.info("worker_stopped", cut_off=len(late))
        if self.failure:
            raise WorkerFailed(self.failure)

    async def _beat_once(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # Redis away at start: the heartbeat task keeps trying
            await self.heartbeat.beat_once()

    def _assign_forever(self, handler: Handler, spec: HandlerSpec) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            while not cancel_requested() and not self._stopped.is_set():
                try:
                    await self._assign(handler, spec)
                except REDIS_ERRORS as exc:
                    log.warning("redis_unavailable", handler=spec.name, error=str(exc))
                if not self.partitions(spec.name):
                    self.progress.turn(spec.name)  # idle by plan, not stuck
                await asyncio.sleep(self.settings.lease_s / 3)

        return run

    async def _assign(self, handler: Handler, spec: HandlerSpec) -> None:
        """Renew this worker's leases for the handler, take its share of the partitions, hand over the rest."""
        group, keys = spec.name, self.streams.keys
        # The leases of what runs here first: they must not lapse while the registry is away (a failover).
        held = await self.leases.take(group, self.partitions(group))
        workers = [w["consumer"] for w in await self.streams.workers() if group in w.get("handlers", "").split(",")]
        share = plan(keys.partitions, workers, self.consumer)
        held |= await self.leases.take(group, share - held)
        running = set(self.partitions(group))  # again: a hand-over may have finished during the awaits
        for p in running - held:  # lost (expired while Redis was away, and taken by another): stop at once
            if (group, p) not in self._stopping:
                log.warning("partition_lost", handler=group, partition=p)
                self._stop_runner(group, p)
        for p in sorted((held & share) - running):
            self._start_runner(handler, spec, p)
        for p in held - share:
            if p not in running:
                await self.leases.drop(group, p)
            elif (group, p) not in self._stopping:  # its lease is renewed until the hand-over is done
                self._stop_runner(group, p)

    def _start_runner(self, handler: Handler, spec: HandlerSpec, partition: int) -> None:
        if self._stopped.is_set():
            return
        streams = self.streams.at(partition)
        runner = Runner(
            handler,
            spec,
            streams,
            self.settings,
            self.consumer,
            self.retention_s,
            self.preparer,
            self.progress,
            lease_left=lambda: self.leases.left(spec.name, partition),
        )
        name = f"runner:{spec.name}:{partition}"
        loop = asyncio.create_task(supervise(name, runner.run), name=name)
        renewer_name = f"renewer:{spec.name}:{partition}"
        renewer = asyncio.create_task(supervise(renewer_name, runner.renew_leases), name=renewer_name)
        loop.add_done_callback(self._on_runner_done)
        renewer.add_done_callback(self._on_runner_done)
        self.runners[(spec.name, partition)] = (runner, loop, renewer)
        log.info("partition_taken", handler=spec.name, partition=partition)

    def _on_runner_done(self, task: asyncio.Task[None]) -> None:
        """A runner's loop or lease renewer ended: a failure of the worker unless the worker ended it (a stop,
        a hand-over). A task cancelled otherwise let a stray CancelledError out: its partition would stay
        leased with nothing consuming it, so the worker fails and its supervisor restarts it."""
        if self.failure:
            return
        if task.cancelled():
            key = next((k for k, (_, loop, renewer) in self.runners.items() if task in (loop, renewer)), None)
            if self._stopped.is_set() or key is None or key in self._stopping:
                return
            self.failure = f"{task.get_name()}: ended by a CancelledError nobody asked for"
        elif task.exception():
            self.failure = f"{task.get_name()}: {task.exception()}"
        else:
            return
        self._died.set()

    def _stop_runner(self, group: str, partition: int) -> None:
        """Stop the runner; once its batch is finished, give back what it still holds (`Streams.release`: the
        next owner takes it over at once) and the lease, retried while Redis is away."""
        key = (group, partition)
        runner, loop, renewer = self.runners[key]
        runner.stop()
        self._stopping.add(key)

        async def hand_over_when_done() -> None:
            try:
                with contextlib.suppress(Exception):
                    await asyncio.shield(loop)
                renewer.cancel()
                failures = 0
                while True:
                    try:
                        released = await self._hand_over(group, partition)
                        log.info("partition_handed_over", handler=group, partition=partition, entries=released)
                        return
                    except REDIS_ERRORS as exc:
                        failures += 1
                        log.warning("partition_hand_over_retrying", handler=group, partition=partition, error=str(exc))
                        await asyncio.sleep(retry_delay(failures))
            finally:
                self._stopping.discard(key)
                if self.runners.get(key, (None,))[0] is runner:
                    del self.runners[key]

        task = asyncio.create_task(hand_over_when_done())
        self._handovers.add(task)
        task.add_done_callback(self._handovers.discard)

    async def _hand_over(self, group: str, partition: int) -> int:
        """Give back what this worker still holds in the partition, then its lease (only if it still holds it)."""
        released = await self.streams.at(partition).release(group, self.consumer, self.settings.lease_s)
        await self.leases.drop(group, partition)
        return released

    async def _trim_forever(self) -> None:
        while not cancel_requested():
            await asyncio.sleep(self.settings.trim_interval_s)
            try:
                trimmed = await self.streams.trim(self.retention_s)
                if trimmed:
                    log.info("stream_trimmed", entries=trimmed)
                groups = [spec.name for _, spec in self.handlers]
                for group in groups:
                    await self.streams.forget_consumers(group, _FORGET_CONSUMERS_AFTER_S)
                swept = await retention.sweep(self.streams.client, self.streams.keys, groups, self.storage)
                if swept:
                    log.info("retention_swept", **msgspec.structs.asdict(swept))
            except REDIS_ERRORS as exc:
                log.warning("trim_failed", error=str(exc))
