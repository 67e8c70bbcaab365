"""Bad input and security: fuzzed requests, replays, oversized and slow bodies, secrets kept out of output.

The fuzz test runs 300 cases in CI; `pytest -m slow tests/test_security.py` runs 100,000.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processor import signatures
from processor.httpserver import SERVER_OPTIONS
from processor.receiver import create_app
from processor.settings import Settings
from tests.clients import sync_client
from tests.conftest import SECRET, compact, free_port, sample, signed
from tests.fake_openai import KEY, FakeOpenAI
from tests.fake_targets import Recorder, slack_app
from tests.processes import Proc, base_env, http_ready, wait_for, write_config

DOCUMENTED = {200, 400, 401, 408, 413, 415}
GOOD_BODY = compact(sample("fine_tuning_job.succeeded.json"))


@pytest.fixture
def live_receiver(make_settings: Callable[..., Settings], redis_url: str) -> Iterator[int]:
    """The real app on a real port, served from a background thread (for synchronous fuzzing clients)."""
    port = free_port()
    app = create_app(make_settings(receiver={"body_timeout_s": 0.5}), redis_url)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, **app[SERVER_OPTIONS])
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "good", "huge"]))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "huge":
        return b'{"pad":"' + b"x" * (300 * 1024) + b'"}'
    doc = msgspec.json.decode(GOOD_BODY)
    if kind == "mutated":
        doc[draw(st.sampled_from([*doc.keys(), "object", "new"]))] = draw(json_values)
    encoding = draw(st.sampled_from(["utf-8", "utf-16", "latin-1"]))
    return json.dumps(doc, ensure_ascii=False).encode(encoding, errors="replace")


header_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
#: Header values as bytes on the wire: any byte 0-255 (aiohttp's client refuses to send most of them, so the
#: fuzz writes raw requests), long digit strings (an int() overflow), and values beyond every length limit.
header_bytes = st.one_of(
    header_text.map(str.encode),
    st.binary(min_size=1, max_size=64),
    st.lists(st.integers(0x20, 0x7E) | st.integers(0x80, 0xFF), min_size=1, max_size=64).map(bytes),
    st.text("0123456789", min_size=1, max_size=500).map(str.encode),
    st.sampled_from([b"9" * 13, b"9" * 400, b"\xff", b"wh_\xff", b"v1,\xff", b"v1," + b"A" * 5000, b"A" * 9000]),
)
header_names = st.sampled_from(
    ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "content-encoding", "x-fuzz"]
)


def send_raw(port: int, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict[str, Any]]:
    """POST `body` with exactly these header lines (duplicates and any bytes kept) and read the first answer."""
    head = b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += b"Content-Length: %d\r\n" % len(body)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # Refused before everything was sent? The answer is still in the socket.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        raw = resp.read()
    is_json = resp.getheader("content-type", "").startswith("application/json")
    answer: dict[str, Any] = json.loads(raw) if is_json else {}
    return resp.status, answer


def fuzz_case(port: int, case: dict[str, Any], counters: dict[str, int]) -> None:
    body, signing = case["body"], case["signing"]
    key = signatures.parse_secret(SECRET)
    now = int(time.time())
    headers: dict[str, str] = {}
    if case["content_type"] is not None:
        headers["content-type"] = case["content_type"]
    msg_id = case["webhook_id"]
    if signing in ("valid", "garbage"):
        headers |= signatures.signed_headers([key], msg_id, body, timestamp=now + case["skew"])
    elif signing == "wrong_key":
        headers |= signatures.signed_headers([b"another key entirely"], msg_id, body, timestamp=now)
    elif signing == "tampered":
        headers |= signatures.signed_headers([key], msg_id, body + b" ", timestamp=now)
    elif signing == "stale":
        headers |= signatures.signed_headers([key], msg_id, body, timestamp=now - 301 - case["skew"] ** 2)
    lines = [(name.encode(), value.encode()) for name, value in headers.items()]
    intact = True
    if signing == "garbage":  # a signed request with some of its three headers replaced by fuzz
        intact = all(headers[name].encode() == value for name, value in case["garbage"].items())
        lines = [(name, case["garbage"].get(name.decode(), value)) for name, value in lines]
    # Extra lines come after the real ones: duplicated names, any bytes (a CR or LF ends the line early).
    lines += [(name.encode(), value) for name, value in case["extra"]]
    status, answer = send_raw(port, lines, body)
    assert status < 500, (status, answer)
    assert status in DOCUMENTED, (status, answer)
    if answer:
        assert ("status" in answer) if status == 200 else (answer["error"] and answer["message"])
    else:  # only aiohttp's own parser refuses without JSON: a malformed head
        assert status == 400
    # A signed header sent twice is refused (a proxy reading the other copy would see another id).
    signed_names = ("webhook-id", "webhook-timestamp", "webhook-signature")
    repeated = any(name.lower() in signed_names for name, _ in case["extra"])
    verified = signing in ("valid", "garbage") and intact and abs(case["skew"]) <= 300 and not repeated
    if status == 200:
        assert verified, "an unsigned or mis-signed request was accepted"
        counters[answer["status"]] += 1
    elif status == 401:
        assert not verified


def known_500(header: str, value: bytes) -> dict[str, Any]:
    """A signed request with one header replaced: each of these was a 500 with a traceback once."""
    return {
        "body": GOOD_BODY,
        "content_type": "application/json",
        "signing": "garbage",
        "webhook_id": f"wh_{uuid.uuid4().hex}",
        "skew": 0,
        "garbage": {header: value},
        "extra": [],
    }


@pytest.mark.parametrize("examples", [300, pytest.param(100_000, marks=pytest.mark.slow)])
def test_fuzzed_requests_get_documented_answers_and_nothing_unsigned_gets_in(
    examples: int, live_receiver: int, redis_url: str, prefix: str
) -> None:
    counters = {"accepted": 0, "duplicate": 0, "quarantined": 0}

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        case=st.fixed_dictionaries(
            {
                "body": bodies(),
                "content_type": st.sampled_from(
                    [
                        "application/json",
                        "application/json",
                        "application/json",
                        "application/json; charset=utf-8",
                        "text/plain",
                        "",
                        None,
                        "application/cloudevents+json",
                        "multipart/form-data",
                    ]
                ),
                "signing": st.sampled_from(
                    ["valid", "valid", "none", "wrong_key", "tampered", "stale", "garbage", "garbage", "garbage"]
                ),
                "webhook_id": st.one_of(
                    st.builds(lambda: f"wh_{uuid.uuid4().hex}"), header_text, st.just("wh_fixed_for_duplicates")
                ),
                # Clear of the ±300 s boundary, where a second passing between signing and checking decides.
                "skew": st.integers(-400, 400).filter(lambda s: not 297 <= abs(s) <= 303),
                "garbage": st.dictionaries(
                    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]), header_bytes, min_size=1
                ),
                "extra": st.lists(st.tuples(header_names, header_bytes), max_size=3),
            }
        )
    )
    @example(case=known_500("webhook-timestamp", b"9" * 400))  # the three that were 500s, always tried
    @example(case=known_500("webhook-id", b"wh_\xff"))
    @example(case=known_500("webhook-signature", b"v1,\xff"))
    def run(case: dict[str, Any]) -> None:
        fuzz_case(live_receiver, case, counters)

    run()
    client = sync_client(redis_url)
    try:
        stored = client.xlen(f"{prefix}:{{p0}}:events")
        quarantined = client.xlen(f"{prefix}:{{q}}:quarantine")
    finally:
        client.close()
    # Exactly what was answered "accepted"/"quarantined" was stored; nothing else.
    assert stored == counters["accepted"] and quarantined == counters["quarantined"]
    print(f"\nFIGURE fuzz: {examples} cases, 0 5xx, 0 unsigned or mis-signed accepted; answers: {counters}")


def raw_exchange(port: int, head: bytes, body_part: bytes, wait_s: float) -> bytes:
    """Send a request head and part of a body, then read whatever the server answers within `wait_s`."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body_part)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_oversized_body_refused_before_it_is_sent(live_receiver: int) -> None:
    headers = signed(b"{}")
    head = (
        "POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "content-type")
        + "Content-Length: 104857600\r\n\r\n"
    ).encode()
    answer = raw_exchange(live_receiver, head, b"{", wait_s=5)  # 1 byte of a declared 100 MiB
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer


