"""Routing: which handler wants which event. Pure; the worker asks `rule.matches(event)` before calling.

A rule (`when = {...}` on a handler) lists conditions that must all hold; a list means any of its values;
values are shell-style globs (`fine_tuning.job.*`, `ft:gpt-4o*`). Stale events (older than the last one
processed for the job) are skipped unless the rule opts in with `stale = true`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from msgspec import Struct

from processor.models import Event


class Rule(Struct, forbid_unknown_fields=True, kw_only=True):
    """A handler's `when` table. An empty rule matches every event that is not stale."""

    #: Event types, e.g. `fine_tuning.job.failed` or `fine_tuning.job.*`.
    event_type: str | list[str] = []
    #: Job statuses, e.g. `["failed", "cancelled"]`.
    status: str | list[str] = []
    #: Deliver events marked stale too.
    stale: bool = False

    def matches(self, event: Event) -> bool:
        """True when every condition given holds for `event`."""
        if event.stale and not self.stale:
            return False
        if self.event_type and not _any_glob(event.type, self.event_type):
            return False
        return not (self.status and not _any_glob(event.status, self.status))


def _any_glob(value: str | None, patterns: str | list[str]) -> bool:
    if value is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatchcase(value, pattern) for pattern in patterns)
