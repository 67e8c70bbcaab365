"""Routing rules: pure matching of `when` against events."""

from __future__ import annotations

import msgspec
import pytest

from processor.models import Event, decode_job
from processor.routing import Rule
from tests.conftest import sample


def event(name: str = "succeeded", **changes: object) -> Event:
    job = decode_job(sample(f"fine_tuning_job.{name}.json"))
    if changes:
        job = msgspec.structs.replace(job, **changes)
    return Event.from_body(job, webhook_id="wh", received_at=0.0)


THIN = Event(id="wh", type="fine_tuning.job.failed", job_id="ftjob-1", source="webhook", created_at=1, received_at=1)


@pytest.mark.parametrize(
    ("rule", "ev", "matches"),
    [
        ({}, event(), True),
        ({"status": "succeeded"}, event(), True),
        ({"status": ["failed", "cancelled"]}, event(), False),
        ({"status": ["failed", "cancelled"]}, THIN, True),
        ({"event_type": "fine_tuning.job.*"}, event(), True),
        ({"event_type": "batch.*"}, event(), False),
        ({"model": "gpt-4.1-mini*"}, event(), True),
        ({"model": ["o4-*", "gpt-4o*"]}, event(), False),
        ({"fine_tuned_model": "ft:*:acme-labs:*"}, event(), True),
        ({"fine_tuned_model": "ft:*"}, event("failed"), False),  # none yet
        ({"metadata": {"team": "support-ml"}}, event(), True),
        ({"metadata": {"team": "support-*", "dataset_version": ["v3.*", "v4.*"]}}, event(), True),
        ({"metadata": {"team": "search"}}, event(), False),
        ({"metadata": {"owner": "*"}}, event(), False),  # key must be present
        ({"metadata": {"team": "*"}}, event("failed"), False),  # no metadata at all
        ({"model": "*"}, THIN, False),  # needs the job
        ({"status": "succeeded", "metadata": {"team": "support-ml"}}, event(status="failed"), False),
    ],
)
def test_rules(rule: dict[str, object], ev: Event, matches: bool) -> None:
    parsed = msgspec.convert(rule, Rule)
    assert parsed.matches(ev) is matches
    assert (parsed.mismatch(ev) == "") is matches


def test_stale_events_are_skipped_unless_asked_for() -> None:
    stale = msgspec.structs.replace(event(), stale=True)
    assert not Rule().matches(stale)
    assert "stale" in Rule().mismatch(stale)
    assert Rule(stale=True).matches(stale)


def test_mismatch_says_why() -> None:
    rule = msgspec.convert({"metadata": {"team": "search"}}, Rule)
    assert rule.mismatch(event()) == "metadata['team'] = 'support-ml' is not one of ['search']"