def test_slow_body_client_times_out(live_receiver: int) -> None:
    head = b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    answer = raw_exchange(live_receiver, head, b'{"a":', wait_s=5)  # then nothing: body_timeout_s is 0.5
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A gzip stream of zeros: ~1000x smaller than what it inflates to."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = [packer.compress(chunk) for _ in range(inflated_bytes >> 20)]
    return b"".join([*parts, packer.flush()])


async def raw_request(client: TestClient, request: bytes) -> bytes:
    """Write a request as raw bytes and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_compressed_bodies_are_refused_and_never_inflated(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    rclient: Any,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await aiohttp_client(create_app(make_settings(), redis_url))
    bomb = gzip_bomb(200 << 20)  # 200 MiB of zeros in ~200 KB, under the body limit
    resp = await client.post("/webhooks/openai", data=bomb, headers=signed(bomb) | {"content-encoding": "gzip"})
    answer = await resp.json()
    assert resp.status == 415 and answer["error"] == "unsupported_media_type" and "gzip" in answer["message"]
    # Correctly signed, over the compressed bytes or over the JSON inside: refused either way.
    packed = gzip.compress(GOOD_BODY)
    for encoding, signed_over in (("gzip", packed), ("gzip", GOOD_BODY), ("deflate", packed), ("br", packed)):
        resp = await client.post(
            "/webhooks/openai", data=packed, headers=signed(signed_over) | {"content-encoding": encoding}
        )
        assert resp.status == 415, (encoding, await resp.text())
    resp = await client.post("/webhooks/openai", data=GOOD_BODY, headers=signed(GOOD_BODY, content_encoding="identity"))
    assert (await resp.json())["status"] == "accepted"
    assert await rclient.xlen(f"{prefix}:{{p0}}:events") == 1
    # The body is never run through a decoder: one that is not gzip at all draws no decoder error either
    # (with aiohttp's default, inflating it fails in the protocol layer and logs a traceback).
    junk = b"not gzip at all " * 100
    head = "".join(f"{k}: {v}\r\n" for k, v in signed(junk).items())
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        answer_bytes = await raw_request(
            client,
            f"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}"
            f"Content-Encoding: gzip\r\nContent-Length: {len(junk)}\r\n\r\n".encode()
            + junk,
        )
    assert answer_bytes.startswith(b"HTTP/1.1 415")
    decoder_errors = [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING]
    assert not decoder_errors, caplog.text


async def test_idle_and_slow_header_connections_are_closed(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], redis_url: str
) -> None:
    """`idle_timeout_s` closes a silent connection, an idle keep-alive one, and one trickling its head."""
    client = await aiohttp_client(create_app(make_settings(receiver={"idle_timeout_s": 0.3}), redis_url))

    async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
        return await asyncio.wait_for(reader.read(), 30)  # EOF, or the test fails after 30 s

    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    assert await closed_by_server(reader) == b""  # connected, never sent a byte
    writer.close()

    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await closed_by_server(reader)  # answered, then closed once idle
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" not in answer
    writer.close()

    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:  # one header byte at a time, never finishing the head
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof():
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.05)

    pacer = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader) == b""
    finally:
        pacer.cancel()
        writer.close()


def test_the_running_receiver_uses_the_same_server_options(
    procs: Callable[..., Proc], tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """`ftjobs receive` (web.run_app) serves with the options the tests' servers use, and /metrics apart."""
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port, "idle_timeout_s": 0.5, "metrics_port": metrics_port},
        redis={"url": redis_url, "prefix": prefix},
    )
    receiver = procs(["receive"], tmp_path, base_env(FTJOBS_CONFIG=str(config), OPENAI_WEBHOOK_SECRET=SECRET), "rx")
    wait_for(http_ready(port), 20, "receiver")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert sock.recv(1) == b""  # closed by the server after idle_timeout_s (a timeout here fails)
    packed = gzip.compress(GOOD_BODY)
    status, answer = send_raw(
        port, [(k.encode(), v.encode()) for k, v in signed(packed).items()] + [(b"content-encoding", b"gzip")], packed
    )
    assert status == 415 and "gzip" in answer["message"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        assert b'ftjobs_requests_total{outcome="unsupported_media_type"} 1.0' in resp.read()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert info.value.code == 404
    assert receiver.stop() == 0


def test_replays_are_duplicates_and_late_captures_are_refused(
    live_receiver: int, make_settings: Callable[..., Settings]
) -> None:
    headers = signed(GOOD_BODY, f"wh_{uuid.uuid4().hex}")

    def send(h: dict[str, str]) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", live_receiver, timeout=10)
        try:
            conn.request("POST", "/webhooks/openai", body=GOOD_BODY, headers=h)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    assert send(headers)[1]["status"] == "accepted"
    assert send(headers)[1]["status"] == "duplicate"  # the identical request, replayed
    # The same delivery captured and replayed later than the tolerance (301 s) is refused.
    late = signatures.signed_headers(
        [signatures.parse_secret(SECRET)], f"wh_{uuid.uuid4().hex}", GOOD_BODY, timestamp=int(time.time()) - 301
    ) | {"content-type": "application/json"}
    status, answer = send(late)
    assert status == 401 and "old" in answer["message"]


SECRETS = {
    "webhook secret": "whsec_" + base64.b64encode(b"SECRET-WEBHOOK-KEY-0123456789ab").decode(),
    "openai key": KEY,
    "slack webhook path": "SECRETSLACKPATHxyz",
    "slack token": "xoxb-SECRETSLACKTOKEN",
    "smtp password": "SECRET-SMTP-PASSWORD",
    "pipeline token": "SECRET-PIPELINE-TOKEN",
    "signing secret": "whsec_" + base64.b64encode(b"SECRET-OUTGOING-SIGNING-KEY-0001").decode(),
}


async def test_secrets_never_appear_in_logs_errors_or_responses(
    aiohttp_server: Callable[..., Any], tmp_path: Path, redis_url: str, prefix: str, rclient: Any
) -> None:
    seen: Recorder = []
    slack = await aiohttp_server(slack_app(seen))
    fake = FakeOpenAI()
    fake.jobs["ftjob-secret-test"] = msgspec.json.decode(GOOD_BODY) | {"id": "ftjob-secret-test"}
    openai = await aiohttp_server(fake.app())
    port = free_port()
    config = write_config(
        tmp_path / "ftjobs.toml",
        receiver={"port": port},
        redis={"url": redis_url, "prefix": prefix},
        worker={"lease_s": 2.0, "block_ms": 100},
        openai={"base_url": str(openai.make_url("/v1"))},
        log={"level": "debug"},
        handlers=[
            {
                "name": "hook",
                "type": "slack",
                "webhook_url": str(slack.make_url(f"/hook/{SECRETS['slack webhook path']}")),
                "max_attempts": 2,
                "backoff_s": 0.01,
            },
            {
                "name": "api",
                "type": "slack",
                "token": SECRETS["slack token"],
                "channel": "C1",
                "api_url": str(slack.make_url("/api")),
                "max_attempts": 1,
            },
            {
                "name": "mail",
                "type": "email",
                "host": "127.0.0.1",
                "port": free_port(),
                "security": "none",
                "username": "u",
                "password": SECRETS["smtp password"],
                "from_addr": "a@example.com",
                "to": ["b@example.com"],
                "max_attempts": 2,
                "backoff_s": 0.01,
            },
            {
                "name": "pipe",
                "type": "http",
                "url": str(slack.make_url("/nowhere")),
                "max_attempts": 1,
                "headers": {"Authorization": "Bearer ${PIPELINE_TOKEN}"},
                "sign_secret": SECRETS["signing secret"],
            },
        ],
    )
    env = base_env(
        FTJOBS_CONFIG=str(config),
        OPENAI_WEBHOOK_SECRET=SECRETS["webhook secret"],
        OPENAI_API_KEY=SECRETS["openai key"],
        PIPELINE_TOKEN=SECRETS["pipeline token"],
    )
    outputs: list[str] = []
    serve = Proc(["serve"], tmp_path, env, "serve")
    try:
        await asyncio.to_thread(wait_for, http_ready(port), 20, "serve")
        import aiohttp

        async with aiohttp.ClientSession() as session:
            thin = msgspec.json.encode(
                {
                    "object": "event",
                    "id": "evt_1",
                    "type": "fine_tuning.job.failed",
                    "created_at": 1,
                    "data": {"id": "ftjob-secret-test"},
                }
            )
            for body, headers in (
                (GOOD_BODY, signed(GOOD_BODY, secret=SECRETS["webhook secret"])),
                (thin, signed(thin, secret=SECRETS["webhook secret"])),
                (GOOD_BODY, signed(GOOD_BODY)),  # wrong secret
                (b"{bad", signed(b"{bad", secret=SECRETS["webhook secret"])),
            ):
                async with session.post(f"http://127.0.0.1:{port}/webhooks/openai", data=body, headers=headers) as r:
                    outputs.append(await r.text())

        async def dead_lettered() -> bool:
            counts = [await rclient.xlen(f"{prefix}:{{dlq}}:{name}") for name in ("hook", "api", "mail", "pipe")]
            return all(counts)

        deadline = time.monotonic() + 30
        while not await dead_lettered():
            assert time.monotonic() < deadline, "handlers did not fail as set up"
            await asyncio.sleep(0.2)
        for args in (
            ["status", "--json"],
            ["check-config"],
            ["dlq", "list", "hook"],
            ["dlq", "show", "api", "--all"],
            ["dlq", "list", "mail"],
            ["dlq", "list", "pipe"],
            ["jobs"],
        ):
            done = await asyncio.create_subprocess_exec(
                *serve.process.args[:3],
                *args,
                env=env,
                cwd=tmp_path,  # type: ignore[index]
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await done.communicate()
            outputs.append(out.decode())
            if args[:2] == ["dlq", "show"]:  # the whole dead letter, event and error, really printed
                letters = [json.loads(doc) for doc in re.findall(r"^\{$.*?^\}$", out.decode(), re.M | re.S)]
                assert letters and all(x["event"]["job_id"] and x["error"] for x in letters), out.decode()
    finally:
        await asyncio.to_thread(serve.stop)
    outputs.append(serve.output())
    everything = "\n".join(outputs)
    assert "event_dead_lettered" in everything and "invalid_signature" in everything  # the flow really ran
    leaks = [name for name, secret in SECRETS.items() if secret in everything]
    assert not leaks, f"secrets found in output: {leaks}"
    print(
        f"\nFIGURE secrets: {len(SECRETS)} secrets, {len(everything)} characters of logs, answers and CLI output "
        f"searched: 0 found"
    )


@pytest.mark.parametrize(
    "head",
    [
        b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nwebhook-id: a\x01b\r\n\r\n",  # a control byte
        b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 9000 + b"\r\n\r\n",  # over the limit
    ],
    ids=["control-byte", "long-header"],
)
async def test_a_malformed_request_head_is_one_info_line_not_a_traceback(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
) -> None:
    """A stranger's malformed head gets aiohttp's 400; the log gets one info line (no flood of tracebacks)."""
    import logging

    client = await aiohttp_client(create_app(make_settings(), redis_url))
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(head)
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400"
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records, "aiohttp logged nothing: the filter would be untested"
    assert all(r.levelno <= logging.INFO and not r.exc_info and not r.exc_text for r in records)
    assert all(r.getMessage().startswith("bad request refused (400)") for r in records)


async def test_expectations_other_than_100_continue_get_a_417_not_a_500(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    rclient: Any,
    prefix: str,
) -> None:
    """aiohttp's default `Expect` handler answered a byte 0x80-0xFF in the header with a 500 (and a logged
    traceback) on every path, before any middleware, and echoed other values in a text 417."""
    client = await aiohttp_client(create_app(make_settings(), redis_url))
    values = [bytes([b]) for b in range(0x80, 0x100)] + [b"foo", b"100-continue\xff", b"\xc3\xa9"]
    for path, method in (
        ("/webhooks/openai", b"POST"),
        ("/healthz", b"GET"),
        ("/nope", b"GET"),
        ("/webhooks/openai", b"GET"),
    ):
        for value in values:
            answer = await raw_request(
                client,
                b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: %s\r\nContent-Length: 0\r\n\r\n"
                % (method, path.encode(), value),
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 417"), (path, value, answer[:200])
            assert json.loads(body)["error"] == "expectation_failed" and value not in body
    # `100-continue` is met as before: the interim answer, then the webhook's own.
    answer = await raw_request(
        client,
        b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in signed(GOOD_BODY).items())
        + b"Content-Length: %d\r\n\r\n" % len(GOOD_BODY)
        + GOOD_BODY,
    )
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), answer[:200]
    assert await rclient.xlen(f"{prefix}:{{p0}}:events") == 1
