"""Where one event stands with one handler, decided purely from facts read out of Redis.

The worker never writes "delivered" anywhere a reader can find for every handler, so the state is derived:
an entry the group has not read yet is queued; one waiting in the retry set is retrying; one still pending
is in flight; one in the dead-letter stream is dead; one read and acknowledged was delivered, unless the
handler's rule (or the event's verdict) skipped it, which `Rule.mismatch` explains in words.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

Kind = Literal["queued", "in_flight", "retrying", "dead", "done", "skipped", "unknown"]


class Facts(Struct, kw_only=True):
    """What Redis says about one entry in one handler's group."""

    #: The group has read past the entry (its last-delivered id is at or after it).
    read: bool
    #: The entry is in the group's pending list (read, not acknowledged).
    pending: bool = False
    #: When the next attempt is due, if the entry waits in the retry set.
    retry_at: float | None = None
    #: Failed attempts so far, and the last error (from the attempts hash).
    attempts: int = 0
    error: str = ""
    #: The entry's dead letter, if it has one: (its id, when it failed, attempts, error).
    dead: tuple[str, float, int, str] | None = None
    #: Why the handler skips the event (`Rule.mismatch`, or a replay meant for another handler); "" if not.
    skip: str = ""
    #: An effectively-once handler recorded this event as done.
    done_marker: bool = False


class State(Struct, kw_only=True):
    """The derived state, ready to show."""

    kind: Kind
    detail: str = ""
    attempts: int = 0
    error: str = ""
    #: The next attempt (retrying) or the time it failed (dead), as a unix time.
    at: float | None = None
    #: The dead letter's id (dead).
    letter: str = ""


def decide(facts: Facts) -> State:
    """The state of an entry for one handler. Dead and retrying come first: both leave the entry pending."""
    if facts.dead is not None:
        letter, failed_at, attempts, error = facts.dead
        return State(kind="dead", detail="dead-lettered", attempts=attempts, error=error, at=failed_at, letter=letter)
    if facts.retry_at is not None:
        return State(
            kind="retrying",
            detail="waiting for its next attempt",
            attempts=facts.attempts,
            error=facts.error,
            at=facts.retry_at,
        )
    if facts.pending:
        return State(kind="in_flight", detail="being handled now", attempts=facts.attempts)
    if not facts.read:
        return State(kind="queued", detail=f"not read yet; will skip: {facts.skip}" if facts.skip else "not read yet")
    if facts.skip:
        return State(kind="skipped", detail=facts.skip)
    if facts.done_marker:
        return State(kind="done", detail="delivered (recorded by its idempotency key)")
    return State(kind="done", detail="delivered")


def unknown(why: str) -> State:
    """A state that cannot be derived (the entry or its dedupe marker is gone)."""
    return State(kind="unknown", detail=why)
