"""The dashboard over HTTP: who gets in, CSRF, headers, escaping, per-handler states, actions, the command.

The browser's view (login, replay by clicking, scripts that must not run) is in `test_dashboard_browser.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient

from processor import registry
from processor.dashboard.auth import Auth, safe_next
from processor.dashboard.delivery import Facts, decide
from processor.errors import ConfigError
from processor.runtime import open_runtime, running_worker
from processor.service import serve_app
from processor.settings import Settings
from tests.clients import async_client
from tests.conftest import PATH, compact, eventually, free_port, sample, signed, sink
from tests.processes import FTJOBS, Proc, base_env, wait_for, write_config

TOKEN = "dashboard-test-token-0123456789abcdef"
PAGES = ["/ui/", "/ui/jobs", "/ui/jobs/ftjob-x", "/ui/dead", "/ui/dead/a", "/ui/quarantine", "/ui/search?q=x"]
XSS = {"a": "<script>window.__pwned = 1</script>", "b": '"><img src=x onerror="window.__pwned=2">'}


def job_body(job_id: str = "ftjob-dash1", status: str = "failed", metadata: dict[str, str] | None = None) -> bytes:
    job = msgspec.json.decode(sample(f"fine_tuning_job.{'failed' if status == 'failed' else 'succeeded'}.json"))
    job |= {"id": job_id, "status": status, "metadata": metadata or {"team": "search"}}
    return msgspec.json.encode(job)


def badges(row: str) -> dict[str, str]:
    """Each handler's state badge in a job page's event row (and the rows after it): handler → kind."""
    return dict(re.findall(r"<td>([a-z-]+)</td>\s*<td><span class=\"badge (\w+)\"", row))


async def next_letter(runtime: Any, handler: str, after: str = "") -> Any:
    """The handler's one dead letter, once it is another than `after` (a replay that failed again)."""
    letters: list[Any] = []

    async def arrived() -> bool:
        letters[:] = await runtime.dead_letters.letters(handler)
        return len(letters) == 1 and letters[0].id != after

    await eventually(arrived)
    return letters[0]


