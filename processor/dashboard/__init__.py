"""The operators' dashboard: see the queue, the jobs and the dead letters, and replay or drop them.

Server-rendered (aiohttp + Jinja2, autoescaped), with its CSS and script shipped in this package: no build
step, nothing fetched from elsewhere. `create_dashboard` makes it as a sub-application; `mount` puts it at
`/ui/` on the receiver (`serve`, `receive`, when `[dashboard] token` is set) and `standalone_app` serves it
alone (`ftjobs dashboard`). Who may enter is `auth`'s business, what the pages show is `queries`'.
"""

from __future__ import annotations

import os
import secrets
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

import msgspec
import structlog
from aiohttp import web

from processor import httpserver
from processor.client import REDIS_ERRORS
from processor.errors import ConfigError
from processor.httpserver import SERVER_OPTIONS, server_options
from processor.runtime import open_runtime
from processor.settings import Settings

from . import views
from .auth import COOKIE, CSRF_FIELD, Auth, bearer, is_loopback
from .queries import Data

log = structlog.get_logger()

PREFIX: Final = "/ui/"
LOCAL_TOKEN_FILE: Final = "dashboard-token"


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Let in only holders of the token (header or session cookie), check CSRF on cookie POSTs, turn every
    error into a page (a 500 without a traceback), and put the security headers on every answer."""
    try:
        response = await _checked(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            response = web.Response(status=exc.status, headers=exc.headers)
        else:
            response = views.render(request, "error.html", status=exc.status, message=exc.reason)
    except (*REDIS_ERRORS, OSError) as exc:
        log.warning("dashboard_redis_unavailable", error=type(exc).__name__)
        response = views.render(request, "error.html", status=503, message="Redis is unavailable; try again soon.")
    except Exception as exc:  # a bug: one log line, no traceback to the client
        where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-1:]]
        log.error("dashboard_request_failed", path=request.path, error=type(exc).__name__, at=",".join(where))
        response = views.render(request, "error.html", status=500, message="Internal error.")
    views.security_headers(response)
    return response


async def _checked(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    route = request.match_info.route.name
    if route in views.PUBLIC:
        return await handler(request)
    auth = request.app[views.AUTH]
    token = bearer(request)
    if token is not None:
        if not auth.token_ok(token):
            log.warning("dashboard_bad_token", remote=request.remote)
            return views.login_page(request)
        request[views.SESSION] = ""
        return await handler(request)
    session = request.cookies.get(COOKIE, "")
    if not auth.session_ok(session):
        return views.login_page(request)
    request[views.SESSION] = session
    if request.method not in ("GET", "HEAD"):
        form = await views.read_form(request)
        given = form.get(CSRF_FIELD, "")
        if not isinstance(given, str) or not auth.csrf_ok(session, given):
            log.warning("dashboard_csrf_refused", path=request.path, remote=request.remote)
            return views.render(request, "error.html", status=403, message="The form expired; reload the page.")
    return await handler(request)


def create_dashboard(settings: Settings, redis_url: str) -> web.Application:
    """The dashboard as an aiohttp sub-application (mount it at `/ui/`). It needs `[dashboard] token`.

    While the app runs it holds a `Runtime` on `redis_url` (the composition root builds the client and the
    objects the pages read through), closed at cleanup.
    """
    if not settings.dashboard.token:
        raise ConfigError("dashboard.token: the dashboard needs a token (set it, e.g. from $FTJOBS_DASHBOARD_TOKEN)")
    app = httpserver.application(middlewares=[guard])
    app[views.SETTINGS] = settings
    app[views.AUTH] = Auth(settings.dashboard.token, settings.dashboard.session_s)
    app[views.TEMPLATES] = views.environment()

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_runtime(settings, redis_url) as runtime:
            app[views.DATA] = Data(runtime)
            yield

    app.cleanup_ctx.append(runtime_ctx)
    views.add_routes(app)
    return app


def mount(app: web.Application, settings: Settings, redis_url: str) -> None:
    """Serve the dashboard at `/ui/` on `app` (the receiver)."""
    app.add_subapp(PREFIX, create_dashboard(settings, redis_url))
    log.info("dashboard_mounted", path=PREFIX)


def standalone_app(settings: Settings, redis_url: str) -> web.Application:
    """`ftjobs dashboard`: the dashboard at `/ui/`, and `/` sending the browser there."""
    app = httpserver.application()
    app[SERVER_OPTIONS] = server_options(settings.receiver)

    async def to_ui(request: web.Request) -> web.Response:
        return web.Response(status=303, headers={"Location": PREFIX})

    app.router.add_get("/", to_ui)
    app.router.add_get("/ui", to_ui)
    mount(app, settings, redis_url)
    return app


def with_token(settings: Settings, host: str) -> Settings:
    """Settings with a dashboard token for `ftjobs dashboard` on `host`.

    Without a configured token it serves only a loopback address, with a random token kept in the data
    directory (mode 0600; the log names the file, never the token). Anywhere else it refuses to start.
    """
    if settings.dashboard.token:
        return settings
    if not is_loopback(host):
        raise ConfigError(
            f"dashboard.token: refusing to serve the dashboard on {host} without a token; set [dashboard] token "
            '(e.g. token = "${FTJOBS_DASHBOARD_TOKEN}") or listen on 127.0.0.1'
        )
    path = Path(settings.redis.data_dir) / LOCAL_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    log.warning("using_local_dashboard_token", file=str(path), hint="log in with the token in this file")
    dashboard = msgspec.structs.replace(settings.dashboard, token=path.read_text().strip())
    return msgspec.structs.replace(settings, dashboard=dashboard)


__all__ = ["CSRF_FIELD", "create_dashboard", "mount", "standalone_app", "with_token"]
