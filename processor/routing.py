"""Routing: which handler wants which event. Pure; the worker asks `rule.matches(event)` before calling.

A rule (`when = {...}` on a handler) lists conditions that must all hold; a list means any of its values;
values are shell-style globs (`fine_tuning.job.*`, `ft:gpt-4o*`). Conditions on the job (model, fine-tuned
model, metadata) need the job: an event that has none (a thin webhook not hydrated) does not match them.
Stale events (older than the last one processed for the job) are skipped unless the rule opts in; repeats
(a status already announced) are skipped. A replay aimed at one handler (`ftjobs dlq replay`) is neither.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from msgspec import Struct

from processor.models import Event

Patterns = str | list[str]


class Rule(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A handler's `when` table. An empty rule matches every event that is not stale."""

    #: Event types, e.g. `fine_tuning.job.failed` or `fine_tuning.job.*`.
    event_type: Patterns = []
    #: Job statuses, e.g. `["failed", "cancelled"]`.
    status: Patterns = []
    #: Base model (`job.model`), e.g. `gpt-4.1-mini*`.
    model: Patterns = []
    #: Fine-tuned model name, e.g. `ft:gpt-4.1-mini*:acme-labs:*`.
    fine_tuned_model: Patterns = []
    #: Metadata: each key must be present with a value matching one of its patterns (`"*"`: any value).
    metadata: dict[str, Patterns] = {}
    #: Deliver events marked stale too.
    stale: bool = False

    def matches(self, event: Event) -> bool:
        """True when every condition given holds for `event`."""
        return not self.mismatch(event)

    def mismatch(self, event: Event) -> str:
        """The first condition `event` fails, as a short sentence; empty when it matches."""
        if event.repeat_of and not event.target:
            return f"this status was already announced by event {event.repeat_of}"
        if event.stale and not self.stale and not event.target:
            return "the event is stale (an older status than the job's latest)"
        if self.event_type and not _any_glob(event.type, self.event_type):
            return f"event_type {event.type!r} is not one of {_show(self.event_type)}"
        if self.status and not _any_glob(event.status, self.status):
            return f"status {event.status!r} is not one of {_show(self.status)}"
        job = event.job
        if (self.model or self.fine_tuned_model or self.metadata) and job is None:
            return "the rule looks at the job, and this event carries none (a thin webhook, not hydrated)"
        if job is None:
            return ""
        if self.model and not _any_glob(job.model, self.model):
            return f"model {job.model!r} is not one of {_show(self.model)}"
        if self.fine_tuned_model and not _any_glob(job.fine_tuned_model, self.fine_tuned_model):
            return f"fine_tuned_model {job.fine_tuned_model!r} is not one of {_show(self.fine_tuned_model)}"
        metadata = job.metadata or {}
        for key, patterns in self.metadata.items():
            if not _any_glob(metadata.get(key), patterns):
                return f"metadata[{key!r}] = {metadata.get(key)!r} is not one of {_show(patterns)}"
        return ""


def _any_glob(value: str | None, patterns: Patterns) -> bool:
    if value is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _show(patterns: Patterns) -> str:
    return repr([patterns] if isinstance(patterns, str) else patterns)
