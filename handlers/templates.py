"""Message templates: Jinja2 in a sandbox, with the job, the event and a few helpers in the context.

Each output has its own escaping, applied to every `{{ ... }}` value (Jinja's `finalize`), so job data
(metadata, model suffixes, error messages) cannot change the message's structure:

* `slack` — `&`, `<`, `>` escaped: no `<!channel>` mentions, no `<url|links>`;
* `header` — CR/LF removed: no header injection in email subjects or addresses;
* `json` — values escaped as JSON string content (numbers, booleans and null as JSON literals);
* `html` — HTML autoescape; `text` — as is.

Templates are compiled and rendered against sample jobs of every status when a handler is built, so a
template error is a configuration error at start (`ftjobs check-config`), never a crash at run time.
"""

from __future__ import annotations

import functools
import json
import time
from collections import defaultdict
from typing import Any, Final, Literal
from urllib.parse import quote

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from processor.errors import ConfigError
from processor.humanize import human_duration, human_time, human_tokens
from processor.models import KNOWN_STATUSES, Event, FineTuningJob, sample_job

Flavor = Literal["text", "html", "slack", "header", "json"]

DASHBOARD_URL: Final = "https://platform.openai.com/finetune/{job_id}"
STATUS_EMOJI: Final = {
    "succeeded": "✅",
    "failed": "❌",
    "cancelled": "🚫",
    "running": "🏃",
    "queued": "⏳",
    "validating_files": "🔎",
}
STATUS_COLOR: Final = {"succeeded": "#2eb886", "failed": "#d40e0d", "cancelled": "#9e9e9e"}


def slack_escape(text: str) -> str:
    """Slack's three control characters, escaped as its docs require (also defuses `<!channel>`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_link(url: str, label: str) -> str:
    """A Slack link `<url|label>` whose parts cannot end it early: the URL with `|` and the three control
    characters percent-quoted (it is a URL, so they stay meaningful), the label escaped."""
    target = url.replace("&", "%26").replace("<", "%3C").replace(">", "%3E").replace("|", "%7C")
    return f"<{target}|{slack_escape(label)}>"


#: C0 controls (CR, LF and tab among them), DEL and C1 controls: none belongs in a header's text.
_HEADER_CONTROLS: Final = dict.fromkeys((*range(0x20), *range(0x7F, 0xA0)), " ")


def header_safe(text: str) -> str:
    """One line of text: line breaks (CR, LF, and Unicode's) and every other control character become spaces,
    so a value can neither start a header (injection) nor carry a NUL or an escape into one (RFC 5322 forbids
    NUL; a relay may refuse the message)."""
    return " ".join(str(text).splitlines()).translate(_HEADER_CONTROLS)


def _json_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)[1:-1]
    return json.dumps(value if isinstance(value, int | float | bool) or value is None else str(value))


def _finalizer(flavor: Flavor) -> Any:
    def finalize(value: Any) -> Any:
        if flavor == "json":
            return _json_value(value)
        if value is None:
            return ""
        if flavor == "slack":
            return slack_escape(str(value))
        if flavor == "header":
            return header_safe(str(value))
        return value

    return finalize


def context(event: Event, now: float | None = None) -> dict[str, Any]:
    """What templates see: `job` (always a job; a thin event gets one with only id, status and time),
    `event`, `status`, `emoji`, `color`, `duration`, `trained_tokens`, `finished`, `dashboard_url`, `error`."""
    job = event.job or FineTuningJob(
        id=event.job_id, created_at=event.created_at, model="", status=event.status or "unknown"
    )
    end = job.finished_at or (now or time.time())
    status = job.status
    error = job.failed_error
    return {
        "job": job,
        "event": {
            "id": event.id,
            "type": event.type,
            "source": event.source,
            "status": status,
            "previous_status": event.previous_status,
            "received_at": human_time(event.received_at),
            "created_at": human_time(event.created_at),
            "stale": event.stale,
            "thin": event.job is None,
        },
        "status": status,
        "emoji": STATUS_EMOJI.get(status, "\N{INFORMATION SOURCE}\ufe0f"),
        "color": STATUS_COLOR.get(status, "#439fe0"),
        "duration": human_duration(end - job.created_at) if job.created_at else "",
        "trained_tokens": human_tokens(job.trained_tokens),
        "finished": human_time(job.finished_at),
        # Quoted: the id is sender data, and the URL lands inside Slack links and HTML attributes.
        "dashboard_url": DASHBOARD_URL.format(job_id=quote(job.id, safe="")),
        "error": error,
        # A missing key reads as empty (`{{ metadata.owner }}`), so templates can use optional metadata.
        "metadata": defaultdict(str, job.metadata or {}),
    }


def _environment(flavor: Flavor) -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        autoescape=flavor == "html",
        undefined=jinja2.StrictUndefined,
        finalize=_finalizer(flavor),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters.update(human_time=human_time, duration=human_duration, tokens=human_tokens)
    if flavor == "slack":
        env.filters["slack_escape"] = slack_escape
    return env


_ENVIRONMENTS: Final = {flavor: _environment(flavor) for flavor in ("text", "html", "slack", "header", "json")}


class Template:
    """A compiled template of one flavor; `render(event)` fills it in."""

    def __init__(self, source: str, flavor: Flavor, where: str) -> None:
        self.source = source
        self.flavor = flavor
        self.where = where
        try:
            self._template = _ENVIRONMENTS[flavor].from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{where}: template syntax error on line {exc.lineno}: {exc.message}") from None
        for event in sample_events():
            try:
                self.render(event)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"{where}: template fails on a sample {event.status} job: {exc}") from None

    def render(self, event: Event) -> str:
        text = self._template.render(context(event))
        if self.flavor == "json":
            try:
                json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"{self.where}: template does not render valid JSON ({exc})") from None
        return text


@functools.cache
def sample_events() -> tuple[Event, ...]:
    """One full event per known status (from the packaged samples) and a thin one, for template checks."""
    events = []
    for status in sorted(KNOWN_STATUSES):
        job = sample_job(status)
        events.append(Event.from_body(job, webhook_id=f"wh_sample_{status}", received_at=job.created_at))
    failed = sample_job("failed")
    thin = Event(
        id="wh_sample_thin",
        type="fine_tuning.job.failed",
        job_id=failed.id,
        source="webhook",
        created_at=failed.created_at,
        received_at=failed.created_at,
    )
    return (*events, thin)
