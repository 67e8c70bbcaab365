"""One consumer loop: delivers the events stream to one handler, in that handler's consumer group.

Per loop iteration a runner takes, in this order: entries whose consumer died (no heartbeat, idle beyond the
lease; checked every half lease), retries that are due, then new entries (XREADGROUP, blocking when there was
nothing else, never past the next due retry). Entries of one job run in order; different jobs run
concurrently up to the handler's `concurrency`. Each call has a timeout; every entry of the batch stays
leased (renewed every third of a lease) until it is finished, so no live worker's entry is taken over.
Outcomes: success or "not for this handler" → ack (with the done-marker of an effectively-once handler, in
the same step, before the lane's next call and before the batch ends: `processor.acks`); failure → retry
with exponential backoff and full jitter (state in Redis, so it survives restarts) until `max_attempts`,
then the dead-letter stream.
What happens to an entry is decided by the pure functions of `policy`; the runner gathers the facts and
applies the decision to Redis (`Runner._apply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Final

import msgspec
import structlog
from redis.exceptions import ResponseError

from processor import logs, metrics, policy, tracing
from processor.acks import Ack, Acknowledger
from processor.client import REDIS_ERRORS
from processor.deadline import SharedDeadline
from processor.errors import HandlerError
from processor.eventrecord import decode_event
from processor.handler import Delivery, Handler, is_effectively_once
from processor.hydration import Preparer
from processor.jobstate import judge
from processor.limits import Guard
from processor.liveness import Progress, TaskDied, cancel_requested, retry_delay
from processor.models import Event
from processor.settings import HandlerSpec, WorkerSettings
from processor.stream import Entry, Streams

log = structlog.get_logger()


#: What the preparation gives the delivery step for one entry: the prepared event, why it could not be
#: prepared, None for an undecodable record, or `_SKIP` for a replay aimed at another handler.
Prepared = Event | HandlerError | None | object
_SKIP: Final = object()
#: Due retries are looked for this often (not on every batch: it would cost a round trip each).
_RETRY_CHECK_S: Final = 0.05
#: How often a runner looks again while the partition's previous owner finishes, or its lease is unsure.
_NOT_YET_S: Final = 0.1


class LeaseExpired(Exception):
    """This worker's lease on the partition may have lapsed: start nothing until it is renewed."""


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
        progress: Progress,
        lease_left: Callable[[], float] = lambda: math.inf,
    ) -> None:
        """`lease_left`: how long this worker still surely holds the partition's lease (by its local deadline);
        checked before every read and every call, and a read blocks no longer than that, so a worker that froze
        past its lease (a blocked loop, SIGSTOP, a paused VM) starts nothing its successor may run already, and
        reads nothing its successor's first look at the partition could miss."""
        self.handler = handler
        self.lease_left = lease_left
        self.preparer = preparer
        self.spec = spec
        self.streams = streams
        self.settings = settings
        self.consumer = consumer
        self.retention_s = retention_s
        self.progress = progress
        self.group = spec.name
        self.once = is_effectively_once(handler)
        self.guard = Guard(streams.client, streams.keys, spec)
        #: Every entry of the current batch not finished yet: all of them are renewed, not only running ones.
        self._held: set[str] = set()
        #: Entries of the batch that another consumer took over (found by the renewal): not started here.
        self._lost: set[str] = set()
        self._stopping = asyncio.Event()
        self._last_reclaim = 0.0
        #: No live consumer but this one holds entries here (on a partition just taken, the previous owner may
        #: still finish its batch: reading new entries meanwhile would let a job's newer event overtake).
        self._caught_up = False
        self._last_retry_check = 0.0
        #: The last read returned entries (the stream may have more: no need to find the next due retry).
        self._busy = False
        self._log = log.bind(handler=self.group)
        self.acks = Acknowledger(
            streams,
            self.group,
            done_ttl_s=retention_s,
            deadline_s=settings.ack_deadline_s,
            progress=progress,
            written=lambda ids: self._held.difference_update(ids),
            log=self._log,
        )
        # The hot path's metric children, looked up once.
        self._delivered = metrics.DELIVERIES.labels(self.group, "delivered")
        self._handler_seconds = metrics.HANDLER_SECONDS.labels(self.group)
        self._deadline = SharedDeadline(spec.call_limit_s)

    def lease_ok(self) -> bool:
        """Whether the partition's lease surely holds still."""
        return self.lease_left() > 0

    def stop(self) -> None:
        """Stop: no new entry is read and no call of the current batch starts; the calls in flight finish
        (see `Worker.run`), and the entries not started stay pending for the partition's next owner."""
        self._stopping.set()

    async def run(self) -> None:
        """Loop until stopped. Redis errors are logged and the loop goes on (with backoff), so it starts and
        survives while Redis is away; so does any other error (a bug, logged with its traceback each time):
        either way the batch is taken again before anything newer (a job's later event must not overtake it).
        Only `TaskDied` ends it."""
        failures = 0
        try:
            while not self._stopping.is_set():
                self.progress.turn(self.group)
                try:
                    await self.streams.ensure_groups([self.group])
                    entries, seen_before = await self._next_batch()
                    if entries:
                        await self.acks.flushed()
                        await self._process(entries, seen_before)
                    failures = 0
                except TaskDied:
                    raise
                except LeaseExpired:  # the worker renews it, or stops this runner and hands the partition over
                    self._caught_up = False  # the batch's unfinished entries go first once it is renewed
                    self._log.warning("partition_lease_expired", partition=self.streams.partition)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), _NOT_YET_S)
                except Exception as exc:  # Redis away, or a bug: log it, wait, carry on; entries stay pending
                    self._caught_up = False  # ... and are taken again before anything new is read
                    failures += 1
                    delay = retry_delay(failures)
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):  # Redis came back empty
                        self.streams.forget_groups([self.group])  # the next turn makes the group again
                    if isinstance(exc, REDIS_ERRORS):
                        self._log.warning("redis_unavailable", error=str(exc), retry_in_s=delay)
                    else:
                        self._log.exception("runner_error", retry_in_s=delay)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
            await self.acks.flushed()  # stopped: the last batch's acknowledgement is written before it returns
        except BaseException:  # cut off (cancelled), or the worker dies: an unfinished write ends with it
            self.acks.cancel()
            raise

    async def _next_batch(self) -> tuple[list[Entry], int]:
        """Up to a batch of entries: taken over, due for a retry, then new; and how many are not new."""
        size = self.settings.batch_size
        entries: list[Entry] = []
        if not self.lease_ok():
            raise LeaseExpired
        now = time.monotonic()
        if not self._caught_up or now - self._last_reclaim >= self.settings.lease_s / 2:
            await self.acks.flushed()  # this consumer's own pending entries are taken over too
            self._last_reclaim = now
            taken, busy = await self.streams.reclaim(self.group, self.consumer, size)
            self._caught_up = not busy
            entries += taken
            if entries:
                self._log.info("entries_reclaimed", count=len(entries))
            if busy and not entries:  # the previous owner is finishing its batch: read nothing new yet
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _NOT_YET_S)
                return [], 0
            if busy:
                return entries, len(entries)
        if now - self._last_retry_check >= _RETRY_CHECK_S:
            self._last_retry_check = now
            entries += await self.streams.take_due(self.group, self.consumer, size)
        seen_before = len(entries)
        if len(entries) < size:
            block = None if entries else await self._block_ms()
            # A read must end while the lease surely holds: one served after it lapsed could hand this worker
            # entries after its successor looked for what the partition's previous owner holds.
            left_s = self.lease_left()
            if left_s < 0.001:
                raise LeaseExpired
            if block is not None:
                block = int(min(block, left_s * 1000))
            # BLOCK bounds only the wait inside Redis. The read may be held up before it reaches Redis (redis-py's
            # cluster client asks a fixed node for an XREADGROUP's keys first, and that node may be the one that
            # stalls; a reconnect), and then be served after the lease lapsed: the whole call must end in time.
            # Cut off, what it may have read stays pending here and is taken again before anything newer.
            deadline = asyncio.timeout(None if math.isinf(left_s) else left_s)
            try:
                async with deadline:
                    new = await self.streams.read_new(self.group, self.consumer, size - len(entries), block)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise LeaseExpired from None
            self._busy = bool(new)
            entries += new
        return entries, seen_before

    async def _block_ms(self) -> int | None:
        """How long to wait for new entries: `block_ms`, but no later than the next due retry (None: not at
        all). While entries keep coming, the wait is short instead, which saves looking up the next retry."""
        block_s = self.settings.block_ms / 1000
        if self._busy:
            return int(min(block_s, _RETRY_CHECK_S) * 1000) or None
        due = await self.streams.next_due(self.group)
        if due is not None:
            next_check = self._last_retry_check + _RETRY_CHECK_S - time.monotonic()
            block_s = min(block_s, max(due - time.time(), next_check))
        return int(block_s * 1000) if block_s >= 0.001 else None

    async def _process(self, entries: list[Entry], seen_before: int) -> None:
        """Run one batch: per-job order kept, jobs concurrent, each finished call acknowledged before its lane
        makes another and before the batch ends (acks of concurrent lanes share a round trip), but for the
        batch's very last call, written while the next batch is read: a stop that cuts off a slow lane never
        leaves the other lanes' finished calls unacknowledged.
        Only the first `seen_before` entries (taken over, or retries) can have failed attempts to look up.
        When a lane fails (Redis away), the others start nothing more."""
        self._held = {entry.id for entry in entries}
        self._lost = set()
        try:
            ids = [entry.id for entry in entries[:seen_before]]
            attempts = dict(zip(ids, await self.streams.attempts(self.group, ids), strict=True))
            by_job = await self._prepare(entries)
            jobs = deque(by_job.values())
            halt = asyncio.Event()
            lanes = running = min(max(1, self.spec.concurrency), len(by_job))

            async def lane() -> None:
                # `concurrency` lanes share one queue of jobs: each job's events run in order in one lane.
                nonlocal running
                try:
                    while jobs:
                        items = jobs.popleft()
                        for n, (entry, about, event) in enumerate(items, 1):
                            # Stopped (SIGTERM, a hand-over): the calls in flight finish within the grace period,
                            # none starts (a call the grace period cuts off would be sent again by the next owner).
                            if halt.is_set() or self._stopping.is_set():
                                return
                            if not self.lease_ok():
                                raise LeaseExpired
                            if entry.id in self._lost:  # another consumer runs it now: not here as well
                                self._held.discard(entry.id)
                                self._log.warning("entry_taken_over", entry_id=entry.id)
                                continue
                            ack = await self._deliver(
                                entry, about, event, attempts.get(entry.id, 0), entry.id in attempts
                            )
                            if ack is None:  # a retry or the DLQ took it
                                self._held.discard(entry.id)
                            elif ack.called and (n < len(items) or jobs or running > 1):
                                await self.acks.write(ack)  # before the lane's next call, or the batch's end
                            else:  # the batch's last call: written while the next batch is read
                                self.acks.pending.append(ack)
                            self.progress.turn(self.group)
                except BaseException:
                    halt.set()
                    raise
                finally:
                    running -= 1

            outcomes = await asyncio.gather(*(lane() for _ in range(lanes)), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except asyncio.CancelledError:  # cut off: what is not acknowledged stays pending, taken over again
            self.acks.cancel()
            raise
        finally:
            # Finished, or a lane failed (Redis away): what finished is acknowledged all the same, while the
            # next batch is read; what did not stays pending and is taken over again (reclaim).
            self._held = {ack.entry_id for ack in self.acks.pending}
            self.acks.write_later()

    async def _prepare(self, entries: list[Entry]) -> dict[str, list[tuple[Entry, Event | None, Prepared]]]:
        """Decode, judge and hydrate the batch, grouped by job: each entry with its decoded event and what the
        preparation made of it. Only events this handler will get are hydrated: not another handler's replay,
        nor a repeat or stale event its rule skips (no API call for those)."""
        decoded: list[Event | None] = []
        for entry in entries:
            try:
                decoded.append(judge(decode_event(entry.record), entry.verdict))
            except (msgspec.DecodeError, ValueError):  # ValueError: a damaged verdict field (not ours to fix)
                decoded.append(None)
        mine = [e is not None and (e.target is None or e.target == self.group) for e in decoded]
        hydrate = [m and e is not None and not self._skipped_by_verdict(e) for e, m in zip(decoded, mine, strict=True)]
        ready = iter(await self.preparer.prepare_many([e for e, h in zip(decoded, hydrate, strict=True) if h and e]))
        by_job: dict[str, list[tuple[Entry, Event | None, Prepared]]] = defaultdict(list)
        for entry, event, is_mine, hydrated in zip(entries, decoded, mine, hydrate, strict=True):
            outcome: Prepared = None if event is None else (next(ready) if hydrated else event) if is_mine else _SKIP
            by_job[event.job_id if event else entry.id].append((entry, event, outcome))
        return by_job

    def _skipped_by_verdict(self, event: Event) -> bool:
        """True for a repeat, or a stale event the rule does not opt into (a targeted replay is neither)."""
        return event.target is None and (bool(event.repeat_of) or (event.stale and not self.spec.when.stale))

    async def _deliver(
        self, entry: Entry, about: Event | None, event: Prepared, failed_before: int, forget: bool
    ) -> Ack | None:
        """Handle one entry (`about`: its decoded event, `event`: what the preparation made of it); an `Ack`
        when it is finished, None when a retry or the DLQ took it."""
        entry_id = entry.id
        if event is None:
            await self.streams.dead_letter(
                self.group, entry, "undecodable record in the events stream", 0, retention_s=self.retention_s
            )
            self._log.error("event_dead_lettered", entry_id=entry_id, error="undecodable record")
            return None
        if event is _SKIP:
            return Ack(entry_id, forget)  # a replay for another handler
        assert isinstance(event, Event | BaseException) and about is not None
        # Every line about this entry (hydration failures and dead letters included) says which it is.
        token = logs.bind_delivery(
            {
                "handler": self.group,
                "webhook_id": about.id,
                "job_id": about.job_id,
                "status": about.status,
                "event_type": about.type,
                "attempt": failed_before + 1,
            }
        )
        try:
            return await self._route(entry, about, event, failed_before, forget)
        finally:
            logs.unbind_delivery(token)

    async def _route(
        self, entry: Entry, about: Event, event: Event | BaseException, failed_before: int, forget: bool
    ) -> Ack | None:
        decision = policy.screen(
            event,
            spec=self.spec,
            orphaned=entry.orphaned,
            max_takeovers=self.settings.max_takeovers,
            failed_before=failed_before,
            now=time.time(),
        )
        if decision is not None:
            return await self._apply(entry, about, decision, forget)
        assert isinstance(event, Event)
        attempt = failed_before + 1
        delivery = Delivery(
            event=event, handler=self.group, attempt=attempt, idempotency_key=f"{self.group}:{event.id}"
        )
        if not await self._call(entry, delivery):
            return None
        return Ack(entry_id=entry.id, forget=forget, done_event=event.id if self.once else "", called=True)

    async def _apply(self, entry: Entry, about: Event, decision: policy.Decision, forget: bool) -> Ack | None:
        """Carry out a decision that finishes this attempt without the handler's success: an `Ack` to write
        when the entry is finished, None when a retry or the DLQ took it."""
        match decision:
            case policy.Ack():
                return Ack(entry.id, forget)
            case policy.Skip(outcome=outcome, reason=reason):
                metrics.DELIVERIES.labels(self.group, outcome).inc()
                log.info("event_skipped", outcome=outcome, reason=reason)
                return Ack(entry.id, forget)
            case policy.Retry(at=at, after=delay, reason=reason, attempts=attempts, outcome=outcome):
                await self.streams.schedule_retry(self.group, entry.id, attempts, at, reason)
                if outcome == "not_prepared":
                    log.warning("event_not_prepared", error=reason, retry_in_s=delay)
                elif outcome == "deferred":
                    metrics.DELIVERIES.labels(self.group, outcome).inc()
                    log.info("delivery_deferred", reason=reason, retry_in_s=round(delay, 3))
                else:
                    metrics.DELIVERIES.labels(self.group, outcome).inc()
                    log.warning("delivery_failed", error=reason, retry_in_s=round(delay, 3))
                return None
            case policy.DeadLetter(reason=reason, attempts=attempts):
                await self.streams.dead_letter(self.group, entry, reason, attempts, retention_s=self.retention_s)
                metrics.DELIVERIES.labels(self.group, "dead_letter").inc()
                log.error("event_dead_lettered", error=reason, attempts=attempts)
                return None

    async def _call(self, entry: Entry, delivery: Delivery) -> bool:
        """Call the handler; True when it succeeded (or had already), False when a retry or the DLQ took it."""
        attempt, event = delivery.attempt, delivery.event
        if self.once and await self.streams.already_done(self.group, event.id):
            metrics.DELIVERIES.labels(self.group, "already_done").inc()
            log.info("event_already_delivered")
            return True
        if self.guard.active and (wait := await self.guard.admit()) is not None:
            delay, why = wait
            deferred = policy.Retry(
                at=time.time() + delay, after=delay, reason=why, attempts=attempt - 1, outcome="deferred"
            )
            await self._apply(entry, event, deferred, False)
            return False
        started = time.perf_counter()
        failure: BaseException | None = None
        task = self._deadline.start()  # call_limit_s, as asyncio.timeout would, with one timer for all lanes
        try:
            with tracing.handler_span(entry.trace, self.group, delivery.event.job_id):
                await self.handler(delivery)
        except asyncio.CancelledError as exc:
            if self._deadline.expired(task):
                failure = TimeoutError(f"the handler did not finish within {self.spec.call_limit_s} s")
            elif task.cancelling():  # this lane is being cancelled (a stop cut it off): not the handler's doing
                raise
            else:  # the handler raised it itself (a library leaking one): a failure like any other
                failure = RuntimeError("the handler raised CancelledError without being cancelled")
                failure.__cause__ = exc
        except Exception as exc:  # the handler's own bug counts as a transient failure
            failure = exc
        finally:
            self._deadline.stop(task)
        if failure is not None:
            if self.guard.active and await self._record(ok=False):
                log.warning("circuit_opened", cooldown_s=self.spec.breaker_cooldown_s)
            outcome = policy.decide(failure, spec=self.spec, attempt=attempt, now=time.time(), jitter=random.random())
            await self._apply(entry, event, outcome, False)
            return False
        if self.guard.active:
            await self._record(ok=True)
        elapsed = time.perf_counter() - started
        self._delivered.inc()
        self._handler_seconds.observe(elapsed)
        # Debug: at thousands of events a second, a line each costs more than the dispatch itself.
        self._log.debug("event_delivered", ms=round(elapsed * 1000, 2))
        return True

    async def _record(self, ok: bool) -> bool:
        """Count a call's outcome in the circuit breaker; True when this failure opened the circuit. The call
        is over: a Redis error here must not make a completed call look failed (it would be sent again), so it
        is logged and the breaker misses this one outcome."""
        try:
            return await self.guard.record(ok=ok)
        except REDIS_ERRORS as exc:
            log.warning("breaker_not_updated", ok=ok, error=str(exc))
            return False

    async def renew_leases(self) -> None:
        """Every third of a lease, reset the idle time of every entry of the batch not finished yet (running or
        waiting in a lane), so no live worker's entry is ever idle beyond the lease."""
        while not cancel_requested():
            await asyncio.sleep(self.settings.lease_s / 3)
            held = sorted(self._held)
            if not held:
                continue
            try:
                lost = set(await self.streams.renew(self.group, self.consumer, held)) & self._held
            except REDIS_ERRORS as exc:
                self._log.warning("lease_renewal_failed", error=str(exc))
                continue
            if lost:
                self._lost |= lost
                self._log.warning("leases_lost", count=len(lost))
