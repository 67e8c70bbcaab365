"""Real local HTTP servers standing in for Slack, GitHub, GitLab and Airflow in tests.

Each records what it received and checks the request shape the target's public docs describe; a request
of the wrong shape gets the 4xx the real service would give, so a test sees what a user would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

Recorder = list[dict[str, Any]]

BLOCK_TYPES = {"header", "section", "context", "divider", "actions", "image"}


def block_kit_problem(message: dict[str, Any]) -> str:
    """'' when `message` is valid Block Kit as Slack checks it (the parts we use), else what is wrong."""
    if not isinstance(message.get("text"), str) or not message["text"]:
        return "missing fallback text"
    for attachment in message.get("attachments", []):
        if not str(attachment.get("color", "")).startswith("#"):
            return "attachment color must be a hex colour"
        for block in attachment.get("blocks", []):
            kind = block.get("type")
            if kind not in BLOCK_TYPES:
                return f"unknown block type {kind!r}"
            if kind == "header" and (block["text"]["type"] != "plain_text" or len(block["text"]["text"]) > 150):
                return "header text must be plain_text of at most 150 characters"
            if kind == "section":
                if "fields" in block and len(block["fields"]) > 10:
                    return "a section takes at most 10 fields"
                texts = [block["text"]] if "text" in block else block.get("fields", [])
                if not texts or any(t["type"] not in ("mrkdwn", "plain_text") or len(t["text"]) > 3000 for t in texts):
                    return "section text must be mrkdwn/plain_text of at most 3000 characters"
                if any(not t["text"].strip() for t in texts):
                    return "section text must not be empty"
                if any(len(t["text"]) > 2000 for t in block.get("fields", [])):
                    return "a section field takes at most 2000 characters"
    return ""


def slack_app(seen: Recorder, *, status: Callable[[int], int] = lambda n: 200, error: str = "") -> web.Application:
    """An incoming webhook at /hook and the Web API's chat.postMessage at /api/chat.postMessage."""
    counter = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        message = await request.json()
        seen.append({"path": request.path, "json": message, "headers": dict(request.headers)})
        counter["n"] += 1
        code = status(counter["n"])
        if code == 429:
            return web.Response(status=429, text="rate_limited", headers={"Retry-After": "1"})
        if code != 200:
            return web.Response(status=code, text=error or "server_error")
        problem = block_kit_problem(message)
        return web.Response(status=400, text=f"invalid_blocks: {problem}") if problem else web.Response(text="ok")

    async def post_message(request: web.Request) -> web.Response:
        message = await request.json()
        seen.append({"path": request.path, "json": message, "headers": dict(request.headers)})
        if request.headers.get("Authorization") != "Bearer xoxb-test-token":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if error:
            return web.json_response({"ok": False, "error": error})
        problem = block_kit_problem(message)
        if problem:
            return web.json_response({"ok": False, "error": "invalid_blocks"})
        return web.json_response({"ok": True, "channel": message["channel"], "ts": f"1700000000.{len(seen):06d}"})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/api/chat.postMessage", post_message)
    return app


def pipelines_app(seen: Recorder) -> web.Application:
    """GitHub (repository_dispatch, workflow_dispatch), GitLab trigger and Airflow dagRuns endpoints."""
    airflow_runs: set[str] = set()

    async def record(request: web.Request) -> dict[str, Any]:
        body = await request.read()
        item = {"path": request.raw_path, "headers": dict(request.headers), "body": body}
        seen.append(item)
        return item

    def github_ok(request: web.Request) -> str:
        if request.headers.get("Authorization") != "Bearer ghp_test":
            return "Bad credentials"
        if request.headers.get("Accept") != "application/vnd.github+json":
            return "wrong Accept"
        if request.headers.get("X-GitHub-Api-Version") != "2022-11-28":
            return "wrong API version"
        return ""

    async def repository_dispatch(request: web.Request) -> web.Response:
        await record(request)
        if problem := github_ok(request):
            return web.json_response({"message": problem}, status=401)
        doc = await request.json()
        if not isinstance(doc.get("event_type"), str) or not 1 <= len(doc["event_type"]) <= 100:
            return web.json_response({"message": "event_type is required"}, status=422)
        if len(doc.get("client_payload", {})) > 10:
            return web.json_response({"message": "client_payload has too many properties"}, status=422)
        return web.Response(status=204)

    async def workflow_dispatch(request: web.Request) -> web.Response:
        await record(request)
        if problem := github_ok(request):
            return web.json_response({"message": problem}, status=401)
        doc = await request.json()
        if not isinstance(doc.get("ref"), str):
            return web.json_response({"message": "ref is required"}, status=422)
        if any(not isinstance(v, str) for v in doc.get("inputs", {}).values()):
            return web.json_response({"message": "inputs must be strings"}, status=422)
        return web.Response(status=204)

    async def gitlab_trigger(request: web.Request) -> web.Response:
        await record(request)
        form = await request.post()
        if form.get("token") != "glptt-test":
            return web.json_response({"message": "404 Not Found"}, status=404)
        if not form.get("ref"):
            return web.json_response({"error": "ref is missing"}, status=400)
        return web.json_response({"id": 4242, "status": "created", "ref": form["ref"]}, status=201)

    async def airflow_dag_run(request: web.Request) -> web.Response:
        await record(request)
        if request.headers.get("Authorization") != "Basic YWlyZmxvdzpzZWNyZXQ=":  # airflow:secret
            return web.json_response({"title": "Unauthorized"}, status=401)
        doc = await request.json()
        run_id = doc.get("dag_run_id")
        if run_id in airflow_runs:
            return web.json_response({"title": "DAGRun already exists"}, status=409)
        airflow_runs.add(run_id)
        return web.json_response({"dag_run_id": run_id, "state": "queued", "conf": doc.get("conf")})

    app = web.Application()
    app.router.add_post("/repos/{owner}/{repo}/dispatches", repository_dispatch)
    app.router.add_post("/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches", workflow_dispatch)
    app.router.add_post("/api/v4/projects/{project}/trigger/pipeline", gitlab_trigger)
    app.router.add_post("/api/v1/dags/{dag_id}/dagRuns", airflow_dag_run)
    return app


def redirect_app(location: Callable[[], str], status: int = 307) -> web.Application:
    """A target that answers every request, on any path and with any method, with a redirect to `location()`."""

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, headers={"Location": location()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


def catch_all_app(seen: Recorder) -> web.Application:
    """The host a redirect points to: records every request on any path and answers 200."""

    async def record(request: web.Request) -> web.Response:
        seen.append({"method": request.method, "path": request.raw_path, "headers": dict(request.headers)})
        seen[-1]["body"] = await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    return app
