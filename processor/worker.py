"""Consumer loops: one per handler, each in its own consumer group.

Per loop iteration a runner takes, in this order: entries whose consumer died (XAUTOCLAIM after the
lease, checked every half lease), retries that are due, then new entries (XREADGROUP, blocking when there
was nothing else). Entries of one job run in order; different jobs run concurrently up to the handler's
`concurrency`. Each call has a timeout; while it runs, its lease is renewed so nobody takes it over.
Outcomes: success or "not for this handler" → ack; failure → retry with exponential backoff and full
jitter (state in Redis, so it survives restarts) until `max_attempts`, then the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections import defaultdict
from typing import Final

import msgspec
import structlog
from redis.exceptions import RedisError

from handlers.base import Delivery, Handler
from processor import metrics
from processor.errors import HandlerError, PermanentFailure, RetryLater
from processor.jobstate import Preparer, judge
from processor.limits import Guard
from processor.models import Event, decode_event
from processor.settings import HandlerSpec, WorkerSettings
from processor.stream import Entry, Streams

log = structlog.get_logger()


#: What the preparation gives the delivery step for one entry: the prepared event, why it could not be
#: prepared, None for an undecodable record, or `_SKIP` for a replay aimed at another handler.
Prepared = Event | HandlerError | None | object
_SKIP: Final = object()
#: Due retries are looked for this often (not on every batch: it would cost a round trip each).
_RETRY_CHECK_S: Final = 0.05


def consumer_name() -> str:
    """A consumer name unique to this process: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def backoff(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before retry number `attempt` (1-based): full jitter over an exponential ceiling."""
    return random.uniform(0, min(max_s, base_s * 2 ** (attempt - 1)))


class Runner:
    """Delivers the events stream to one handler."""

    def __init__(
        self,
        handler: Handler,
        spec: HandlerSpec,
        streams: Streams,
        settings: WorkerSettings,
        consumer: str,
        retention_s: int,
        preparer: Preparer,
    ) -> None:
        self.handler = handler
        self.preparer = preparer
        self.spec = spec
        self.streams = streams
        self.settings = settings
        self.consumer = consumer
        self.retention_s = retention_s
        self.group = spec.name
        self.once = bool(getattr(handler, "effectively_once", False))
        self.guard = Guard(streams.client, streams.keys.prefix, spec)
        self._in_flight: set[str] = set()
        self._stopping = asyncio.Event()
        self._last_reclaim = 0.0
        self._last_retry_check = 0.0
        self._log = log.bind(handler=self.group)
        # The hot path's metric children, looked up once.
        self._delivered = metrics.DELIVERIES.labels(self.group, "delivered")
        self._handler_seconds = metrics.HANDLER_SECONDS.labels(self.group)

    def stop(self) -> None:
        """Stop taking new entries; the current batch finishes (see `Worker.run`)."""
        self._stopping.set()

    async def run(self) -> None:
        """Loop until stopped. Errors are logged and the loop goes on, so it survives a Redis outage."""
        renewer = asyncio.create_task(self._renew_leases())
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    entries, seen_before = await self._next_batch()
                    if entries:
                        await self._process(entries, seen_before)
                    failures = 0
                except Exception as exc:  # Redis away, or a bug: log it, wait, and carry on; entries stay pending
                    failures += 1
                    delay = min(2.0, 0.1 * 2**failures)
                    if isinstance(exc, RedisError):
                        self._log.warning("redis_unavailable", error=str(exc), retry_in_s=delay)
                    else:
                        self._log.exception("runner_error", retry_in_s=delay)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _next_batch(self) -> tuple[list[Entry], int]:
        """Up to a batch of entries: taken over, due for a retry, then new; and how many are not new."""
        size = self.settings.batch_size
        entries: list[Entry] = []
        now = time.monotonic()
        if now - self._last_reclaim >= self.settings.lease_s / 2:
            self._last_reclaim = now
            entries += await self.streams.reclaim(self.group, self.consumer, self.settings.lease_s, size)
            if entries:
                self._log.info("entries_reclaimed", count=len(entries))
        if now - self._last_retry_check >= _RETRY_CHECK_S:
            self._last_retry_check = now
            entries += await self.streams.take_due(self.group, self.consumer, size)
        seen_before = len(entries)
        if len(entries) < size:
            block = None if entries else self.settings.block_ms
            entries += await self.streams.read_new(self.group, self.consumer, size - len(entries), block)
        return entries, seen_before

    async def _process(self, entries: list[Entry], seen_before: int) -> None:
        """Run one batch: per-job order kept, jobs concurrent, successful acks sent together. Only the first
        `seen_before` entries (taken over, or retries) can have failed attempts to look up."""
        ids = [entry.id for entry in entries[:seen_before]]
        attempts = dict(zip(ids, await self.streams.attempts(self.group, ids), strict=True))
        decoded: list[Event | None] = []
        for entry in entries:
            try:
                decoded.append(judge(decode_event(entry.record), entry.verdict))
            except msgspec.DecodeError:
                decoded.append(None)
        # Hydrate the thin events meant for this handler (a no-op for full jobs).
        mine = [e is not None and (e.target is None or e.target == self.group) for e in decoded]
        ready = iter(await self.preparer.prepare_many([e for e, m in zip(decoded, mine, strict=True) if m and e]))
        by_job: dict[str, list[tuple[Entry, Prepared]]] = defaultdict(list)
        for entry, event, is_mine in zip(entries, decoded, mine, strict=True):
            outcome: Prepared = None if event is None else next(ready) if is_mine else _SKIP
            by_job[event.job_id if event else entry.id].append((entry, outcome))
        done: list[str] = []
        jobs = iter(by_job.values())

        async def lane() -> None:
            # `concurrency` lanes share one iterator of jobs: each job's events run in order in one lane.
            for items in jobs:
                for entry, event in items:
                    if await self._deliver(entry, event, attempts.get(entry.id, 0)):
                        done.append(entry.id)

        await asyncio.gather(*(lane() for _ in range(min(max(1, self.spec.concurrency), len(by_job)))))
        await self.streams.ack(self.group, done, retried=[i for i in done if i in attempts])

    async def _deliver(self, entry: Entry, event: Prepared, failed_before: int) -> bool:
        """Handle one entry; True when it is finished (to be acked), False when a retry or DLQ took it."""
        entry_id = entry.id
        if event is None:
            await self.streams.dead_letter(self.group, entry, "undecodable record in the events stream", 0)
            self._log.error("event_dead_lettered", entry_id=entry_id, error="undecodable record")
            return False
        if event is _SKIP:
            return True  # a replay for another handler
        if entry.orphaned >= self.settings.max_takeovers:
            reason = (
                f"taken over {entry.orphaned} times from consumers that died handling it (does it crash the worker?)"
            )
            await self._dead_letter(entry, reason, failed_before)
            return False
        if isinstance(event, PermanentFailure):
            await self._dead_letter(entry, str(event), failed_before)
            return False
        if isinstance(event, BaseException):  # the API is away: wait, without using an attempt
            delay = event.after if isinstance(event, RetryLater) and event.after is not None else 5.0
            await self.streams.schedule_retry(self.group, entry_id, failed_before, time.time() + delay, str(event))
            self._log.warning("event_not_prepared", error=str(event), retry_in_s=delay)
            return False
        assert isinstance(event, Event)
        if not self.spec.when.matches(event):
            return True
        attempt = failed_before + 1
        delivery = Delivery(
            event=event, handler=self.group, attempt=attempt, idempotency_key=f"{self.group}:{event.id}"
        )
        with structlog.contextvars.bound_contextvars(
            handler=self.group,
            webhook_id=event.id,
            job_id=event.job_id,
            event_type=event.type,
            attempt=attempt,
        ):
            return await self._call(entry, delivery)

    async def _call(self, entry: Entry, delivery: Delivery) -> bool:
        entry_id, attempt, event_id = entry.id, delivery.attempt, delivery.event.id
        if self.once and await self.streams.already_done(self.group, event_id):
            metrics.DELIVERIES.labels(self.group, "already_done").inc()
            log.info("event_already_delivered")
            return True
        if self.guard.active and (wait := await self.guard.admit()) is not None:
            delay, why = wait
            await self.streams.schedule_retry(self.group, entry_id, attempt - 1, time.time() + delay, why)
            metrics.DELIVERIES.labels(self.group, "deferred").inc()
            log.info("delivery_deferred", reason=why, retry_in_s=round(delay, 3))
            return False
        started = time.perf_counter()
        self._in_flight.add(entry_id)
        try:
            async with asyncio.timeout(self.spec.call_limit_s):  # no extra task per call, unlike wait_for
                await self.handler(delivery)
        except Exception as exc:  # the handler's own bug counts as a transient failure
            if self.guard.active and await self.guard.record(ok=False):
                log.warning("circuit_opened", cooldown_s=self.spec.breaker_cooldown_s)
            if isinstance(exc, PermanentFailure):
                await self._dead_letter(entry, f"permanent failure: {exc}", attempt)
                return False
            reason = (
                f"cut off after {self.spec.call_limit_s} s (twice timeout_s)"
                if isinstance(exc, TimeoutError)
                else _describe(exc)
            )
            if attempt >= self.spec.max_attempts:
                await self._dead_letter(entry, reason, attempt)
            else:
                after = exc.after if isinstance(exc, RetryLater) else None
                delay = after if after is not None else backoff(attempt, self.spec.backoff_s, self.spec.backoff_max_s)
                await self.streams.schedule_retry(self.group, entry_id, attempt, time.time() + delay, reason)
                metrics.DELIVERIES.labels(self.group, "retry").inc()
                log.warning("delivery_failed", error=reason, retry_in_s=round(delay, 3))
            return False
        finally:
            self._in_flight.discard(entry_id)
        if self.once:
            await self.streams.mark_done(self.group, event_id, self.retention_s)
        if self.guard.active:
            await self.guard.record(ok=True)
        elapsed = time.perf_counter() - started
        self._delivered.inc()
        self._handler_seconds.observe(elapsed)
        # Debug: at thousands of events a second, a line each costs more than the dispatch itself.
        log.debug("event_delivered", ms=round(elapsed * 1000, 2))
        return True

    async def _dead_letter(self, entry: Entry, reason: str, attempts: int) -> None:
        await self.streams.dead_letter(self.group, entry, reason, attempts)
        metrics.DELIVERIES.labels(self.group, "dead_letter").inc()
        log.error("event_dead_lettered", error=reason, attempts=attempts)

    async def _renew_leases(self) -> None:
        """Every third of a lease, reset the idle time of entries still being handled."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            if self._in_flight:
                try:
                    await self.streams.renew(self.group, self.consumer, sorted(self._in_flight))
                except RedisError as exc:
                    self._log.warning("lease_renewal_failed", error=str(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Worker:
    """All runners of one process, plus the periodic trimmer; `run()` returns after a graceful stop."""

    def __init__(
        self,
        handlers: list[Handler],
        specs: list[HandlerSpec],
        streams: Streams,
        settings: WorkerSettings,
        retention_s: int,
        preparer: Preparer,
    ) -> None:
        consumer = consumer_name()
        self.streams = streams
        self.settings = settings
        self.retention_s = retention_s
        self.runners = [
            Runner(h, s, streams, settings, consumer, retention_s, preparer)
            for h, s in zip(handlers, specs, strict=True)
        ]
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """Begin a graceful stop (safe to call from a signal handler)."""
        self._stopped.set()
        for runner in self.runners:
            runner.stop()

    async def run(self) -> None:
        """Run until `stop()`; then give in-flight work `grace_s`, and leave the rest pending for reclaim."""
        await self.streams.ensure_groups(r.group for r in self.runners)
        tasks = [asyncio.create_task(r.run(), name=f"runner:{r.group}") for r in self.runners]
        trimmer = asyncio.create_task(self._trim_forever())
        log.info("worker_started", handlers=[r.group for r in self.runners], consumer=consumer_name())
        await self._stopped.wait()
        trimmer.cancel()
        _, late = await asyncio.wait(tasks, timeout=self.settings.grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, trimmer, return_exceptions=True)
        log.info("worker_stopped", cut_off=len(late))

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.trim_interval_s)
            try:
                trimmed = await self.streams.trim(self.retention_s)
                if trimmed:
                    log.info("stream_trimmed", entries=trimmed)
            except RedisError as exc:
                log.warning("trim_failed", error=str(exc))