class Dash:
    """A receiver with the dashboard mounted (as `serve`/`receive` build it), and a worker."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def post(self, body: bytes, webhook_id: str | None = None) -> dict[str, Any]:
        resp = await self.client.post(PATH, data=body, headers=signed(body, webhook_id))
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer

    async def page(self, path: str, status: int = 200) -> str:
        resp = await self.client.get(path, headers=self.bearer, allow_redirects=False)
        text = await resp.text()
        assert resp.status == status, text
        return text


@pytest.fixture
def dash(aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], redis_url: str) -> Any:
    @contextlib.asynccontextmanager
    async def make(handlers: list[dict[str, Any]], token: str = TOKEN, retention_s: int = 0) -> AsyncIterator[Dash]:
        redis = {"retention_s": retention_s} if retention_s else {}
        settings = make_settings(handlers, dashboard={"token": token} if token else {}, redis=redis)
        client = await aiohttp_client(serve_app(settings, redis_url))
        async with running_worker(settings, redis_url, registry.build(settings.handlers)):
            yield Dash(client, settings)

    return make


async def test_every_page_needs_the_token(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("a", redis_url, prefix)]) as d:
        for path in [*PAGES, "/ui/no-such-page"]:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Cookie": "ftjobs_ui=1.2.3"}):
                resp = await d.client.get(path, headers=headers, allow_redirects=False)
                body = await resp.text()
                assert resp.status == 401, (path, headers)
                assert 'action="/ui/login"' in body and "dead letters" not in body.lower()
                assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        resp = await d.client.post("/ui/dead/a/drop", data={"id": "1-0"}, allow_redirects=False)
        assert resp.status == 401
        for path in PAGES:
            await d.page(path, 404 if path.endswith(("ftjob-x", "q=x")) else 200)
        resp = await d.client.get("/ui/static/style.css")
        assert resp.status == 200 and resp.content_type == "text/css"
        assert (await d.client.get("/ui/static/../templates/base.html", headers=d.bearer)).status == 404


async def test_login_sets_a_signed_httponly_strict_cookie(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("a", redis_url, prefix)]) as d:
        wrong = await d.client.post("/ui/login", data={"token": "nope", "next": "/ui/jobs"}, allow_redirects=False)
        assert wrong.status == 401 and "not valid" in await wrong.text() and "Set-Cookie" not in wrong.headers
        ok = await d.client.post("/ui/login", data={"token": TOKEN, "next": "/ui/jobs"}, allow_redirects=False)
        assert ok.status == 303 and ok.headers["Location"] == "/ui/jobs"
        cookie = ok.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
        assert TOKEN not in cookie
        assert (await d.client.get("/ui/jobs")).status == 200  # the client keeps the cookie
        value = ok.cookies["ftjobs_ui"].value
        forged = value[:-1] + ("0" if value[-1] != "0" else "1")
        d.client.session.cookie_jar.clear()
        resp = await d.client.get("/ui/", headers={"Cookie": f"ftjobs_ui={forged}"})
        assert resp.status == 401
        away = await d.client.post("/ui/login", data={"token": TOKEN, "next": "//evil.example/"}, allow_redirects=False)
        assert away.headers["Location"] == "/ui/"
        # A line break in `next` (from a crafted `/ui/login?next=` link) made writing the Location header fail:
        # the login got a dropped connection and the log a traceback.
        for target in ("/ui/\r\nSet-Cookie: x=1", "/ui/jobs\n", "/ui/\x00", "/ui/jobs x"):
            odd = await d.client.post("/ui/login", data={"token": TOKEN, "next": target}, allow_redirects=False)
            assert odd.status == 303 and odd.headers["Location"] == "/ui/", target


def test_sessions_expire_and_end_with_a_new_token() -> None:
    auth = Auth(TOKEN, session_s=60)
    session = auth.new_session(now=1000)
    assert auth.session_ok(session, now=1059) and not auth.session_ok(session, now=1061)
    assert not Auth(TOKEN + "-rotated", session_s=60).session_ok(session, now=1000)
    assert auth.csrf_ok(session, auth.csrf(session)) and not auth.csrf_ok(
        auth.new_session(now=1000), auth.csrf(session)
    )
    for target in ("https://evil.example/", "//evil.example", "/ui//evil.example", "/other", "/ui/\\evil", "/ui/\n"):
        assert safe_next(target) == "/ui/"
    assert safe_next("/ui/dead/a?x=1") == "/ui/dead/a?x=1"


async def test_posts_with_the_cookie_need_the_csrf_token(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("a", redis_url, prefix, fail_times=-1, permanent=True)]) as d:
        await d.post(job_body())
        await eventually(lambda: _count(d, "a", 1))
        page = await d.page("/ui/dead/a")
        [letter] = re.findall(r'name="id" value="(\d+-\d+)"', page)[:1]
        login = await d.client.post("/ui/login", data={"token": TOKEN, "next": "/ui/dead/a"}, allow_redirects=False)
        assert login.status == 303
        for csrf in ({}, {"csrf": "0" * 64}):
            resp = await d.client.post("/ui/dead/a/drop", data={"id": letter, **csrf}, allow_redirects=False)
            assert resp.status == 403 and "form expired" in await resp.text()
        assert await _count(d, "a", 1)
        listed = await (await d.client.get("/ui/dead/a")).text()
        csrf_value = re.search(r'name="csrf" value="([0-9a-f]{64})"', listed)
        assert csrf_value is not None
        resp = await d.client.post("/ui/dead/a/drop", data={"id": letter, "csrf": csrf_value[1]}, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/ui/dead/a?done=dropped&n=1"
        assert await _count(d, "a", 0)
        assert "Dropped 1 entry" in await (await d.client.get(resp.headers["Location"])).text()
        # With the header instead of the cookie, no CSRF token is needed (a browser never adds the header).
        bad = await d.client.post("/ui/dead/a/drop", data={"id": "x"}, headers=d.bearer, allow_redirects=False)
        assert bad.status == 400


async def _count(d: Dash, handler: str, n: int) -> bool:
    return len(await _dead(d, handler)) == n


async def _dead(d: Dash, handler: str) -> list[Any]:
    client = await async_client(d.settings.redis.url)
    try:
        return list(await client.xrange(f"{d.settings.redis.prefix}:{{dlq}}:{handler}"))
    finally:
        await client.aclose()


async def test_job_page_shows_each_handlers_delivery_state(dash: Any, redis_url: str, prefix: str) -> None:
    handlers = [
        sink("ok", redis_url, prefix),
        sink("only-success", redis_url, prefix, when={"status": "succeeded"}),
        sink("flaky", redis_url, prefix, fail_times=-1, retry_after=3600),
        sink("broken", redis_url, prefix, fail_times=-1, permanent=True),
    ]
    async with dash(handlers) as d:
        answer = await d.post(job_body("ftjob-states"), "wh_states")
        await d.post(job_body("ftjob-states"), "wh_states_again")  # the same status again: a repeat

        async def settled() -> bool:
            page = await d.page("/ui/jobs/ftjob-states")
            return page.count('class="badge retrying"') == 1 and page.count('class="badge dead"') == 1

        await eventually(settled)
        page = await d.page("/ui/jobs/ftjob-states")
        first = page[page.index(f'id="event-{answer["entry_id"]}"') :]
        assert badges(first) == {"ok": "done", "only-success": "skipped", "flaky": "retrying", "broken": "dead"}
        assert "status &#39;failed&#39; is not one of [&#39;succeeded&#39;]" in first
        assert "RetryLater: sink flaky fails attempt 1" in first and 'next <span class="when"><time' in first
        assert "/ui/dead/broken/" in first
        repeat = page[page.index('id="event-') : page.index(f'id="event-{answer["entry_id"]}"')]
        assert "skipped: repeat of wh_states" in repeat
        assert repeat.count('<td><span class="badge skipped">') == 4
        # Search by job id and by webhook id both lead to the job.
        resp = await d.client.get("/ui/search?q=ftjob-states", headers=d.bearer, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/ui/jobs/ftjob-states"
        resp = await d.client.get("/ui/search?q=wh_states", headers=d.bearer, allow_redirects=False)
        assert resp.headers["Location"] == f"/ui/jobs/ftjob-states#event-{answer['entry_id']}"
        assert "Nothing found" in await d.page("/ui/search?q=wh_nothing", 404)
        overview = await d.page("/ui/")
        assert "events in the last minute" in overview and "ftjob-states" in overview


async def test_a_replayed_dead_letter_shows_where_its_replay_stands(dash: Any, redis_url: str, prefix: str) -> None:
    """A dead letter replayed leaves the dead-letter stream, so its entry looked read and acknowledged: the
    job page said "delivered" even when the replay failed again. The entry now stands where its replay does."""
    handlers = [sink("ok", redis_url, prefix), sink("broken", redis_url, prefix, fail_times=-1, permanent=True)]
    async with dash(handlers) as d, open_runtime(d.settings, redis_url) as runtime:
        answer = await d.post(job_body("ftjob-replayed"), "wh_replayed")
        first = await next_letter(runtime, "broken")
        await runtime.dead_letters.replay("broken", [first.id])
        again = await next_letter(runtime, "broken", after=first.id)  # the replay failed again
        page = await d.page("/ui/jobs/ftjob-replayed")
    row = page[page.index(f'id="event-{answer["entry_id"]}"') :]
    assert badges(row) == {"ok": "done", "broken": "dead"}
    assert "dead-lettered, replayed as " in row and f"/ui/dead/broken/{again.id}" in row


async def test_a_dead_letter_replayed_after_its_marker_would_have_expired_is_followed(
    dash: Any, redis_url: str, prefix: str, rclient: Any
) -> None:
    """The entry's dead-letter marker lived 7 days, whatever `redis.retention_s`: with a longer retention the
    entry outlived it, and a letter replayed (or dropped) after a week left no trace, so the job page said
    "delivered" again although the replay failed. The marker lives as long as the entry; a replay that finds
    it gone (written by an older version) writes it anew."""
    handlers = [sink("ok", redis_url, prefix), sink("broken", redis_url, prefix, fail_times=-1, permanent=True)]
    async with dash(handlers, retention_s=30 * 24 * 3600) as d, open_runtime(d.settings, redis_url) as runtime:
        answer = await d.post(job_body("ftjob-long-kept"), "wh_long_kept")
        first = await next_letter(runtime, "broken")
        marker = f"{prefix}:{{dlq}}:broken:of:{first.partition}:{answer['entry_id']}"
        assert await rclient.ttl(marker) > 29 * 24 * 3600  # as long as the entry may be shown
        await rclient.delete(marker)  # as an older version's 7-day marker is, a week on
        await runtime.dead_letters.replay("broken", [first.id])
        await next_letter(runtime, "broken", after=first.id)  # the replay failed again
        page = await d.page("/ui/jobs/ftjob-long-kept")
    row = page[page.index(f'id="event-{answer["entry_id"]}"') :]
    assert badges(row) == {"ok": "done", "broken": "dead"}
    assert "dead-lettered, replayed as " in row


async def test_job_metadata_is_escaped_on_every_page(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("broken", redis_url, prefix, fail_times=-1, permanent=True)]) as d:
        await d.post(job_body("ftjob-xss", metadata=XSS))
        await eventually(lambda: _count(d, "broken", 1))
        letter = re.findall(r'/ui/dead/broken/(\d+-\d+)"', await d.page("/ui/dead/broken"))[0]
        for path in ("/ui/jobs/ftjob-xss", f"/ui/dead/broken/{letter}"):
            page = await d.page(path)
            assert "<script>window" not in page and "<img" not in page, path
            assert "&lt;script&gt;" in page or "\\u003cscript" in page or "&#34;&gt;&lt;img" in page, path


async def test_quarantine_show_replay_and_drop(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("a", redis_url, prefix)]) as d:
        bad = compact(sample("fine_tuning_job.failed.json")).replace(b'"created_at":', b'"created_at":"<b>x</b>","_":')
        assert (await d.post(bad))["status"] == "quarantined"
        listed = await d.page("/ui/quarantine")
        [item] = re.findall(r'/ui/quarantine/(\d+-\d+)"', listed)
        shown = await d.page(f"/ui/quarantine/{item}")
        assert "&lt;b&gt;x&lt;/b&gt;" in shown and "<b>x" not in shown
        replay = await d.client.post("/ui/quarantine/replay", data={"id": item}, headers=d.bearer)
        assert "still not readable" in await replay.text()
        drop = await d.client.post("/ui/quarantine/drop", data={"id": item}, headers=d.bearer, allow_redirects=False)
        assert drop.status == 303
        assert "None." in await d.page("/ui/quarantine")


async def test_without_a_token_serve_has_no_dashboard(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("a", redis_url, prefix)], token="") as d:
        resp = await d.client.get("/ui/", headers=d.bearer)
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"dashboard\.token: must be at least 16"):
        Settings.from_raw({"dashboard": {"token": "short"}}, env={})
    settings = Settings.from_raw(
        {"dashboard": {"token": "${FTJOBS_DASHBOARD_TOKEN}"}}, env={"FTJOBS_DASHBOARD_TOKEN": TOKEN}
    )
    assert settings.dashboard.token == TOKEN


@pytest.mark.parametrize(
    ("facts", "kind"),
    [
        (Facts(read=False), "queued"),
        (Facts(read=False, skip="stale"), "queued"),
        (Facts(read=True, pending=True), "in_flight"),
        (Facts(read=True, pending=True, retry_at=5.0, attempts=1, error="boom"), "retrying"),
        (Facts(read=True, pending=True, retry_at=5.0, dead=("1-0", 4.0, 3, "boom")), "dead"),
        (Facts(read=True, dead=("1-0", 4.0, 3, "boom")), "dead"),
        (Facts(read=True, skip="stale"), "skipped"),
        (Facts(read=True), "done"),
        (Facts(read=True, done_marker=True), "done"),
    ],
)
def test_delivery_state_is_decided_from_the_facts(facts: Facts, kind: str) -> None:
    assert decide(facts).kind == kind


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_dashboard_command(tmp_path: Path, redis_url: str, prefix: str, procs: Callable[..., Proc]) -> None:
    """`ftjobs dashboard` refuses a public address without a token; on loopback it makes a local one."""
    config = write_config(tmp_path / "ftjobs.toml", redis={"prefix": prefix, "data_dir": str(tmp_path / "data")})
    env = base_env(REDIS_URL=redis_url, FTJOBS_CONFIG=str(config))
    refused = subprocess.run(
        [*FTJOBS, "dashboard", "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "refusing to serve the dashboard on 0.0.0.0 without a token" in refused.stderr
    port = free_port()
    proc = procs(["dashboard", "--port", str(port)], tmp_path, env, "dashboard")
    wait_for(lambda: _get(f"http://127.0.0.1:{port}/ui/") == 401, what="dashboard answering")
    token_file = tmp_path / "data" / "dashboard-token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()
    assert _get(f"http://127.0.0.1:{port}/ui/", {"Authorization": f"Bearer {token}"}) == 200
    assert proc.stop() == 0
    assert "using_local_dashboard_token" in proc.output() and token not in proc.output()


async def test_odd_input_gets_a_page_not_a_500(dash: Any, redis_url: str, prefix: str) -> None:
    async with dash([sink("a", redis_url, prefix)]) as d:
        cases = {
            "/ui/dead/a/99999999999999999999-0": 404,
            "/ui/dead/a/1-0": 404,
            "/ui/dead/nope": 404,
            "/ui/jobs/%3Cscript%3E": 404,
            "/ui/quarantine/x": 404,
            "/ui/search?q=%3Cscript%3Ealert(1)%3C/script%3E": 404,
            "/ui/static/nope.js": 404,
            # Digits of other scripts: `\\d` admits them, Redis refuses them (was a 503 "Redis is unavailable").
            "/ui/dead/a/%D9%A3-%D9%A3": 404,
            "/ui/quarantine/%D9%A3-0": 404,
            # `²` passes `str.isdigit` and fails `int` (was a 500).
            "/ui/dead/a?done=replayed&n=%C2%B2": 200,
            "/ui/quarantine?done=dropped&n=%C2%B2": 200,
        }
        for path, status in cases.items():
            page = await d.page(path, status)
            assert "<script>alert" not in page
        for form in ({"id": "1-0\r\nx"}, {"id": "99999999999999999999-0"}, {"id": "\u0663-\u0663"}, {}):
            resp = await d.client.post("/ui/dead/a/replay", data=form, headers=d.bearer, allow_redirects=False)
            assert resp.status == 400, form


async def _raw(d: Dash, request: bytes) -> tuple[int, bytes]:
    """Send a request as raw bytes (aiohttp's client will not send most of these) and read the answer."""
    reader, writer = await asyncio.open_connection(d.client.server.host, d.client.server.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


def _post(path: str, content_type: bytes, body: bytes, *headers: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: %s\r\n" % (path.encode(), content_type)
    return head + b"".join(h + b"\r\n" for h in headers) + b"Content-Length: %d\r\n\r\n" % len(body) + body


#: Form bodies aiohttp cannot read: each was a 500 before the dashboard turned them into a 400.
UNREADABLE_FORMS = {
    "multipart without a boundary": (b"multipart/form-data", b"x"),
    "a broken multipart part header": (b"multipart/form-data; boundary=zz", b"--zz\r\nbad\r\n"),
    "bytes outside the charset": (b"application/x-www-form-urlencoded", b"token=\xff"),
    "an unknown charset": (b"application/x-www-form-urlencoded; charset=nope", b"token=x"),
    "an unknown transfer encoding": (
        b"multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="token"\r\nContent-Transfer-Encoding: x-nope\r\n\r\n'
        b"x\r\n--zz--\r\n",
    ),
}


async def test_malformed_cookies_and_forms_get_a_page_not_a_500(dash: Any, redis_url: str, prefix: str) -> None:
    """What a stranger can send without the token: a cookie that is not ASCII (it cannot be MACed or compared
    in constant time), and a login form aiohttp cannot parse. And the same forms on actions, with the token."""
    async with dash([sink("a", redis_url, prefix)]) as d:
        for cookie in (b"1.a.\xff", b"9999999999.\xff.abc", "1.\u00e9.abc".encode()):
            request = b"GET /ui/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: ftjobs_ui=%s\r\n\r\n" % cookie
            status, page = await _raw(d, request)
            assert status == 401 and b'action="/ui/login"' in page, (cookie, page[:200])
        for path in (b"/ui/", b"/ui/nope", b"/"):  # aiohttp's own Expect handler answered 500 to this
            status, page = await _raw(
                d, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: \xff\r\n\r\n" % path
            )
            assert status == 417 and b"\xff" not in page, (path, page[:200])
        ok = await d.client.post("/ui/login", data={"token": TOKEN, "next": "/ui/"}, allow_redirects=False)
        session = f"ftjobs_ui={ok.cookies['ftjobs_ui'].value}".encode()
        for what, (content_type, body) in UNREADABLE_FORMS.items():
            status, page = await _raw(d, _post("/ui/login", content_type, body))
            assert status == 400 and b"could not be read" in page, (what, page[:300])
            bearer = b"Authorization: Bearer " + TOKEN.encode()
            status, page = await _raw(d, _post("/ui/dead/a/replay", content_type, body, bearer))
            assert status == 400 and b"could not be read" in page, (what, page[:300])
            status, page = await _raw(d, _post("/ui/quarantine/drop", content_type, body, b"Cookie: " + session))
            assert status == 400 and b"could not be read" in page, (what, page[:300])
