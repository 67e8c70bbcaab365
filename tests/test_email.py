"""The email handler against aiosmtpd, a real SMTP server: plain, STARTTLS with auth, and implicit TLS."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import ssl
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.conftest import build_fails, captured_logs, compact, eventually, free_port, sample

PASSWORD = "smtp-pass-9f3a"


class Inbox:
    """An aiosmtpd handler keeping every message it accepts, and every address given to RCPT."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.rcpts: list[str] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        self.rcpts.append(address)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 OK"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"ftjobs" and data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535 itself


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def smtp(request: pytest.FixtureRequest, ca: tuple[trustme.CA, Path]) -> Iterator[tuple[Inbox, int]]:
    mode = getattr(request, "param", "plain")
    inbox, port = Inbox(), free_port()
    kwargs: dict[str, Any] = {}
    if mode == "starttls":
        kwargs = {
            "tls_context": server_context(ca[0]),
            "require_starttls": True,
            "authenticator": authenticator,
            "auth_required": True,
            "auth_require_tls": True,
        }
    elif mode == "tls":
        kwargs = {"ssl_context": server_context(ca[0])}
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    yield inbox, port
    controller.stop()


def handler(port: int, **options: Any) -> dict[str, Any]:
    return {
        "name": "mail",
        "type": "email",
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from_addr": "ftjobs <ftjobs@example.com>",
        "to": ["ml-team@example.com"],
    } | options


