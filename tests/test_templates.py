"""Templates: sandboxed, escaped per output, checked at start."""

from __future__ import annotations

import json

import msgspec
import pytest

from handlers.templates import Template, human_duration, human_tokens, sample_events
from processor.errors import ConfigError
from processor.models import Event, decode_job
from tests.conftest import sample


def event_with(**metadata: str) -> Event:
    job = decode_job(sample("fine_tuning_job.succeeded.json"))
    return Event.from_body(msgspec.structs.replace(job, metadata=metadata), webhook_id="wh", received_at=0.0)


def test_context_helpers() -> None:
    template = Template("{{ emoji }} {{ status }} {{ duration }} {{ trained_tokens }} {{ finished }}", "text", "t")
    job_event = Event.from_body(decode_job(sample("fine_tuning_job.succeeded.json")), webhook_id="w", received_at=0)
    assert template.render(job_event) == "✅ succeeded 3h 56m 6.28M 2025-10-27 10:57 UTC"
    assert (human_duration(59), human_duration(61), human_tokens(980), human_tokens(12_500)) == (
        "59s",
        "1m 01s",
        "980",
        "12.5k",
    )


@pytest.mark.parametrize(
    ("flavor", "value", "expected"),
    [
        ("slack", "<!channel> & <http://x|y>", "&lt;!channel&gt; &amp; &lt;http://x|y&gt;"),
        ("header", "a\r\nBcc: b@c.d", "a Bcc: b@c.d"),
        ("html", "<b>x</b>", "&lt;b&gt;x&lt;/b&gt;"),
        ("text", "{{ 7*7 }}", "{{ 7*7 }}"),
    ],
)
def test_job_data_is_escaped_for_each_output(flavor: str, value: str, expected: str) -> None:
    template = Template("{{ metadata.note }}", flavor, "t")  # type: ignore[arg-type]
    assert template.render(event_with(note=value)) == expected


def test_json_flavor_escapes_strings() -> None:
    template = Template('{"note": "{{ metadata.note }}"}', "json", "t")
    assert json.loads(template.render(event_with(note='q"\\\n", "admin": true'))) == {"note": 'q"\\\n", "admin": true'}


def test_json_flavor_renders_literals() -> None:
    template = Template(
        '{"tokens": {{ job.trained_tokens }}, "error": {{ job.error }}, "s": "{{ status }}"}', "json", "t"
    )
    assert json.loads(template.render(event_with())) == {"tokens": 6284512, "error": None, "s": "succeeded"}


def test_sandbox_blocks_unsafe_access() -> None:
    with pytest.raises(ConfigError, match="template fails"):
        Template("{{ job.__class__.__mro__[1].__subclasses__() }}", "text", "t")


@pytest.mark.parametrize(
    ("source", "message"),
    [("{{ job.id ", "syntax error"), ("{{ job.no_such_field }}", "fails on a sample"), ("{{ nope }}", "fails")],
)
def test_template_errors_are_config_errors(source: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Template(source, "text", "handler.text")


def test_missing_metadata_reads_empty() -> None:
    assert Template("[{{ metadata.owner }}]", "text", "t").render(event_with()) == "[]"


def test_every_status_and_a_thin_event_are_checked() -> None:
    statuses = {e.status for e in sample_events()}
    assert {"validating_files", "queued", "running", "succeeded", "failed", "cancelled"} <= statuses
    assert any(e.job is None for e in sample_events())
