"""A local stand-in for the OpenAI fine-tuning API: the documented shapes plus the live API's quirks.

Jobs live in `api.jobs` (id → JSON dict) and can be changed between calls. `api.failures[job_id]` is a list
of statuses to answer before the real one (e.g. [429, 500]); `api.delay_s` slows every answer.
Every request is counted in `api.calls` by its path as sent (still percent-encoded, without the query); a
request to any other path is counted too and answered 404, as the API answers an unknown URL.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiohttp import web

KEY = "sk-test-fake-key-123"


class FakeOpenAI:
    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, list[int]] = {}
        self.calls: Counter[str] = Counter()
        self.delay_s = 0.0
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/fine_tuning/jobs", self.list_jobs)
        app.router.add_get("/v1/fine_tuning/jobs/{job_id}", self.retrieve)
        app.router.add_get("/v1/fine_tuning/jobs/{job_id}/events", self.events)
        app.router.add_route("*", "/{tail:.*}", self.elsewhere)
        return app

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.calls[request.rel_url.raw_path] += 1
        self.headers.append(dict(request.headers))
        message = f"Invalid URL ({request.method} {request.raw_path})"
        return web.json_response({"error": {"message": message, "code": None}}, status=404)

    async def _gate(self, request: web.Request, key: str) -> web.Response | None:
        self.calls[request.rel_url.raw_path] += 1
        self.headers.append(dict(request.headers))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response(
                {"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}, status=401
            )
        pending = self.failures.get(key)
        if pending:
            status = pending.pop(0)
            headers = {"Retry-After": "0.1"} if status == 429 else {}
            return web.json_response({"error": {"message": f"simulated {status}"}}, status=status, headers=headers)
        return None

    async def retrieve(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if (refused := await self._gate(request, job_id)) is not None:
            return refused
        if job_id not in self.jobs:
            return web.json_response(
                {"error": {"message": f"Could not find fine-tune job: {job_id}", "code": "fine_tune_not_found"}},
                status=404,
            )
        return web.json_response(self.jobs[job_id])

    async def list_jobs(self, request: web.Request) -> web.Response:
        if (refused := await self._gate(request, "__list__")) is not None:
            return refused
        jobs = sorted(self.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        for key, value in request.query.items():
            if key.startswith("metadata[") and key.endswith("]"):
                name = key[len("metadata[") : -1]
                jobs = [j for j in jobs if (j.get("metadata") or {}).get(name) == value]
        if after := request.query.get("after"):
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        return web.json_response({"object": "list", "data": jobs[:limit], "has_more": len(jobs) > limit})

    async def events(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if (refused := await self._gate(request, job_id)) is not None:
            return refused
        data = [
            {
                "object": "fine_tuning.job.event",
                "id": "ftevent-1",
                "created_at": 1,
                "level": "info",
                "message": "Job started",
                "type": "message",
                "data": {},
            },
        ]
        return web.json_response({"object": "list", "data": data, "has_more": False})
