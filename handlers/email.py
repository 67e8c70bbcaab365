"""The `email` handler: a plain-text + HTML email per event, over SMTP (plain, STARTTLS or TLS, optional auth).

Subject and body come from templates (good defaults per status). Recipients may be templates too
(`"{{ metadata.owner }}"` emails the job's owner; a missing key renders empty and is skipped). Header
values are single-line by construction: CR/LF in job data is removed, and configured addresses with line
breaks are refused at start. The password never appears in logs or dead letters.
"""

from __future__ import annotations

import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Final, Literal

import aiosmtplib
import msgspec

from handlers.base import ConfigError, Delivery, HandlerContext, PermanentFailure, RetryLater
from handlers.templates import Template
from processor.models import Event

DEFAULT_SUBJECT: Final = (
    "[ftjobs] {{ emoji }} {{ job.id }} {{ status }}{% if job.fine_tuned_model %}: {{ job.fine_tuned_model }}{% endif %}"
)
DEFAULT_TEXT: Final = """\
Fine-tuning job {{ job.id }} {{ status }}.

{% if job.model %}Base model:        {{ job.model }}
{% endif %}{% if job.fine_tuned_model %}Fine-tuned model:  {{ job.fine_tuned_model }}
{% endif %}{% if finished %}Finished:          {{ finished }} (took {{ duration }})
{% endif %}{% if trained_tokens %}Trained tokens:    {{ trained_tokens }}
{% endif %}{% if error %}Error:             {{ error.code }}: {{ error.message }}
{% endif %}{% for key, value in metadata.items() %}{{ key }}: {{ value }}
{% endfor %}
{{ dashboard_url }}
"""
DEFAULT_HTML: Final = """\
<h2>{{ emoji }} Fine-tuning job {{ status }}</h2>
<table>
<tr><th align="left">Job</th><td><a href="{{ dashboard_url }}">{{ job.id }}</a></td></tr>
{% if job.model %}<tr><th align="left">Base model</th><td>{{ job.model }}</td></tr>{% endif %}
{% if job.fine_tuned_model %}<tr><th align="left">Fine-tuned model</th>
<td><code>{{ job.fine_tuned_model }}</code></td></tr>{% endif %}
{% if finished %}<tr><th align="left">Finished</th><td>{{ finished }} (took {{ duration }})</td></tr>{% endif %}
{% if trained_tokens %}<tr><th align="left">Trained tokens</th><td>{{ trained_tokens }}</td></tr>{% endif %}
{% if error %}<tr><th align="left">Error</th><td><code>{{ error.code }}</code>: {{ error.message }}</td></tr>{% endif %}
{% for key, value in metadata.items() %}<tr><th align="left">{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}
</table>
"""


class EmailOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str
    #: 0: 25 for `none`, 587 for `starttls`, 465 for `tls`.
    port: int = 0
    security: Literal["none", "starttls", "tls"] = "starttls"
    username: str = ""
    password: str = ""
    #: A CA bundle to trust (a private relay); the system's otherwise.
    ca_file: str = ""
    from_addr: str
    to: list[str]
    cc: list[str] = []
    subject: str = DEFAULT_SUBJECT
    text: str = DEFAULT_TEXT
    html: str = DEFAULT_HTML


def _check_address(value: str, where: str) -> None:
    if "{{" in value:
        return  # a template: checked per message
    if any(c in value for c in "\r\n") or "@" not in parseaddr(value)[1]:
        raise ConfigError(f"{where}: {value!r} is not a single email address")


class EmailHandler:
    """Sends one email per event; never twice for the same event (effectively once)."""

    Options = EmailOptions
    effectively_once = True

    def __init__(self, name: str, options: EmailOptions) -> None:
        _check_address(options.from_addr, "from_addr")
        for field in ("to", "cc"):
            for i, value in enumerate(getattr(options, field)):
                _check_address(value, f"{field}[{i}]")
        if not options.to:
            raise ConfigError("to: at least one recipient is required")
        self.name = name
        self.options = options
        self.subject = Template(options.subject, "header", f"{name}.subject")
        self.text = Template(options.text, "text", f"{name}.text")
        self.html = Template(options.html, "html", f"{name}.html")
        self.to = [Template(v, "header", f"{name}.to") for v in options.to]
        self.cc = [Template(v, "header", f"{name}.cc") for v in options.cc]
        self._tls: ssl.SSLContext | None = None
        if options.security != "none":
            self._tls = ssl.create_default_context(cafile=options.ca_file or None)
        self.timeout_s = HandlerContext.timeout_s

    async def setup(self, context: HandlerContext) -> None:
        self.timeout_s = context.timeout_s  # each SMTP step's limit

    def message(self, delivery: Delivery) -> EmailMessage:
        """The email for one delivery (multipart/alternative: text, then HTML)."""
        event = delivery.event
        to = _addresses(self.to, event)
        if not to:
            raise PermanentFailure(f"email:{self.name}: no recipient (the `to` templates rendered empty)")
        msg = EmailMessage()
        msg["Subject"] = self.subject.render(event)
        msg["From"] = self.options.from_addr
        msg["To"] = ", ".join(to)
        if cc := _addresses(self.cc, event):
            msg["Cc"] = ", ".join(cc)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=parseaddr(self.options.from_addr)[1].rpartition("@")[2] or None)
        msg["X-Ftjobs-Idempotency-Key"] = delivery.idempotency_key
        msg.set_content(self.text.render(event))
        msg.add_alternative(self.html.render(event), subtype="html")
        return msg

    async def __call__(self, delivery: Delivery) -> None:
        options = self.options
        message = self.message(delivery)
        port = options.port or {"none": 25, "starttls": 587, "tls": 465}[options.security]
        try:
            await aiosmtplib.send(
                message,
                hostname=options.host,
                port=port,
                username=options.username or None,
                password=options.password or None,
                use_tls=options.security == "tls",
                start_tls=options.security == "starttls",
                tls_context=self._tls,
                timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise PermanentFailure(f"email:{self.name}: authentication refused ({exc.code})") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = ", ".join(r.recipient for r in exc.recipients)
            raise PermanentFailure(f"email:{self.name}: recipients refused: {refused}") from None
        except aiosmtplib.SMTPResponseException as exc:
            what = f"email:{self.name}: server answered {exc.code} {exc.message}"
            raise (PermanentFailure(what) if exc.code >= 500 else RetryLater(what)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise RetryLater(f"email:{self.name}: {type(exc).__name__}") from None


def _addresses(templates: list[Template], event: Event) -> list[str]:
    out = []
    for template in templates:
        value = template.render(event).strip()
        if not value:
            continue
        if "@" not in parseaddr(value)[1] or "," in value:
            raise PermanentFailure(f"rendered recipient {value!r} is not a single email address")
        out.append(value)
    return out
