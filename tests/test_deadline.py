"""`SharedDeadline`: one timer bounding many concurrent tasks (enqueues, handler calls)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from processor.deadline import SharedDeadline


async def test_shared_deadline_cancels_only_overdue_waits() -> None:
    """The enqueue deadline's one timer: a wait past it is cancelled and reported as expired (uncancelled, so
    the request can answer 503); waits that end in time are untouched; a cancellation from elsewhere (the
    client went away) stays a cancellation."""
    deadline = SharedDeadline(0.05)

    async def wait(for_s: float | None) -> str:
        task = deadline.start()
        try:
            if for_s is None:
                await asyncio.get_running_loop().create_future()  # never done
            else:
                await asyncio.sleep(for_s)
            return "done"
        except asyncio.CancelledError:
            if deadline.expired(task):
                return "expired"
            raise
        finally:
            deadline.stop(task)

    stuck, quick, later = (asyncio.create_task(wait(s)) for s in (None, 0.0, None))
    assert await quick == "done"
    assert await stuck == "expired" and await later == "expired"
    assert stuck.cancelling() == 0
    assert await asyncio.create_task(wait(0.0)) == "done"  # the timer re-arms for later waits
    gone = asyncio.create_task(wait(None))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_swallowed_deadline_cancellation_is_withdrawn_on_stop() -> None:
    """A handler that catches the deadline's CancelledError and returns: `stop` uncancels its task, as
    `asyncio.timeout` does, so the task's later awaits and timeouts are not disturbed."""
    deadline = SharedDeadline(0.01)

    async def stubborn() -> str:
        task = deadline.start()
        try:
            with contextlib.suppress(asyncio.CancelledError):  # swallowed
                await asyncio.get_running_loop().create_future()
        finally:
            deadline.stop(task)
        assert task.cancelling() == 0
        await asyncio.sleep(0)  # no cancellation left pending
        async with asyncio.timeout(5):
            await asyncio.sleep(0)
        return "went on"

    assert await asyncio.create_task(stubborn()) == "went on"
