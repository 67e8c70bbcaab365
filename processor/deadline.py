"""One event-loop timer for many concurrent calls that each get the same time allowance.

The receiver bounds each enqueue by `enqueue_timeout_s`, a runner each handler call by `call_limit_s`: a
per-call `asyncio.timeout` arms and disarms a timer each time (a few µs of a webhook request, and of a
dispatched event). `SharedDeadline` does what `asyncio.timeout` does for them with one timer.
"""

from __future__ import annotations

import asyncio
from typing import Any


class SharedDeadline:
    """`asyncio.timeout(seconds)` for many concurrent tasks, with one event-loop timer for all of them.

    Every task gets the same allowance, so deadlines expire in the order the tasks started: they wait in an
    insertion-ordered dict, and a single timer, armed for the oldest, cancels what is overdue and re-arms
    for the next. A task that finishes in time costs a dict insert and delete. One task has one deadline at
    a time here (a request, a lane's current call).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> asyncio.Task[Any]:
        """Start the clock for the current task; pair with `stop` in a `finally`."""
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        at = loop.time() + self.seconds
        self._waiting[task] = at
        if self._timer is None:
            self._timer = loop.call_at(at, self._fire, loop)
        return task

    def stop(self, task: asyncio.Task[Any]) -> None:
        """Stop the clock; a cancellation by the deadline that the task swallowed is withdrawn (uncancel), as
        `asyncio.timeout` does on exit."""
        self._waiting.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task` was cancelled by its deadline alone (then it is uncancelled: the caller answers
        instead); False when something else cancelled it too, as `asyncio.timeout` decides."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self._waiting:
            task, at = next(iter(self._waiting.items()))
            if at > now:
                self._timer = loop.call_at(at, self._fire, loop)
                return
            del self._waiting[task]
            self._expired.add(task)
            task.cancel()
