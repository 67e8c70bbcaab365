"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) against a real
receiver with the dashboard mounted, a real worker and Redis.

Each test writes a screenshot of every page it visits under its temporary directory and prints the path.
They are skipped, saying why, only when no Chromium binary is installed (`.ci/run` installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from playwright.async_api import Browser, Page, async_playwright

from processor import registry
from processor.runtime import running_worker
from processor.service import serve_app
from processor.settings import Settings
from tests.conftest import PATH, eventually, sample, signed, sink

TOKEN = "browser-test-token-0123456789abcdef"
CHROMIUM = os.environ.get("FTJOBS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

#: Records what a page must never do: run an injected script, open a dialog, or trip the CSP.
WATCH = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective));
"""


def job_body(job_id: str, status: str, metadata: dict[str, str] | None = None) -> bytes:
    name = {"failed": "failed", "succeeded": "succeeded"}.get(status, "running")
    job = msgspec.json.decode(sample(f"fine_tuning_job.{name}.json"))
    job |= {"id": job_id, "status": status, "metadata": metadata or {"team": "search", "owner": "ana@example.com"}}
    if status not in ("failed", "succeeded", "cancelled"):
        job |= {"finished_at": None, "fine_tuned_model": None, "error": None}
    return msgspec.json.encode(job)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        await browser.close()


class Site:
    """The receiver (with the dashboard) on 127.0.0.1, a browser page logged out, and a screenshot helper."""

    def __init__(self, base: str, page: Page, settings: Settings, post: Callable[..., Any], shots: Path) -> None:
        self.base = base
        self.page = page
        self.settings = settings
        self.post = post
        self.shots = shots
        self.dialogs: list[str] = []
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def goto(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    async def login(self) -> None:
        await self.goto("/ui/")
        await self.page.fill("input[name=token]", TOKEN)
        await self.page.click("button[type=submit]")
        await self.page.wait_for_selector("h1:text('Overview')")

    async def safe(self) -> None:
        """Nothing injected ran: no dialog, no flag set by a payload, no CSP violation."""
        assert self.dialogs == []
        assert await self.page.evaluate("window.__pwned === undefined")
        assert await self.page.evaluate("window.__violations") == []


@pytest.fixture
def site(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    browser: Browser,
    tmp_path: Path,
) -> Any:
    @contextlib.asynccontextmanager
    async def make(handlers: list[dict[str, Any]]) -> AsyncIterator[Site]:
        settings = make_settings(handlers, dashboard={"token": TOKEN})
        client = await aiohttp_client(serve_app(settings, redis_url))

        async def post(body: bytes, webhook_id: str | None = None) -> dict[str, Any]:
            resp = await client.post(PATH, data=body, headers=signed(body, webhook_id))
            assert resp.status == 200, await resp.text()
            answer: dict[str, Any] = await resp.json()
            return answer

        context = await browser.new_context(timezone_id="Europe/Berlin", viewport={"width": 1280, "height": 800})
        await context.add_init_script(WATCH)
        page = await context.new_page()
        shots = tmp_path / "screenshots"
        shots.mkdir()
        try:
            yield Site(str(client.make_url("")).rstrip("/"), page, settings, post, shots)
        finally:
            await context.close()

    return make


async def test_login_refused_then_accepted(site: Any, redis_url: str, prefix: str) -> None:
    async with site([sink("a", redis_url, prefix)]) as s:
        response = await s.page.goto(s.base + "/ui/dead")
        assert response is not None and response.status == 401
        await s.shot("login")
        await s.page.fill("input[name=token]", "not-the-token-at-all")
        await s.page.click("button[type=submit]")
        assert "That token is not valid." in await s.page.inner_text("[role=alert]")
        assert await s.page.context.cookies() == []
        await s.page.fill("input[name=token]", TOKEN)
        await s.page.click("button[type=submit]")
        await s.page.wait_for_selector("h1:text('Dead letters')")  # back where it was going
        [cookie] = await s.page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
        assert await s.page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it
        await s.page.click("text=Log out")
        await s.page.wait_for_selector("input[name=token]")
        await s.goto("/ui/")
        assert await s.page.locator("input[name=token]").count() == 1
        await s.safe()


#: A small deployment's history: (job, statuses in arrival order).
DEMO = [
    ("ftjob-demo-a", ["validating_files", "queued", "running", "succeeded"]),
    ("ftjob-demo-b", ["running", "failed"]),
    ("ftjob-demo-c", ["queued"]),
]


def handlers(redis_url: str, prefix: str, *, fixed: bool) -> list[dict[str, Any]]:
    """`flaky` refuses every event until it is fixed; `notify` takes terminal statuses under a rate limit;
    `pipeline` keeps asking for a retry in an hour when a job failed."""
    flaky = {} if fixed else {"fail_times": -1, "permanent": True}
    return [
        sink("flaky", redis_url, prefix, **flaky),
        sink("notify", redis_url, prefix, when={"status": ["failed", "succeeded"]}, rate_limit_per_min=100),
        sink("pipeline", redis_url, prefix, when={"status": "failed"}, fail_times=-1, retry_after=3600),
    ]


async def test_dead_letter_replayed_from_the_page_is_delivered_once(
    site: Any, redis_url: str, prefix: str, rclient: Any
) -> None:
    async with site(handlers(redis_url, prefix, fixed=False)) as s:
        async with running_worker(s.settings, redis_url, registry.build(s.settings.handlers)):
            for job_id, statuses in DEMO:
                for status in statuses:
                    await s.post(job_body(job_id, status))
            answer = await s.post(job_body("ftjob-broken", "failed"), "wh_broken")

            async def dead() -> bool:
                retrying = int(await rclient.zcard(f"{prefix}:{{p0}}:retry:pipeline"))
                return int(await rclient.xlen(f"{prefix}:{{dlq}}:flaky")) == 8 and retrying == 2

            await eventually(dead)
        await s.login()
        assert "8" in await s.page.inner_text("td.bad")
        await s.shot("overview")
        await s.goto("/ui/jobs")
        await s.shot("jobs")
        await s.goto("/ui/jobs/ftjob-demo-a")
        await s.shot("job-timeline")
        await s.goto("/ui/jobs/ftjob-broken")
        assert await s.page.locator("td .badge.dead").count() == 1
        assert await s.page.locator("td .badge.retrying").count() == 1
        # Times are shown in the viewer's zone (Berlin here); the UTC text stays in the title.
        first_time = s.page.locator("time").first
        assert (await first_time.get_attribute("title") or "").endswith("UTC")
        assert "UTC" not in await first_time.inner_text()
        await s.shot("job")
        await s.goto("/ui/dead/flaky")
        await s.shot("dead-letters")
        row = s.page.locator("tr", has_text="ftjob-broken")
        await row.locator("text=Show").click()
        await s.page.wait_for_selector("h2:text('Record')")
        assert "wh_broken" in await s.page.inner_text("pre")
        await s.shot("dead-letter")
        # The handler is fixed; replay from the page, with the worker running again.
        fixed = make_fixed(s.settings, handlers(redis_url, prefix, fixed=True))
        async with running_worker(fixed, redis_url, registry.build(fixed.handlers)):
            await s.page.click("button:text('Replay')")
            await s.page.wait_for_selector("text=Replayed 1 dead letter(s).")
            await s.shot("after-replay")

            async def delivered() -> bool:
                return int(await rclient.llen(f"{prefix}:sink:flaky")) == 1

            await eventually(delivered)

            async def settled() -> bool:
                groups = {g["name"]: g for g in await rclient.xinfo_groups(f"{prefix}:{{p0}}:events")}
                return groups[b"flaky"]["lag"] == 0 and groups[b"flaky"]["pending"] == 0

            await eventually(settled)
        assert await rclient.hgetall(f"{prefix}:sink:flaky:count") == {b"wh_broken": b"1"}
        assert int(await rclient.llen(f"{prefix}:sink:notify")) == 3  # the other handlers got nothing again
        assert int(await rclient.xlen(f"{prefix}:{{dlq}}:flaky")) == 7
        await s.goto("/ui/quarantine")
        await s.shot("quarantine")
        await s.page.fill("input[name=q]", answer["webhook_id"])
        await s.page.press("input[name=q]", "Enter")
        await s.page.wait_for_selector("h1:has-text('ftjob-broken')")
        await s.safe()


def make_fixed(settings: Settings, tables: list[dict[str, Any]]) -> Settings:
    """The same deployment with other handler tables (a handler repaired)."""
    raw = msgspec.to_builtins(settings)
    raw["handlers"] = tables
    raw.pop("source", None)
    return Settings.from_raw(raw, env={})


async def test_a_script_in_job_metadata_does_not_run(site: Any, redis_url: str, prefix: str, rclient: Any) -> None:
    payloads = {
        "owner": "<script>window.__pwned = 1; alert('script')</script>",
        "team": '"><img src=x onerror="window.__pwned = 2; alert(\'img\')">',
        "note": "<svg onload=\"alert('svg')\"></svg><a href=\"javascript:alert('a')\">x</a>",
    }
    async with site([sink("broken", redis_url, prefix, fail_times=-1, permanent=True)]) as s:
        async with running_worker(s.settings, redis_url, registry.build(s.settings.handlers)):
            await s.post(job_body("ftjob-xss", "failed", payloads))

            async def dead() -> bool:
                return int(await rclient.xlen(f"{prefix}:{{dlq}}:broken")) == 1

            await eventually(dead)
        await s.login()
        await s.goto("/ui/jobs/ftjob-xss")
        text = await s.page.inner_text("main")
        for value in payloads.values():
            assert value in text  # shown as text, verbatim
        assert await s.page.locator("main img, main svg, main script, main a[href^='javascript']").count() == 0
        await s.shot("job-xss")
        await s.safe()
        await s.goto("/ui/dead/broken")
        await s.page.locator("text=Show").first.click()
        await s.page.wait_for_selector("h2:text('Record')")
        assert await s.page.locator("main img, main svg, main script").count() == 0
        await s.shot("dead-letter-xss")
        await s.safe()
        for path in ("/ui/jobs", "/ui/", "/ui/dead/broken"):
            await s.goto(path)
            await s.safe()
