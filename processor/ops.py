"""Operator commands: look at the queue and the jobs, and deal with dead letters and quarantine.

`ftjobs status`, `jobs`, `job`, `dlq` and `quarantine`; each opens a `runtime.Runtime` (starting the
embedded Valkey for the duration when none is running) and closes it again.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from processor import retention
from processor.humanize import human_time
from processor.jobstate import Transition
from processor.limits import Guard
from processor.runtime import Runtime, open_runtime, redis_for
from processor.settings import Settings

T = TypeVar("T")


def with_redis(settings: Settings, work: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run `work(runtime)` against the deployment's Redis (the embedded one is started if needed)."""

    async def run(url: str) -> T:
        async with open_runtime(settings, url) as runtime:
            return await work(runtime)

    with redis_for(settings, start_embedded=True) as url:
        return asyncio.run(run(url))


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async def collect(runtime: Runtime) -> dict[str, Any]:
        status = await runtime.streams.status(h.name for h in settings.handlers)
        for spec in settings.handlers:
            status["handlers"][spec.name] |= await Guard(runtime.client, runtime.keys, spec).state()
        status["sizes"] = await retention.sizes(runtime.client, runtime.keys, [h.name for h in settings.handlers])
        return status

    status = with_redis(settings, collect)
    if args.json:
        print(msgspec.json.encode(status).decode())
        return 0
    sizes, kept = status["sizes"], settings.redis
    print(f"events stream: {status['events']} entries · quarantine: {status['quarantine']}")
    print(
        f"kept: {sizes['jobs']} jobs tracked · server memory {sizes['used_memory_bytes'] / 2**20:.1f} MiB · "
        f"retention {kept.retention_s // 3600} h, dead letters {kept.dead_letter_retention_s // 3600} h "
        f"(at most {kept.max_dead_letters} per stream)"
    )
    print(f"{'handler':<24} {'lag':>8} {'pending':>8} {'retrying':>9} {'dead':>6}  guards")
    for name, row in status["handlers"].items():
        lag = "-" if row["lag"] is None else row["lag"]
        guards = ", ".join(f"{k}={row[k]}" for k in ("circuit", "consecutive_failures", "rate") if k in row)
        print(f"{name:<24} {lag!s:>8} {row['pending']:>8} {row['retrying']:>9} {row['dead_letters']:>6}  {guards}")
    print_workers(status["workers"])
    return 0


def print_workers(workers: list[dict[str, str]]) -> None:
    """The live workers (their heartbeats): consumer, host, pid, handlers and how long ago each last looped."""
    print(f"workers: {len(workers)} live" + ("" if workers else " (none has a heartbeat: is `ftjobs work` running?)"))
    now = time.time()
    for worker in workers:
        ago = now - float(worker.get("last_loop") or now)
        stuck = f"  STUCK: {worker['stuck']}" if worker.get("stuck") else ""
        print(
            f"  {worker.get('consumer', '?'):<40} host={worker.get('host', '?')} pid={worker.get('pid', '?')} "
            f"handlers={worker.get('handlers', '')} last loop {ago:.1f}s ago{stuck}"
        )


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    rows = with_redis(settings, lambda runtime: runtime.jobs.recent(args.limit))
    if not rows:
        print("no jobs seen yet")
    for job_id, status, at in rows:
        print(f"{job_id:<40} {status:<18} {human_time(at)}")
    return 0


def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    timeline: list[Transition] = with_redis(settings, lambda runtime: runtime.jobs.timeline(args.job_id))
    if not timeline:
        print(f"no status changes recorded for {args.job_id}")
        return 1
    print(f"{args.job_id}")
    for step in timeline:
        if step.skipped:
            print(
                f"  {human_time(step.received or step.at):<22} {step.status:<34} via {step.source:<8} {step.event}"
                f"  (skipped: {step.skipped})"
            )
            continue
        arrow = f"{step.previous or '(new)'} → {step.status}"
        print(f"  {human_time(step.received or step.at):<22} {arrow:<34} via {step.source:<8} {step.event}")
    return 0


def _ids(args: argparse.Namespace, available: list[str]) -> list[str]:
    if args.all:
        return available
    if not args.ids:
        raise SystemExit("ftjobs: name entry ids, or use --all")
    return list(args.ids)


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    names = [h.name for h in settings.handlers]
    if args.handler not in names:
        raise SystemExit(f"ftjobs: unknown handler {args.handler!r} (configured: {', '.join(names)})")

    async def act(runtime: Runtime) -> int:
        dead = runtime.dead_letters
        letters = await dead.letters(args.handler, 10_000)
        if args.action == "list":
            for letter in letters:
                what = f"{letter.event.type} {letter.event.job_id}" if letter.event else "(undecodable record)"
                print(f"{letter.id}  {what}  attempts={letter.attempts}  {letter.error[:100]}")
            print(f"{len(letters)} dead letter(s) for {args.handler}")
        elif args.action == "show":
            for letter in await dead.get(args.handler, _ids(args, [x.id for x in letters])):
                print(msgspec.json.format(msgspec.json.encode(letter)).decode())
        elif args.action == "replay":
            new = await dead.replay(args.handler, _ids(args, [x.id for x in letters]))
            print(f"replayed {len(new)} to {args.handler}: {' '.join(new)}")
        else:
            print(f"dropped {await dead.drop(args.handler, _ids(args, [x.id for x in letters]))}")
        return 0

    return with_redis(settings, act)


def cmd_quarantine(args: argparse.Namespace, settings: Settings) -> int:
    async def act(runtime: Runtime) -> int:
        dead = runtime.dead_letters
        items = await dead.quarantined(10_000)
        if args.action == "list":
            for item in items:
                print(f"{item.id}  webhook_id={item.webhook_id}  {item.error[:120]}")
            print(f"{len(items)} quarantined")
        elif args.action == "show":
            wanted = set(_ids(args, [i.id for i in items]))
            for item in (i for i in items if i.id in wanted):
                print(f"{item.id} webhook_id={item.webhook_id}\nerror: {item.error}")
                print(item.body.decode(errors="replace"))
        elif args.action == "replay":
            chosen = _ids(args, [i.id for i in items])
            for entry_id, outcome in await dead.replay_quarantined(chosen, [h.name for h in settings.handlers]):
                print(f"{entry_id}: {outcome}")
        else:
            print(f"dropped {await dead.drop_quarantined(_ids(args, [i.id for i in items]))}")
        return 0

    return with_redis(settings, act)
