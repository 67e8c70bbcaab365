"""Acknowledging a runner's finished entries: group commits, and the write of a batch's last one.

A finished call is acknowledged before its lane makes another one, which bounds what a crash can make a
handler do twice to the calls in flight. Lanes finishing together share one write: one lane writes at a
time, and the acks that finish meanwhile wait for the next write, which the first of their lanes makes as
soon as the current one is done (one round trip and one wake-up per lane for all of them; a lock handed
from lane to lane cost a wake-up per entry and a third of a no-op dispatch). A batch's very last ack is
written while the next batch is read (`write_later`), and waited for before any of its calls (`flushed`).
While Redis is away a write is retried until `ack_deadline_s`; then `TaskDied` ends the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from processor.client import REDIS_ERRORS
from processor.liveness import Progress, TaskDied, retry_delay
from processor.stream import Streams


class Ack(NamedTuple):
    """A finished entry, to acknowledge."""

    entry_id: str
    #: It had failed (or been taken over) before: its counters are cleared with the ack.
    forget: bool
    #: The event whose done-marker is set with the ack (an effectively-once handler succeeded); else "".
    done_event: str = ""
    #: The handler was called: acknowledged before the lane's next call and before the batch ends (else it
    #: may wait for the batch's end, as handling it again after a crash has no side effect).
    called: bool = False


class Acknowledger:
    """The acknowledgements of one runner: one handler's group on one partition."""

    def __init__(
        self,
        streams: Streams,
        group: str,
        *,
        done_ttl_s: int,
        deadline_s: float,
        progress: Progress,
        written: Callable[[Iterable[str]], None],
        log: Any,
    ) -> None:
        """`written`: told the ids of each write once Redis confirmed it (the runner stops renewing them)."""
        self.streams = streams
        self.group = group
        self.done_ttl_s = done_ttl_s
        self.deadline_s = deadline_s
        self.progress = progress
        self.written = written
        self.log = log
        #: Finished entries not acknowledged yet.
        self.pending: list[Ack] = []
        #: The lanes waiting for the next write, and whether a write is under way.
        self._waiters: list[asyncio.Future[bool]] = []
        self._writing = False
        #: The write of a batch's last acknowledgement, under way while the next batch is read.
        self._flush: asyncio.Task[None] | None = None

    async def write(self, ack: Ack | None = None) -> None:
        """Acknowledge `ack` (when given) and every entry pending, joining the next write; returns once the
        write that holds them is done."""
        if ack is not None:
            self.pending.append(ack)
        if self._writing:
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            if not await waiter:  # True: the write of the acks that waited is this lane's to make
                return
        else:
            self._writing = True
        waiters: list[asyncio.Future[bool]] = []
        try:
            # One turn of the loop first: the lanes ready to run finish their calls and join this write.
            await asyncio.sleep(0)
            acks, self.pending = self.pending, []
            waiters, self._waiters = self._waiters, []
            await self._write_now(acks)
        except BaseException as exc:
            self._writing = False
            for waiter in (*waiters, *self._waiters):  # TaskDied or shutdown: every waiting lane ends
                if not waiter.done():
                    waiter.set_exception(exc)
            self._waiters = []
            raise
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(False)
        while self._waiters:  # hand the next write to a lane whose ack waits for it
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(True)
                return
        self._writing = False

    def write_later(self) -> None:
        """Write what is pending (a batch's last acknowledgement) while the runner goes on to read."""
        if self.pending:
            self._flush = asyncio.create_task(self.write())

    async def flushed(self) -> None:
        """Wait until the write `write_later` started is done (raising what it raised)."""
        if self._flush is not None:
            flush, self._flush = self._flush, None
            await flush

    def cancel(self) -> None:
        """The runner was cut off: what is not written stays pending in Redis, taken over again later."""
        if self._flush is not None:
            self._flush.cancel()
        self.pending, self._waiters, self._writing = [], [], False

    async def _write_now(self, acks: list[Ack]) -> None:
        """One acknowledging step for `acks`, retried while Redis is away until `ack_deadline_s`."""
        if not acks:
            return
        deadline = time.monotonic() + self.deadline_s
        failures = 0
        while True:
            try:
                await self.streams.ack(
                    self.group,
                    [a.entry_id for a in acks],
                    retried=[a.entry_id for a in acks if a.forget],
                    done=[a.done_event for a in acks if a.done_event],
                    done_ttl_s=self.done_ttl_s,
                )
                break
            except REDIS_ERRORS as exc:
                failures += 1
                self.progress.turn(self.group)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TaskDied(
                        f"{len(acks)} finished entries of {self.group} could not be acknowledged within "
                        f"ack_deadline_s={self.deadline_s}: {exc}"
                    ) from exc
                delay = min(retry_delay(failures), left)
                self.log.warning("ack_retrying", error=str(exc), entries=len(acks), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
        self.written(a.entry_id for a in acks)
