"""The worker's delivery policy and the verdict, as pure functions: no Redis, no clock, no randomness."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.enqueue import Verdict
from processor.errors import PermanentFailure, RetryLater
from processor.jobstate import judge
from processor.liveness import retry_delay
from processor.models import Event
from processor.policy import MAX_WAIT_S, Ack, DeadLetter, Retry, Skip, backoff_delay, ceiling, decide, screen
from processor.settings import HandlerSpec, Settings

NOW = 1_700_000_000.0


def spec(**table: Any) -> HandlerSpec:
    """One `[[handlers]]` table, as the settings load it."""
    raw = {"name": "h", "type": "log", "max_attempts": 3, "backoff_s": 1.0, "backoff_max_s": 10.0} | table
    return Settings.from_raw({"handlers": [raw]}, env={}).handlers[0]


def event(status: str = "succeeded", **fields: Any) -> Event:
    """A thin job event announcing `status`."""
    base = Event(
        id="wh_1",
        type=f"fine_tuning.job.{status}",
        job_id="ftjob-1",
        source="webhook",
        created_at=1,
        received_at=NOW,
    )
    return msgspec.structs.replace(base, **fields)


def screened(prepared: Event | BaseException | None, handler: HandlerSpec | None = None, **facts: Any) -> Any:
    facts = {"orphaned": 0, "max_takeovers": 3, "failed_before": 0, "now": NOW} | facts
    return screen(prepared, spec=handler or spec(), **facts)


# Before the call


def test_an_event_the_rule_wants_is_handed_to_the_handler() -> None:
    assert screened(event()) is None


def test_a_replay_for_another_handler_is_acknowledged_silently() -> None:
    assert screened(None) == Ack()


def test_an_entry_that_keeps_killing_workers_is_dead_lettered_first() -> None:
    decision = screened(PermanentFailure("gone"), orphaned=3, failed_before=2)
    assert isinstance(decision, DeadLetter)
    assert decision.attempts == 2
    assert decision.reason.startswith("taken over 3 times")


def test_an_event_that_can_never_be_prepared_is_dead_lettered() -> None:
    assert screened(PermanentFailure("hydration: job ftjob-1 not found"), failed_before=1) == DeadLetter(
        reason="hydration: job ftjob-1 not found", attempts=1
    )


@pytest.mark.parametrize(("error", "after"), [(RetryLater("API away", after=12.5), 12.5), (OSError("reset"), 5.0)])
def test_an_event_the_api_cannot_prepare_now_waits_without_using_an_attempt(error: Exception, after: float) -> None:
    assert screened(error, failed_before=2) == Retry(
        at=NOW + after, after=after, reason=str(error), attempts=2, outcome="not_prepared"
    )


def test_skips_say_why_repeat_before_stale_before_the_rule() -> None:
    wants_failed = spec(when={"status": "failed"})
    assert screened(event(repeat_of="wh_0"), wants_failed) == Skip(outcome="repeat", reason="repeat of wh_0")
    assert screened(event(stale=True), wants_failed) == Skip(
        outcome="stale", reason="stale: older than the job's latest known status"
    )
    decision = screened(event(), wants_failed)
    assert isinstance(decision, Skip) and decision.outcome == "filtered" and "status" in decision.reason


def test_a_targeted_replay_is_delivered_even_when_stale_or_a_repeat() -> None:
    assert screened(event(stale=True, repeat_of="wh_0", target="h")) is None


# After the call


def test_success_is_acknowledged() -> None:
    assert decide(None, spec=spec(), attempt=1, now=NOW, jitter=0.5) == Ack()


def test_a_permanent_failure_is_dead_lettered_at_once() -> None:
    assert decide(PermanentFailure("bad token"), spec=spec(), attempt=1, now=NOW, jitter=0.5) == DeadLetter(
        reason="permanent failure: bad token", attempts=1
    )


def test_a_failure_is_retried_by_the_backoff_until_the_last_attempt() -> None:
    handler = spec()
    assert decide(ValueError("boom"), spec=handler, attempt=2, now=NOW, jitter=0.5) == Retry(
        at=NOW + 1.0, after=1.0, reason="ValueError: boom", attempts=2, outcome="retry"
    )
    assert decide(ValueError(), spec=handler, attempt=3, now=NOW, jitter=0.5) == DeadLetter(
        reason="ValueError", attempts=3
    )


def test_a_handler_may_say_when_to_retry_and_a_timeout_says_it_was_cut_off() -> None:
    handler = spec(timeout_s=4)
    retry = decide(RetryLater("429", after=30), spec=handler, attempt=1, now=NOW, jitter=0.0)
    assert isinstance(retry, Retry) and retry.at == NOW + 30
    cut = decide(TimeoutError(), spec=handler, attempt=1, now=NOW, jitter=0.0)
    assert isinstance(cut, Retry) and cut.reason == "cut off after 8.0 s (twice timeout_s)"


@pytest.mark.parametrize(
    ("after", "delay"),
    [(float("inf"), MAX_WAIT_S), (99999999999.0, MAX_WAIT_S), (-5.0, 0.0), (float("nan"), None)],
)
def test_a_retry_after_is_kept_within_an_hour(after: float, delay: float | None) -> None:
    """A `Retry-After: 1e400` (a target's, or the API's while hydrating) scheduled the retry at infinity: the
    event was never tried again nor dead-lettered. NaN means "no advice": the backoff, or the API default."""
    handler = spec(backoff_s=1.0, backoff_max_s=10.0)
    retry = decide(RetryLater("429", after=after), spec=handler, attempt=1, now=NOW, jitter=0.5)
    assert (
        isinstance(retry, Retry) and retry.after == (0.5 if delay is None else delay) and retry.at == NOW + retry.after
    )
    waiting = screened(RetryLater("API away", after=after))
    assert isinstance(waiting, Retry) and waiting.after == (5.0 if delay is None else delay)


@given(
    attempt=st.integers(min_value=1, max_value=60),
    max_attempts=st.integers(min_value=1, max_value=60),
    jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
    after=st.none() | st.floats(min_value=0, max_value=3600),
)
def test_every_failure_is_retried_in_the_future_or_dead_lettered(
    attempt: int, max_attempts: int, jitter: float, after: float | None
) -> None:
    handler = spec(max_attempts=max_attempts, backoff_s=0.5, backoff_max_s=300)
    decision = decide(RetryLater("busy", after=after), spec=handler, attempt=attempt, now=NOW, jitter=jitter)
    if attempt >= max_attempts:
        assert decision == DeadLetter(reason="RetryLater: busy", attempts=attempt)
    else:
        assert isinstance(decision, Retry) and decision.attempts == attempt
        assert NOW <= decision.at <= NOW + (after if after is not None else 300)


@given(attempt=st.integers(min_value=1, max_value=200), jitter=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling(attempt: int, jitter: float) -> None:
    assert 0 <= backoff_delay(attempt, 1.0, 60.0, jitter) <= ceiling(attempt, 1.0, 60.0) <= 60.0
    assert ceiling(attempt + 1, 1.0, 60.0) in (60.0, 2 * ceiling(attempt, 1.0, 60.0))


def test_redis_away_backoff_doubles_from_a_fifth_of_a_second_to_its_cap() -> None:
    assert [retry_delay(n) for n in range(1, 6)] == [0.2, 0.4, 0.8, 1.6, 2.0]
    assert retry_delay(10_000, cap_s=5.0) == 5.0


# The verdict written at enqueue, and how the worker applies it


def test_the_verdict_string_round_trips_into_the_event() -> None:
    assert Verdict.parse(b"") is None
    assert Verdict.parse(b"repeat|running|wh_0") == Verdict("repeat", "running", "wh_0")
    assert Verdict.parse("stale|succeeded|").skipped == "stale"
    judged = judge(event(), b"repeat|running|wh_0")
    assert (judged.previous_status, judged.stale, judged.repeat_of) == ("running", False, "wh_0")
    judged = judge(event(), b"stale|succeeded|")
    assert (judged.previous_status, judged.stale, judged.repeat_of) == ("succeeded", True, None)
    assert judge(event(), b"") == event()
