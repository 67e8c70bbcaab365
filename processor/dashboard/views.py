"""The dashboard's pages and actions: thin aiohttp handlers over `queries.Data`, rendered by Jinja2.

Pages are GETs; every change (replay, drop, logout) is a POST that the middleware has already checked for
its CSRF token, answered with a redirect (303) so a reload does not repeat it.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final
from urllib.parse import quote

import jinja2
import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from processor.humanize import human_duration
from processor.keys import ENTRY_ID
from processor.settings import Settings

from .auth import COOKIE, CSRF_FIELD, SECURITY_HEADERS, Auth, clear_session, safe_next, set_session
from .queries import Data

log = structlog.get_logger()

SETTINGS: Final = web.AppKey("dashboard_settings", Settings)
DATA: Final = web.AppKey("dashboard_data", Data)
AUTH: Final = web.AppKey("dashboard_auth", Auth)
TEMPLATES: Final = web.AppKey("dashboard_templates", jinja2.Environment)
#: The session cookie a request came with ("": it came with the bearer token).
SESSION: Final = web.RequestKey("dashboard_session", str)

#: The job id grammar the receiver enforces (`models.JobId`); anything else cannot have a page.
JOB_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
#: Dead letters or quarantined bodies listed on one page (the oldest); the page says how many more there are.
LISTED: Final = 200
STATIC: Final = {"style.css": "text/css", "time.js": "text/javascript"}
#: What a redirect after an action may announce (`?done=`): fixed words, never text from the request.
NOTICES: Final = {"replayed": "Replayed {n} dead letter(s).", "dropped": "Dropped {n} entry(ies)."}


def environment() -> jinja2.Environment:
    """Templates from the package, every value autoescaped, with the time and duration filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("processor.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["iso"] = lambda ts: datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")
    env.filters["utc"] = lambda ts: datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    env.filters["ago"] = _ago
    env.filters["duration"] = _span
    env.filters["short"] = lambda s, n=120: s if len(s) <= n else s[: n - 1] + "…"
    return env


def _span(seconds: float) -> str:
    """`human_duration`, in days and hours beyond two days (`388d 5h`, not `9317h 01m`)."""
    if seconds >= 2 * 86400:
        days, rest = divmod(int(seconds), 86400)
        return f"{days}d {rest // 3600}h"
    return human_duration(seconds)


def _ago(ts: float) -> str:
    delta = time.time() - ts
    return f"{_span(delta)} ago" if delta >= 0 else f"in {_span(-delta)}"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A page: the template with the navigation context (CSRF token, whether a logout form applies)."""
    session = request.get(SESSION)
    auth = request.app[AUTH]
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            csrf=auth.csrf(session) if session else "",
            session=bool(session),
            csrf_field=CSRF_FIELD,
            handlers=list(request.app[SETTINGS].handlers),
            **context,
        )
    )
    return web.Response(text=html, content_type="text/html", status=status)


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(reason=what)


# --- login -------------------------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", next=safe_next(request.query.get("next", "/ui/")), error="")


async def login(request: web.Request) -> web.Response:
    """Check the token from the form; on success set the session cookie and go where the user was going."""
    form = await read_form(request)
    target = safe_next(_field(form, "next"))
    auth = request.app[AUTH]
    if not auth.token_ok(_field(form, "token")):
        log.warning("dashboard_login_refused", remote=request.remote)
        return render(request, "login.html", status=401, next=target, error="That token is not valid.")
    log.info("dashboard_login", remote=request.remote)
    response = redirect(target)
    set_session(response, request, auth.new_session(), auth.session_s)
    return response


async def logout(request: web.Request) -> web.Response:
    response = redirect("/ui/login")
    clear_session(response)
    return response


def login_page(request: web.Request) -> web.Response:
    """What a request without valid credentials gets: 401, with the login form."""
    target = request.path_qs if request.method == "GET" else "/ui/"
    response = render(request, "login.html", status=401, next=safe_next(target), error="")
    response.headers["WWW-Authenticate"] = 'Bearer realm="ftjobs dashboard"'
    if COOKIE in request.cookies:
        clear_session(response)
    return response


# --- pages -------------------------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    return render(request, "overview.html", o=await request.app[DATA].overview(), now=time.time())


async def jobs(request: web.Request) -> web.Response:
    return render(request, "jobs.html", jobs=await request.app[DATA].recent())


async def job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    if not JOB_ID.fullmatch(job_id):
        raise not_found("no such job")
    events = await request.app[DATA].job(job_id)
    if not events:
        raise not_found(f"no events recorded for job {job_id}")
    latest = next((event.job for _, event, _, _ in events if event is not None and event.job is not None), None)
    return render(request, "job.html", job_id=job_id, events=events, job=latest)


async def dead_index(request: web.Request) -> web.Response:
    data = request.app[DATA]
    return render(request, "dead_index.html", sizes=await data.streams.status(data.handlers))


async def dead_letters(request: web.Request) -> web.Response:
    handler = _handler(request)
    dead = request.app[DATA].dead
    letters = await dead.letters(handler, LISTED)
    total = await dead.count(handler)
    return render(request, "dead.html", handler=handler, letters=letters, total=total, notice=_notice(request))


async def dead_letter(request: web.Request) -> web.Response:
    handler, entry_id = _handler(request), _entry_id(request)
    found = await request.app[DATA].dead.get(handler, [entry_id])
    if not found:
        raise not_found("no such dead letter")
    letter = found[0]
    pretty = msgspec.json.format(msgspec.json.encode(letter)).decode()
    return render(request, "letter.html", handler=handler, letter=letter, pretty=pretty)


async def dead_action(request: web.Request) -> web.Response:
    """POST replay/drop of the dead letters named in the form's `id` fields."""
    handler, action = _handler(request), request.match_info["action"]
    ids = _ids(await read_form(request))
    dead = request.app[DATA].dead
    if action == "replay":
        count = len(await dead.replay(handler, ids))
        log.info("dashboard_replayed", handler=handler, count=count)
    else:
        count = await dead.drop(handler, ids)
        log.info("dashboard_dropped", handler=handler, count=count)
    return redirect(f"/ui/dead/{handler}?done={'replayed' if action == 'replay' else 'dropped'}&n={count}")


