"""The worker's delivery policy, as pure functions from facts to a decision.

For one entry and one handler, `screen` decides before the call (dead-letter an entry that keeps crashing
workers or can never be prepared, wait for the API, skip an event the rule does not want, or call the
handler) and `decide` after it (ack, retry with backoff, or dead-letter). Neither touches Redis, the clock or
the random generator: the worker passes `now` and `jitter` in and applies the decision (`runner.Runner`).

    Decision = Ack | Skip | Retry | DeadLetter
"""

from __future__ import annotations

import math
from typing import Final

from msgspec import Struct

from processor.errors import PermanentFailure, RetryLater
from processor.models import Event
from processor.settings import HandlerSpec

#: How long an event waits when the API is away and said nothing about when to come back.
NOT_PREPARED_RETRY_S: Final = 5.0
#: The longest wait a `RetryLater` (a `Retry-After` header, the API's or a target's) may ask for. Without it a
#: `Retry-After: 1e400` scheduled the retry at infinity and `99999999999` in the year 5000: the event was
#: never tried again, nor dead-lettered.
MAX_WAIT_S: Final = 3600.0


def _wait(after: float | None, otherwise: float) -> float:
    """The delay a `RetryLater` asked for, within [0, `MAX_WAIT_S`]; `otherwise` when it named none (or NaN)."""
    if after is None or math.isnan(after):
        return otherwise
    return min(max(after, 0.0), MAX_WAIT_S)


class Ack(Struct, frozen=True, kw_only=True, tag=True):
    """Finished without a word: a replay meant for another handler."""


class Skip(Struct, frozen=True, kw_only=True, tag=True):
    """Finished without calling the handler, because its rule does not want the event."""

    #: The metric outcome: `repeat`, `stale` or `filtered`.
    outcome: str
    reason: str


class Retry(Struct, frozen=True, kw_only=True, tag=True):
    """Try again at `at` (unix time); the entry stays pending, with `attempts` failed attempts recorded."""

    at: float
    #: `at`, counted from the decision's `now` (for the log line).
    after: float
    reason: str
    attempts: int
    #: `retry` (the handler failed), `deferred` (a guard held it back) or `not_prepared` (the API is away).
    outcome: str


class DeadLetter(Struct, frozen=True, kw_only=True, tag=True):
    """Give up: the entry goes to the handler's dead-letter stream after `attempts` attempts."""

    reason: str
    attempts: int


Decision = Ack | Skip | Retry | DeadLetter


def ceiling(attempt: int, base_s: float, max_s: float) -> float:
    """The exponential ceiling of the delay before retry number `attempt` (1-based), capped at `max_s`."""
    return float(min(max_s, base_s * 2 ** (attempt - 1)))


def backoff_delay(attempt: int, base_s: float, max_s: float, jitter: float) -> float:
    """Full jitter: a `jitter` in [0, 1) picks the delay between 0 and the ceiling."""
    return ceiling(attempt, base_s, max_s) * jitter  # what random.uniform(0, ceiling) computes


def screen(
    event: Event | BaseException | None,
    *,
    spec: HandlerSpec,
    orphaned: int,
    max_takeovers: int,
    failed_before: int,
    now: float,
) -> Decision | None:
    """What to do with an entry before calling the handler; None to call it.

    `event` is what the preparation made of the entry: the event, why it could not be prepared, or None when
    it is a replay for another handler. `orphaned`: how often it was taken over from a consumer that died.
    """
    if event is None:
        return Ack()
    if orphaned >= max_takeovers:
        reason = f"taken over {orphaned} times from consumers that died handling it (does it crash the worker?)"
        return DeadLetter(reason=reason, attempts=failed_before)
    if isinstance(event, PermanentFailure):
        return DeadLetter(reason=str(event), attempts=failed_before)
    if isinstance(event, BaseException):  # the API is away: wait, without using an attempt
        delay = _wait(event.after if isinstance(event, RetryLater) else None, NOT_PREPARED_RETRY_S)
        return Retry(at=now + delay, after=delay, reason=str(event), attempts=failed_before, outcome="not_prepared")
    if why := spec.when.mismatch(event):
        if event.repeat_of and not event.target:
            return Skip(outcome="repeat", reason=f"repeat of {event.repeat_of}")
        if event.stale and not spec.when.stale and not event.target:
            return Skip(outcome="stale", reason="stale: older than the job's latest known status")
        return Skip(outcome="filtered", reason=why)
    return None


def decide(
    error: BaseException | None, *, spec: HandlerSpec, attempt: int, now: float, jitter: float
) -> Ack | Retry | DeadLetter:
    """What to do after attempt number `attempt` (1-based) of calling the handler ended with `error` (None:
    it succeeded). A handler's own bug counts as a transient failure; a `RetryLater` may say when."""
    if error is None:
        return Ack()
    if isinstance(error, PermanentFailure):
        return DeadLetter(reason=f"permanent failure: {error}", attempts=attempt)
    if isinstance(error, TimeoutError):
        reason = f"cut off after {spec.call_limit_s} s (twice timeout_s)"
    else:
        text = str(error)
        reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if attempt >= spec.max_attempts:
        return DeadLetter(reason=reason, attempts=attempt)
    after = error.after if isinstance(error, RetryLater) else None
    delay = _wait(after, backoff_delay(attempt, spec.backoff_s, spec.backoff_max_s, jitter))
    return Retry(at=now + delay, after=delay, reason=reason, attempts=attempt, outcome="retry")
