"""Chaos against `ftjobs serve` on its embedded Valkey: SIGTERM and SIGKILL restarts while a sender posts each
job's `running` then `succeeded` close together, at targets that do not deduplicate.

Three real targets count every side effect: a local HTTP server standing in for a Slack incoming webhook, an
SMTP server (aiosmtpd) and an HTTP pipeline trigger. Each is slow enough that calls are in flight at a stop.
Prints, per handler: events lost (acknowledged, never delivered), side effects done twice (after SIGTERMs,
after SIGKILLs), and jobs whose `succeeded` arrived before their `running`.

    python -m bench.chaos_serve --jobs 300 --kills 3 --terms 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiosmtpd.controller import Controller

from tests.conftest import SECRET, free_port, sample, signed
from tests.processes import Proc, base_env, http_ready, wait_for, write_config

SUCCEEDED = msgspec.json.decode(sample("fine_tuning_job.succeeded.json"))


class Seen:
    """Every side effect a target saw, in arrival order: (job id, status)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        #: When each call came (monotonic), to tell which stop a repeated one followed.
        self.times: list[float] = []

    def add(self, job: str, status: str) -> None:
        self.calls.append((job, status))
        self.times.append(time.monotonic())

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter(self.calls)


def http_target(seen: Seen, delay_s: float, slack: bool) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        if slack:  # the fallback text: "<emoji> Fine-tuning job <status>: <job id>"
            head, _, job = body["text"].rpartition(": ")
            seen.add(job, head.rsplit(" ", 1)[-1])
        else:
            seen.add(body["job_id"], body["status"])
        await asyncio.sleep(delay_s)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    return app


class Inbox:
    def __init__(self, seen: Seen, delay_s: float) -> None:
        self.seen = seen
        self.delay_s = delay_s

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        text = envelope.content.decode(errors="replace")
        subject = next(line for line in text.splitlines() if line.startswith("Subject:"))
        words = subject.split()  # Subject: [ftjobs] <emoji> <job id> <status>[: model]
        self.seen.add(words[3], words[4].rstrip(":"))
        await asyncio.sleep(self.delay_s)
        return "250 OK"


def job_body(i: int, status: str) -> bytes:
    doc = SUCCEEDED | {"id": f"ftjob-chaos-{i:05d}", "status": status}
    if status != "succeeded":
        doc |= {"finished_at": None, "fine_tuned_model": None, "trained_tokens": None}
    return msgspec.json.encode(doc)


async def main(jobs: int, kills: int, terms: int, delay_s: float) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="ftjobs-chaos-"))
    seen = {"slack": Seen(), "email": Seen(), "pipe": Seen()}
    runners = []
    ports = {}
    for name, slack in (("slack", True), ("pipe", False)):
        runner = web.AppRunner(http_target(seen[name], delay_s, slack))
        await runner.setup()
        ports[name] = free_port()
        await web.TCPSite(runner, "127.0.0.1", ports[name]).start()
        runners.append(runner)
    smtp_port = free_port()
    smtp = Controller(Inbox(seen["email"], delay_s), hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    port = free_port()
    config = write_config(
        tmp / "ftjobs.toml",
        receiver={"port": port, "secrets": [SECRET]},
        worker={"lease_s": 2.0, "block_ms": 100, "grace_s": 5.0},
        log={"level": "info", "format": "json"},
        handlers=[
            {"name": "slack", "type": "slack", "webhook_url": f"http://127.0.0.1:{ports['slack']}/hook"},
            {
                "name": "email",
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp_port,
                "security": "none",
                "from_addr": "ftjobs@example.com",
                "to": ["team@example.com"],
            },
            {"name": "pipe", "type": "http", "url": f"http://127.0.0.1:{ports['pipe']}/hook"},
        ],
    )
    env = base_env(FTJOBS_CONFIG=str(config))
    serial = 0

    def start() -> Proc:
        nonlocal serial
        serial += 1
        proc = Proc(["serve"], tmp, env, f"serve-{serial}")
        wait_for(http_ready(port), 60, "serve")
        return proc

    serve = await asyncio.to_thread(start)
    results: dict[str, int] = {}
    url = f"http://127.0.0.1:{port}/webhooks/openai"
    items = [(f"wh_chaos_{i:05d}_{s}", job_body(i, s)) for i in range(jobs) for s in ("running", "succeeded")]

    async def send() -> None:
        async with aiohttp.ClientSession() as session:
            for n in range(0, len(items), 2):  # a job's two statuses back to back, 16 jobs at once
                pair = items[n : n + 2]
                for webhook_id, body in pair:
                    for _ in range(600):
                        try:
                            async with session.post(url, data=body, headers=signed(body, webhook_id)) as resp:
                                results[webhook_id] = resp.status
                        except aiohttp.ClientError:
                            results[webhook_id] = 599
                        if results[webhook_id] == 200:
                            break
                        await asyncio.sleep(0.05)
                await asyncio.sleep(random.uniform(0, 0.01))

    sending = asyncio.create_task(send())
    faults: list[tuple[str, float]] = []  # (kind, when it happened)
    plan = ["kill"] * kills + ["term"] * terms
    random.shuffle(plan)
    for kind in plan:
        before = sum(len(s.calls) for s in seen.values())
        deadline = time.monotonic() + 60
        while sum(len(s.calls) for s in seen.values()) < before + 30 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        faults.append((kind, time.monotonic()))
        code = await asyncio.to_thread(serve.stop, signal.SIGKILL if kind == "kill" else signal.SIGTERM, 60)
        if kind == "term" and code != 0:
            print(f"serve exited {code} after SIGTERM")
        serve = await asyncio.to_thread(start)
    await sending
    acknowledged = {w for w, status in results.items() if status == 200}
    wanted = {(f"ftjob-chaos-{i:05d}", s) for i in range(jobs) for s in ("running", "succeeded")}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(not wanted <= set(s.counts()) for s in seen.values()):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # every event arrived: one more second for late re-sends to land and be counted
    code = await asyncio.to_thread(serve.stop, signal.SIGTERM, 60)
    smtp.stop()
    for runner in runners:
        await runner.cleanup()
    report: dict[str, Any] = {
        "jobs": jobs,
        "acknowledged": len(acknowledged),
        "faults": [kind for kind, _ in faults],
        "last_exit": code,
    }
    for name, s in seen.items():
        counts = s.counts()
        after: Counter[str] = Counter()  # repeated calls, by the kind of the last stop before them
        done: set[tuple[str, str]] = set()
        for call, at in zip(s.calls, s.times, strict=True):
            if call in done:
                last = [kind for kind, when in faults if when <= at]
                after[last[-1] if last else "none"] += 1
            done.add(call)
        first: dict[str, list[str]] = defaultdict(list)
        for job, status in s.calls:
            if status not in first[job]:
                first[job].append(status)
        report[name] = {
            "lost": len(wanted - set(counts)),
            "twice": sum(c - 1 for c in counts.values()),
            "twice_after": dict(after),
            "out_of_order": sum(1 for order in first.values() if order[:1] == ["succeeded"]),
            "unexpected": sorted(set(counts) - wanted)[:5],
        }
    print(json.dumps(report))
    print(f"logs in {tmp}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs to send, each `running` then `succeeded`")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL restarts of serve during the load")
    parser.add_argument("--terms", type=int, default=3, help="SIGTERM restarts of serve during the load")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each target takes per call")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.jobs, args.kills, args.terms, args.delay)))