async def quarantine(request: web.Request) -> web.Response:
    dead = request.app[DATA].dead
    items, total = await dead.quarantined(LISTED), await dead.count_quarantined()
    return render(request, "quarantine.html", items=items, total=total, outcomes=[], notice=_notice(request))


async def quarantined(request: web.Request) -> web.Response:
    entry_id = _entry_id(request)
    found = await request.app[DATA].dead.get_quarantined([entry_id])
    if not found:
        raise not_found("no such quarantined body")
    return render(request, "quarantined.html", item=found[0], body=found[0].body.decode(errors="replace"))


async def quarantine_action(request: web.Request) -> web.Response:
    """POST replay (decode again, enqueue what decodes) or drop; a replay shows each entry's outcome."""
    ids = _ids(await read_form(request))
    data = request.app[DATA]
    if request.match_info["action"] == "drop":
        count = await data.dead.drop_quarantined(ids)
        log.info("dashboard_dropped_quarantined", count=count)
        return redirect(f"/ui/quarantine?done=dropped&n={count}")
    outcomes = await data.dead.replay_quarantined(ids, list(data.handlers))
    log.info("dashboard_replayed_quarantined", count=len(outcomes))
    items, total = await data.dead.quarantined(LISTED), await data.dead.count_quarantined()
    return render(request, "quarantine.html", items=items, total=total, outcomes=outcomes, notice="")


async def search(request: web.Request) -> web.Response:
    """A job id goes to its page; a webhook (event) id goes to its job's page, at that event."""
    query = request.query.get("q", "").strip()
    data = request.app[DATA]
    if query and JOB_ID.fullmatch(query):
        if await data.jobs.timeline(query):
            return redirect(f"/ui/jobs/{quote(query)}")
        found = await data.entry_for(query)
        if found is not None and found[1] is not None:
            return redirect(f"/ui/jobs/{quote(found[1].job_id)}#event-{found[0]}")
    return render(request, "search.html", query=query, status=404 if query else 200)


async def static(request: web.Request) -> web.Response:
    """A stylesheet or script shipped in the package (nothing else is served from it)."""
    name = request.match_info["name"]
    if name not in STATIC:
        raise not_found("no such file")
    body = (resources.files("processor.dashboard") / "static" / name).read_bytes()
    response = web.Response(body=body, content_type=STATIC[name])
    response.headers["Cache-Control"] = "max-age=300"
    return response


# --- helpers -----------------------------------------------------------------------------------------------


async def read_form(request: web.Request) -> MultiDictProxy[Any]:
    """The request's form fields; 400 when aiohttp cannot read it (a multipart body without a boundary or with
    broken part headers, bytes that are not in its charset, an unknown charset), never a 500."""
    try:
        return await request.post()
    # UnicodeDecodeError is a ValueError; RuntimeError: a part's unknown Content-Transfer-Encoding.
    except (ValueError, LookupError, RuntimeError, HttpProcessingError):
        raise web.HTTPBadRequest(reason="the form could not be read") from None


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def _handler(request: web.Request) -> str:
    name = request.match_info["handler"]
    if name not in request.app[DATA].handlers:
        raise not_found("no such handler")
    return name


def _entry_id(request: web.Request) -> str:
    entry_id = request.match_info["entry_id"]
    if not ENTRY_ID.fullmatch(entry_id):
        raise not_found("no such entry")
    return entry_id


def _ids(form: MultiDictProxy[Any]) -> list[str]:
    ids = [v for v in form.getall("id", []) if isinstance(v, str)]
    if not ids or not all(ENTRY_ID.fullmatch(i) for i in ids):
        raise web.HTTPBadRequest(reason="choose at least one entry")
    return ids


def _notice(request: web.Request) -> str:
    template = NOTICES.get(request.query.get("done", ""))
    count = request.query.get("n", "0")
    # ASCII digits only: `str.isdigit` also admits `²`, which `int` refuses.
    return template.format(n=int(count)) if template and count.isascii() and count.isdigit() and len(count) < 7 else ""


def security_headers(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def add_routes(app: web.Application) -> None:
    """The dashboard's routes, relative to where it is mounted (`/ui/`)."""
    r = app.router
    r.add_get("/", overview, name="overview")
    r.add_get("/login", login_form, name="login")
    r.add_post("/login", login, name="login_post")
    r.add_post("/logout", logout, name="logout")
    r.add_get("/jobs", jobs)
    r.add_get("/jobs/{job_id}", job)
    r.add_get("/dead", dead_index)
    r.add_get("/dead/{handler}", dead_letters)
    r.add_get("/dead/{handler}/{entry_id}", dead_letter)
    r.add_post("/dead/{handler}/{action:replay|drop}", dead_action)
    r.add_get("/quarantine", quarantine)
    r.add_get("/quarantine/{entry_id}", quarantined)
    r.add_post("/quarantine/{action:replay|drop}", quarantine_action)
    r.add_get("/search", search)
    r.add_get("/static/{name}", static, name="static")


#: Routes anyone may reach: the login form and the package's CSS/JS.
PUBLIC: Final = frozenset({"login", "login_post", "static"})