async def test_failed_job_email_has_headers_and_both_parts(rig: Any, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    async with rig([handler(port, cc=["oncall@example.com"], to=["ml-team@example.com", "{{ metadata.owner }}"])]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")), "wh_mail")

        async def received() -> bool:
            return len(inbox.messages) == 1

        await eventually(received)
    recipients, message = inbox.messages[0]
    assert sorted(recipients) == ["ml-team@example.com", "oncall@example.com"]  # no owner in the metadata
    assert message["Subject"] == "[ftjobs] ❌ ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD failed"
    assert message["From"] == "ftjobs <ftjobs@example.com>" and message["Cc"] == "oncall@example.com"
    assert message["X-Ftjobs-Idempotency-Key"] == "mail:wh_mail"
    assert message.is_multipart() and message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Error:             invalid_training_file: The job failed" in text
    assert "<code>invalid_training_file</code>" in html
    assert "https://platform.openai.com/finetune/ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD" in text


async def test_metadata_cannot_inject_headers_or_html(rig: Any, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    doc = msgspec.json.decode(sample("fine_tuning_job.failed.json"))
    doc["metadata"] = {
        "owner": "owner@example.com",
        "note": "x\r\nBcc: victim@example.com\x00\x1b[31m",
        "html": "<script>x</script>",
    }
    subject = "Job {{ job.id }} {{ metadata.note }}"
    async with rig([handler(port, subject=subject, to=["{{ metadata.owner }}"])]) as r:
        await r.post(msgspec.json.encode(doc))

        async def received() -> bool:
            return len(inbox.messages) == 1

        await eventually(received)
    recipients, message = inbox.messages[0]
    assert recipients == ["owner@example.com"]
    assert message["Bcc"] is None
    # Line breaks and other controls (NUL, ESC) became spaces: one line of text, no header of its own.
    assert message["Subject"] == "Job ftjob-Rb2nV8qLx5TfW1mKc9Zp4HsD x Bcc: victim@example.com  [31m"
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<script>" not in html and "&lt;script&gt;" in html


def failed_job(owner: str) -> bytes:
    """A failed job of its own (one notification per job and status) whose owner is `owner`."""
    doc = msgspec.json.decode(sample("fine_tuning_job.failed.json"))
    doc["id"] = f"ftjob-{uuid.uuid4().hex}"
    doc["metadata"] = {"owner": owner}
    return msgspec.json.encode(doc)


OWNER_PAYLOADS = [
    "<attacker@evil.example> x@example.com",
    "Attacker <attacker@evil.example>, x@example.com",
    "attacker@evil.example, x@example.com",
    "attacker@evil.example,x@example.com",
    "attacker,x@example.com",
    "attacker@evil.example;x@example.com",
    "attacker@evil.example x@example.com",
    "attacker@evil.example\x00@example.com",
    "attacker@evil.example\t@example.com",
    '"attacker@evil.example"@example.com',
    "attacker%evil.example@example.com",
    "attacker(@evil.example)x@example.com",
]


async def test_a_recipient_from_job_data_must_be_one_bare_address(rig: Any, smtp: tuple[Inbox, int]) -> None:
    """Every payload passes the routing glob `*@example.com`; none may reach RCPT. Each event is dead-lettered
    saying why, and a plain owner address still gets its mail."""
    inbox, port = smtp
    mail = handler(
        port, to=["ml-team@example.com", "{{ metadata.owner }}"], when={"metadata": {"owner": "*@example.com"}}
    )
    async with rig([mail]) as r:
        for owner in OWNER_PAYLOADS:
            await r.post(failed_job(owner))
        await r.post(failed_job("owner.name+ft@example.com"))

        async def settled() -> bool:
            return len(await r.dead("mail")) == len(OWNER_PAYLOADS) and len(inbox.messages) == 1

        await eventually(settled)
        errors = [fields[b"error"].decode() for fields in await r.dead("mail")]
    assert inbox.rcpts == ["ml-team@example.com", "owner.name+ft@example.com"]
    assert all("is not one bare address" in error for error in errors), errors
    assert not any("\x00" in error for error in errors)


async def test_allowed_domains_limit_recipients_from_job_data(rig: Any, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = handler(
        port, to=["{{ metadata.owner }}"], allowed_domains=["Example.com"], when={"metadata": {"owner": "*@*"}}
    )
    async with rig([mail]) as r:
        for owner in ("eve@evil.example", "bob@sub.example.com", "mallory@example.com.evil.example"):
            await r.post(failed_job(owner))
        await r.post(failed_job("Alice@EXAMPLE.COM"))

        async def settled() -> bool:
            return len(await r.dead("mail")) == 3 and len(inbox.messages) == 1

        await eventually(settled)
        errors = [fields[b"error"].decode() for fields in await r.dead("mail")]
    assert inbox.rcpts == ["Alice@EXAMPLE.COM"]
    assert all("is outside allowed_domains" in error for error in errors), errors


@pytest.mark.parametrize("smtp", ["starttls"], indirect=True)
async def test_starttls_with_auth(rig: Any, smtp: tuple[Inbox, int], ca: tuple[trustme.CA, Path]) -> None:
    inbox, port = smtp
    options = {"security": "starttls", "username": "ftjobs", "password": PASSWORD, "ca_file": str(ca[1])}
    async with rig([handler(port, **options)]) as r:
        await r.post(compact(sample("fine_tuning_job.succeeded.json")))

        async def received() -> bool:
            return len(inbox.messages) == 1

        await eventually(received)
    assert "succeeded" in inbox.messages[0][1]["Subject"]


@pytest.mark.parametrize("smtp", ["starttls"], indirect=True)
async def test_wrong_password_is_dead_lettered_without_the_password(
    rig: Any, smtp: tuple[Inbox, int], ca: tuple[trustme.CA, Path]
) -> None:
    _, port = smtp
    options = {"security": "starttls", "username": "ftjobs", "password": "wrong-pass-77", "ca_file": str(ca[1])}
    async with rig([handler(port, **options)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("mail")) == 1

        await eventually(dead)
        error = (await r.dead("mail"))[0][b"error"].decode()
    assert "authentication refused" in error and "wrong-pass-77" not in error


@pytest.mark.parametrize("smtp", ["tls"], indirect=True)
async def test_implicit_tls(rig: Any, smtp: tuple[Inbox, int], ca: tuple[trustme.CA, Path]) -> None:
    inbox, port = smtp
    async with rig([handler(port, security="tls", ca_file=str(ca[1]))]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def received() -> bool:
            return len(inbox.messages) == 1

        await eventually(received)


async def test_unreachable_server_is_retried(rig: Any) -> None:
    async with rig([handler(free_port(), max_attempts=2, backoff_s=0.05)]) as r:
        await r.post(compact(sample("fine_tuning_job.failed.json")))

        async def dead() -> bool:
            return len(await r.dead("mail")) == 1

        await eventually(dead)
        assert (await r.dead("mail"))[0][b"attempts"] == b"2"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"from_addr": "a@b.c\r\nBcc: x@y.z"}, "from_addr"),
        ({"to": ["not an address"]}, r"to\[0\]: .not an address. is not a single email address"),
        ({"to": []}, "at least one recipient"),
        ({"subject": "{% if %}"}, "template syntax error"),
        ({"allowed_domains": ["*.example.com"]}, r"allowed_domains\[0\]: .\*.example.com. is not a domain name"),
        ({"allowed_domains": ["example.com", "x@example.com"]}, r"allowed_domains\[1\]"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    build_fails(handler(25, **options), message)


class Relay(Inbox):
    """An inbox with a relay's habits: greylisting (450 for an address the first time it is given), a
    recipient refused for good (550), and slow steps, with a QUIT that hangs until `hung_up` is set."""

    def __init__(self, *, greylist: bool = False, refuse: str = "", step_s: float = 0.0, hang: bool = False) -> None:
        super().__init__()
        self.greylist, self.refuse, self.step_s, self.hang = greylist, refuse, step_s, hang
        self.hung_up = asyncio.Event()
        self.quits = 0
        self._seen: set[str] = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        await asyncio.sleep(self.step_s)
        if address == self.refuse:
            return "550 5.1.1 no such user"
        if self.greylist and address not in self._seen:
            self._seen.add(address)
            self.rcpts.append(address)
            return "450 4.7.1 greylisted, try again later"
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.step_s)
        return await super().handle_DATA(server, session, envelope)

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        if self.hang:
            await self.hung_up.wait()
        return "221 Bye"


@contextlib.contextmanager
def relay(inbox: Relay, port: int = 0) -> Iterator[int]:
    port = port or free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.loop.call_soon_threadsafe(inbox.hung_up.set)
        controller.stop()


async def test_greylisting_is_retried_not_dead_lettered(rig: Any) -> None:
    """Every recipient refused with a temporary 450 (greylisting, a full mailbox): nothing was sent, so the
    mail is tried again and arrives once. It used to be dead-lettered, and the failure never announced."""
    inbox = Relay(greylist=True)
    with relay(inbox) as port:
        async with rig([handler(port, backoff_s=0.05)]) as r:
            await r.post(compact(sample("fine_tuning_job.failed.json")))

            async def received() -> bool:
                return len(inbox.messages) == 1 and await r.settled()

            await eventually(received)
            assert await r.dead("mail") == []
    assert inbox.rcpts == ["ml-team@example.com", "ml-team@example.com"]


async def test_a_mail_sent_to_some_recipients_is_not_sent_again(rig: Any) -> None:
    """One recipient refused for good, the other accepted: the mail went out, so sending it again would
    repeat it to the one who got it. The call is done, and the refusal is logged."""
    inbox = Relay(refuse="gone@example.com")
    mail = handler(relay_port := free_port(), to=["ml-team@example.com", "gone@example.com"], backoff_s=0.05)
    with relay(inbox, relay_port), captured_logs() as logs:
        async with rig([mail]) as r:
            await r.post(compact(sample("fine_tuning_job.failed.json")))

            async def settled() -> bool:
                return len(inbox.messages) == 1 and await r.settled()

            await eventually(settled)
            assert await r.dead("mail") == []
    [(recipients, _)] = inbox.messages
    assert recipients == ["ml-team@example.com"]
    [refused] = [line for line in logs if line["event"] == "email_recipients_refused"]
    assert refused["refused"] == {"gone@example.com": 550}


async def test_a_relay_slow_to_answer_quit_gets_the_mail_once(rig: Any) -> None:
    """The relay accepted the mail (250 after DATA) but takes its time over QUIT: the mail is sent, so the
    call is done. Waiting for QUIT pushed a slow session past the worker's limit for the call (twice
    `timeout_s`), and the mail was sent again."""
    inbox = Relay(step_s=2.0, hang=True)  # RCPT and DATA 2 s each, within `timeout_s` (3 s); QUIT never
    with relay(inbox) as port:
        async with rig([handler(port, timeout_s=3.0, max_attempts=2, backoff_s=0.05)]) as r:
            await r.post(compact(sample("fine_tuning_job.failed.json")))

            async def settled() -> bool:
                return len(inbox.messages) >= 1 and await r.settled()

            await eventually(settled, within=30)
            assert await r.dead("mail") == []
    assert len(inbox.messages) == 1


async def test_connections_waiting_for_quit_are_bounded() -> None:
    """A relay that never answers QUIT: each mail is sent, and its connection waits in the background for
    the answer. Those waits are capped: beyond `MAX_QUITTING`, a connection is closed without QUIT (the mail
    is already accepted). Uncapped, a burst of mails held one open connection each for `timeout_s` (300 mails
    with 4 lanes: 300 sockets), up to the relay's connection limit or the worker's open-file limit."""
    from handlers.email import MAX_QUITTING, EmailHandler, EmailOptions
    from processor.testing import delivery_from_sample, fake_context

    inbox = Relay(hang=True)
    with relay(inbox) as port:
        mail = EmailHandler(
            "mail",
            EmailOptions(host="127.0.0.1", port=port, security="none", from_addr="a@example.com", to=["b@example.com"]),
        )
        await mail.setup(fake_context(timeout_s=1.0))
        for _ in range(MAX_QUITTING + 8):
            await mail(delivery_from_sample("failed"))
        await mail.close()  # every QUIT said has been sent (and given up on)
        quits = inbox.quits
    assert len(inbox.messages) == MAX_QUITTING + 8
    assert quits == MAX_QUITTING
