"""Standard Webhooks verification: the SDK's and the samples' vectors, the reference library, every reject."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC

import pytest
import standardwebhooks
from hypothesis import given, settings
from hypothesis import strategies as st

from processor import signatures
from processor.errors import ConfigError, SignatureError
from tests.conftest import PREVIOUS_SECRET, SECRET, compact, sample

KEY = signatures.parse_secret(SECRET)


def test_openai_sdk_vector() -> None:
    secret = signatures.parse_secret("whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=")
    body = (
        b'{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", "created_at": 1750861210, '
        b'"type": "response.completed", "data": {"id": "resp_123"}}'
    )
    headers = {
        "webhook-id": "wh_685c059ae39c8190af8c71ed1022a24d",
        "webhook-timestamp": "1750861210",
        "webhook-signature": "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY=",
    }
    assert signatures.verify(headers, body, [secret], now=1750861210) == "wh_685c059ae39c8190af8c71ed1022a24d"


@pytest.mark.parametrize("secret", [SECRET, PREVIOUS_SECRET])
def test_sample_vector_during_rotation(secret: str) -> None:
    """The sample delivery is signed with both secrets; either one alone verifies it."""
    body = compact(sample("webhook_event.fine_tuning.job.succeeded.json"))
    headers = {
        "webhook-id": "wh_68ff4b09d1c08190b3e9a7c4f2d6e815",
        "webhook-timestamp": "1761562634",
        "webhook-signature": "v1,Z7Anm94orTKo2IeoLFLRV70JlE/dl3gEjYmZ8Csq2Kk= "
        "v1,ttmHYyBdx4/CcR+1S1QFfJrkm2CCVjTuYiwQj/Nou1w=",
    }
    key = signatures.parse_secret(secret)
    assert signatures.verify(headers, body, [key], now=1761562634 + 299) == "wh_68ff4b09d1c08190b3e9a7c4f2d6e815"


def test_standard_webhooks_spec_vector() -> None:
    key = signatures.parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    sig = signatures.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("size", [0, 1, 100, 5000])
def test_agrees_with_the_reference_library(size: int) -> None:
    body = bytes(range(32, 127)) * (size // 95 + 1)
    body = body[:size]
    wh = standardwebhooks.Webhook(SECRET)
    now = int(time.time())
    ours = signatures.signed_headers([KEY], "msg_x", body, timestamp=now)
    from datetime import datetime

    theirs = wh.sign("msg_x", datetime.fromtimestamp(now, tz=UTC), body.decode())
    assert ours["webhook-signature"] == theirs
    # and the reference library accepts what we sign (it parses the body as JSON, so give it JSON)
    json_body = b'{"n": %d}' % size
    headers = signatures.signed_headers([KEY], "msg_y", json_body)
    assert wh.verify(json_body, headers) == {"n": size}
    assert signatures.verify(headers, json_body, [KEY]) == "msg_y"


def _headers(body: bytes = b"{}", ts: int | None = None, **override: str) -> dict[str, str]:
    return signatures.signed_headers([KEY], "wh_1", body, timestamp=ts) | override


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: h.pop("webhook-id"), "missing header: webhook-id"),
        (lambda h: h.pop("webhook-timestamp"), "missing header: webhook-timestamp"),
        (lambda h: h.pop("webhook-signature"), "missing header: webhook-signature"),
        (lambda h: h.update({"webhook-timestamp": "1.5"}), "not an integer"),
        (lambda h: h.update({"webhook-timestamp": "soon"}), "not an integer"),
        (lambda h: h.update({"webhook-signature": "v2,abc"}), "no v1 signature"),
        (lambda h: h.update({"webhook-signature": "v1,AAAA"}), "does not match"),
        (lambda h: h.update({"webhook-signature": "v1,ünïcode"}), "printable ASCII"),
        (lambda h: h.update({"webhook-id": "wh_2"}), "does not match"),
    ],
)
def test_rejects_say_what_is_wrong(mutate: object, message: str) -> None:
    headers = _headers()
    mutate(headers)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=message):
        signatures.verify(headers, b"{}", [KEY])


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("webhook-timestamp", "9" * 400, "at most 12 digits"),  # int() would take it, then overflow
        ("webhook-timestamp", "1_800_000_000", "not an integer"),  # int() accepts underscores ...
        ("webhook-timestamp", "+1800000000", "not an integer"),  # ... a sign ...
        ("webhook-timestamp", "\u0661\u0668\u0660\u0660", "not an integer"),  # ... and non-ASCII digits
        ("webhook-id", "wh_\udcff", "visible ASCII"),  # a 0xFF byte, as aiohttp hands it over
        ("webhook-id", "wh_é", "visible ASCII"),
        ("webhook-id", "wh 1", "visible ASCII"),
        ("webhook-id", "w" * 257, "visible ASCII"),
        ("webhook-signature", "v1,\udcff", "printable ASCII"),
        ("webhook-signature", "v1,\x00", "printable ASCII"),
        ("webhook-signature", "v1,A " * 1000, "printable ASCII"),
    ],
)
def test_headers_outside_the_grammar_are_rejected_before_parsing(header: str, value: str, message: str) -> None:
    """The cases that raised OverflowError / UnicodeEncodeError (a 500) are plain signature errors (a 401)."""
    with pytest.raises(SignatureError, match=message):
        signatures.verify(_headers() | {header: value}, b"{}", [KEY])


def test_headers_at_the_grammar_limits_verify() -> None:
    msg_id = "w" * signatures.MAX_ID_CHARS
    headers = signatures.signed_headers([KEY], msg_id, b"{}")
    headers["webhook-signature"] = " ".join(["v1,AAAA"] * 500 + [headers["webhook-signature"]])
    assert len(headers["webhook-signature"]) <= signatures.MAX_SIGNATURE_CHARS
    assert signatures.verify(headers, b"{}", [KEY]) == msg_id


def test_every_candidate_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (key, candidate) pair goes through `hmac.compare_digest`; a plain `==` would leak timing."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    other = signatures.parse_secret(signatures.generate_secret())
    wrong = ["v1," + base64.b64encode(bytes([n]) * 32).decode() for n in range(3)]
    headers = _headers(**{"webhook-signature": " ".join(wrong)})
    with pytest.raises(SignatureError, match="does not match"):
        signatures.verify(headers, b"{}", [other, KEY])
    assert len(calls) == 2 * 3 and {b for _, b in calls} == {w[3:].encode() for w in wrong}
    calls.clear()
    good = _headers()
    assert signatures.verify(good, b"{}", [other, KEY]) == "wh_1"
    assert calls[-1] == (good["webhook-signature"][3:].encode(),) * 2  # the match itself was found by it


def test_tampered_body_is_rejected() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        signatures.verify(_headers(b'{"a":1}'), b'{"a":2}', [KEY])


def test_wrong_secret_is_rejected_and_rotation_accepts_either() -> None:
    other = signatures.parse_secret(signatures.generate_secret())
    headers = _headers()
    with pytest.raises(SignatureError):
        signatures.verify(headers, b"{}", [other])
    assert signatures.verify(headers, b"{}", [other, KEY]) == "wh_1"


@pytest.mark.parametrize(("offset", "ok"), [(-300, True), (300, True), (-301, False), (301, False)])
def test_tolerance_boundaries(offset: int, ok: bool) -> None:
    now = 1_800_000_000
    headers = _headers(ts=now + offset)
    if ok:
        assert signatures.verify(headers, b"{}", [KEY], now=now) == "wh_1"
    else:
        with pytest.raises(SignatureError, match="old" if offset < 0 else "future"):
            signatures.verify(headers, b"{}", [KEY], now=now)


def test_error_messages_never_contain_secrets_or_signatures() -> None:
    headers = _headers(**{"webhook-signature": "v1,AAAA"})
    with pytest.raises(SignatureError) as info:
        signatures.verify(headers, b"{}", [KEY])
    expected = signatures.sign(KEY, "wh_1", headers["webhook-timestamp"], b"{}")
    assert expected not in str(info.value) and SECRET not in str(info.value)


def test_secret_parsing() -> None:
    assert signatures.parse_secret("whsec_" + base64.b64encode(b"k" * 24).decode()) == b"k" * 24
    assert signatures.parse_secret("whsec_" + base64.b64encode(b"k" * 24).decode().rstrip("=")) == b"k" * 24
    assert signatures.parse_secret("raw-secret") == b"raw-secret"  # as the openai SDK reads it
    for bad in ["", "whsec_", "whsec_***not base64***"]:
        with pytest.raises(ConfigError):
            signatures.parse_secret(bad)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_signed_header_sent_twice_is_refused(name: str) -> None:
    """Found by a review: a repeated header was read by its first copy; a proxy reading the last would disagree."""
    from multidict import CIMultiDict

    body = compact(sample("fine_tuning_job.failed.json"))
    keys = [signatures.parse_secret(SECRET)]
    headers = CIMultiDict(signatures.signed_headers(keys, "wh_twice", body))
    assert signatures.verify(headers, body, keys) == "wh_twice"
    headers.add(name, "zzz")
    with pytest.raises(SignatureError, match=f"header sent more than once: {name}"):
        signatures.verify(headers, body, keys)


@settings(max_examples=300, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=200),
    msg_id=st.text(max_size=40),
    timestamp=st.text(max_size=12),
    body=st.binary(max_size=3000),
)
def test_digest_is_hmac_sha256(key: bytes, msg_id: str, timestamp: str, body: bytes) -> None:
    """The signature digest, written out from RFC 2104 over precomputed pads, equals the standard library's
    HMAC-SHA256 for any key (longer than SHA-256's 64-byte block included) and any message."""
    expected = hmac.digest(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    assert signatures._digest(key, msg_id, timestamp, body) == expected
    assert signatures._digest(key, msg_id, timestamp, body) == expected  # again, from the cached pads
