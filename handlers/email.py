"""The `email` handler: a plain-text + HTML email per event, over SMTP (plain, STARTTLS or TLS, optional auth).

Subject and body come from templates (good defaults per status). Recipients may be templates too
(`"{{ metadata.owner }}"` emails the job's owner; a missing key renders empty and is skipped). Header
values are single-line by construction: CR/LF in job data is removed, and configured addresses with line
breaks are refused at start. The password never appears in logs or dead letters.

Job metadata is written by anyone who can start a fine-tuning job, so a recipient rendered from a template
must be exactly one bare address (`local@domain`: no display name, brackets, separators, quotes, spaces or
control characters, no `%`/`!` routing), and, with `allowed_domains`, its domain must be listed. SMTP RCPT
gets exactly the checked addresses, never a re-parse of the headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Final, Literal

import aiosmtplib
import msgspec
import structlog

from handlers.templates import Template
from processor.handler import ConfigError, Delivery, HandlerContext, PermanentFailure, RetryLater
from processor.models import Event

log = structlog.get_logger()

#: How many connections may wait in the background for the relay's answer to QUIT. Each holds a socket for
#: up to `timeout_s`; a relay slow over QUIT would otherwise keep one open per mail sent in that time.
MAX_QUITTING: Final = 32

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
    #: Domains a recipient rendered from a template may have (exact, case-insensitive: `example.com` does not
    #: admit `sub.example.com`). Empty: any domain, so whoever writes job metadata picks the recipient.
    allowed_domains: list[str] = []
    subject: str = DEFAULT_SUBJECT
    text: str = DEFAULT_TEXT
    html: str = DEFAULT_HTML


_ATOM: Final = r"[A-Za-z0-9#$&'*+=?^_`{}~-]+"
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A bare address in its common unquoted form: a dot-atom local part without `%`, `!`, `/` or `|` (routing
#: and delivery-to-program tricks some relays still honour), `@`, and a DNS domain name.
_BARE_ADDRESS: Final = re.compile(rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>(?:{_LABEL}\.)*{_LABEL})")
_DOMAIN: Final = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")


def bare_address(value: str) -> tuple[str, str] | None:
    """`(address, lower-cased domain)` when `value` is exactly one bare address (at most 254 characters, a
    local part of at most 64); None for anything else: a display name, `<>`, `,`, `;`, spaces, quotes,
    comments, control characters and NUL, several `@`, an IP literal."""
    match = _BARE_ADDRESS.fullmatch(value)
    if match is None or len(value) > 254 or len(match["local"]) > 64:
        return None
    return value, match["domain"].lower()


def _is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def _check_address(value: str, where: str) -> None:
    if _is_template(value):
        return  # a template: checked per message
    if any(c in value for c in "\r\n") or "@" not in parseaddr(value)[1]:
        raise ConfigError(f"{where}: {value!r} is not a single email address")


def _check_domains(domains: list[str]) -> frozenset[str]:
    for i, domain in enumerate(domains):
        if not _DOMAIN.fullmatch(domain):
            raise ConfigError(f"allowed_domains[{i}]: {domain!r} is not a domain name (no '@', no wildcards)")
    return frozenset(d.lower() for d in domains)


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
        self.allowed_domains = _check_domains(options.allowed_domains)
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
        self._quitting: set[asyncio.Task[None]] = set()

    async def setup(self, context: HandlerContext) -> None:
        self.timeout_s = context.timeout_s  # each SMTP step's limit

    def message(self, delivery: Delivery) -> tuple[EmailMessage, list[str]]:
        """The email for one delivery (multipart/alternative: text, then HTML), and its envelope recipients."""
        event = delivery.event
        to = self._addresses(self.to, event)
        if not to:
            raise PermanentFailure(f"email:{self.name}: no recipient (the `to` templates rendered empty)")
        msg = EmailMessage()
        msg["Subject"] = self.subject.render(event)
        msg["From"] = self.options.from_addr
        msg["To"] = ", ".join(to)
        if cc := self._addresses(self.cc, event):
            msg["Cc"] = ", ".join(cc)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=parseaddr(self.options.from_addr)[1].rpartition("@")[2] or None)
        msg["X-Ftjobs-Idempotency-Key"] = delivery.idempotency_key
        msg.set_content(self.text.render(event))
        msg.add_alternative(self.html.render(event), subtype="html")
        return msg, [parseaddr(value)[1] for value in to + cc]

    def _addresses(self, templates: list[Template], event: Event) -> list[str]:
        """Rendered `to`/`cc` entries; one rendered from job data must be a bare address in an allowed domain."""
        out = []
        for template in templates:
            value = template.render(event).strip()
            if not value:
                continue
            if _is_template(template.source):
                checked = bare_address(value)
                if checked is None:
                    raise PermanentFailure(f"email:{self.name}: recipient {value[:100]!r} is not one bare address")
                if self.allowed_domains and checked[1] not in self.allowed_domains:
                    raise PermanentFailure(f"email:{self.name}: recipient {value!r} is outside allowed_domains")
            out.append(value)
        return out

    async def __call__(self, delivery: Delivery) -> None:
        """Send the mail. Once the relay accepted it (250 after DATA) the call is done: QUIT goes on in the
        background, because a relay slow to answer it would otherwise push the call past the worker's limit,
        and the mail would be sent again."""
        options = self.options
        message, recipients = self.message(delivery)
        client = aiosmtplib.SMTP(
            hostname=options.host,
            port=options.port or {"none": 25, "starttls": 587, "tls": 465}[options.security],
            username=options.username or None,
            password=options.password or None,
            use_tls=options.security == "tls",
            start_tls=options.security == "starttls",
            tls_context=self._tls,
            timeout=self.timeout_s,
        )
        try:
            await client.connect()
            refused, _ = await client.send_message(message, recipients=recipients)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise PermanentFailure(f"email:{self.name}: authentication refused ({exc.code})") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # Nothing was sent: a temporary refusal of them all (greylisting's 450) is worth another try.
            what = ", ".join(f"{r.recipient} ({r.code})" for r in exc.recipients)
            temporary = all(r.code < 500 for r in exc.recipients)
            failure = RetryLater if temporary else PermanentFailure
            raise failure(f"email:{self.name}: recipients refused: {what}") from None
        except aiosmtplib.SMTPResponseException as exc:
            what = f"email:{self.name}: server answered {exc.code} {exc.message}"
            raise (PermanentFailure(what) if exc.code >= 500 else RetryLater(what)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise RetryLater(f"email:{self.name}: {type(exc).__name__}") from None
        finally:
            self._hang_up(client)
        if refused:  # sent to the others; sending again would repeat it to them
            codes = {address: answer.code for address, answer in refused.items()}
            log.warning("email_recipients_refused", handler=self.name, refused=codes, event_id=delivery.event.id)

    def _hang_up(self, client: aiosmtplib.SMTP) -> None:
        """QUIT (in the background) and close, whatever became of the mail; with `MAX_QUITTING` connections
        already waiting for a QUIT's answer (a relay slow to give it), close without one."""
        if not client.is_connected or len(self._quitting) >= MAX_QUITTING:
            client.close()
            return
        task = asyncio.create_task(_quit(client))
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def close(self) -> None:
        """Let the QUITs still under way finish (each bounded by `timeout_s`)."""
        await asyncio.gather(*self._quitting)


async def _quit(client: aiosmtplib.SMTP) -> None:
    """Say QUIT, and close whatever the relay answers (or if it does not): the call's outcome, sent or not, is
    decided already."""
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        await client.quit()
    client.close()
