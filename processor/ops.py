"""Operator commands: look at the queue and the jobs, and deal with dead letters and quarantine.

`ftjobs status`, `jobs`, `job`, `dlq` and `quarantine`; each opens a `runtime.Runtime` on the deployment's
Redis (`REDIS_URL`, or the embedded Valkey `ftjobs serve` runs under `redis.data_dir`) and closes it again.
They never start a server: an empty one started here would only report "0 entries" about nothing.
Every listing takes `--json`; the tables have headers.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec

from processor import embedded, retention
from processor.errors import CommandFailed
from processor.humanize import human_time
from processor.jobstate import Transition
from processor.limits import Guard
from processor.runtime import Runtime, open_runtime, redis_url
from processor.settings import Settings

T = TypeVar("T")

ENTRY_ID: Final = re.compile(r"\d{1,20}(-\d{1,20})?")


def with_redis(settings: Settings, work: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run `work(runtime)` against the deployment's Redis; fail (exit 1) when there is none to attach to."""
    if not settings.redis.url and not embedded.is_running(settings.redis.data_dir):
        raise CommandFailed(
            f"no embedded Valkey runs in {settings.redis.data_dir!r} and REDIS_URL is not set: run this where "
            "`ftjobs serve` runs (or point redis.data_dir at its folder), or set REDIS_URL to your Redis"
        )

    async def run(url: str) -> T:
        async with open_runtime(settings, url) as runtime:
            return await work(runtime)

    return asyncio.run(run(redis_url(settings)))


def print_json(value: Any) -> None:
    """One JSON document on stdout (the `--json` form of a listing)."""
    print(msgspec.json.encode(value).decode())


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async def collect(runtime: Runtime) -> dict[str, Any]:
        status = await runtime.streams.status(h.name for h in settings.handlers)
        for spec in settings.handlers:
            status["handlers"][spec.name] |= await Guard(runtime.client, runtime.keys, spec).state()
        status["sizes"] = await retention.sizes(runtime.client, runtime.keys)
        return status

    status = with_redis(settings, collect)
    if args.json:
        print_json(status)
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
    if args.json:
        print_json([{"job_id": job_id, "status": status, "at": at} for job_id, status, at in rows])
        return 0
    if not rows:
        print("no jobs seen yet")
        return 0
    print(f"{'JOB':<40} {'STATUS':<18} CHANGED")
    for job_id, status, at in rows:
        print(f"{job_id:<40} {status:<18} {human_time(at)}")
    return 0


def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    timeline: list[Transition] = with_redis(settings, lambda runtime: runtime.jobs.timeline(args.job_id))
    if not timeline:
        raise CommandFailed(f"no status changes recorded for {args.job_id} (`ftjobs jobs` lists the known ones)")
    if args.json:
        print_json(timeline)
        return 0
    print(f"{args.job_id}")
    print(f"  {'WHEN':<22} {'CHANGE':<34} {'SOURCE':<12} EVENT")
    for step in timeline:
        when, source = human_time(step.received or step.at), f"via {step.source}"
        if step.skipped:
            print(f"  {when:<22} {step.status:<34} {source:<12} {step.event}  (skipped: {step.skipped})")
            continue
        arrow = f"{step.previous or '(new)'} → {step.status}"
        print(f"  {when:<22} {arrow:<34} {source:<12} {step.event}")
    return 0


def _ids(args: argparse.Namespace, available: list[str]) -> list[str]:
    """The entry ids the command acts on: all of them with `--all`, else the named ones (checked: exit 2)."""
    if args.all:
        return available
    if not args.ids:
        raise CommandFailed("name entry ids, or use --all", code=2)
    for entry_id in args.ids:
        if not ENTRY_ID.fullmatch(entry_id):
            raise CommandFailed(f"{entry_id!r} is not an entry id (they look like 1700000000000-0; see `list`)", 2)
    return list(args.ids)


def _must_exist(wanted: list[str], found: set[str], where: str) -> None:
    """Exit 1 naming the ids that are not there (after acting on those that are)."""
    missing = [i for i in wanted if i not in found]
    if missing:
        raise CommandFailed(f"no entry {', '.join(missing)} in {where} (`list` shows the ids)")


def _confirm_drop_all(args: argparse.Namespace, count: int, what: str) -> None:
    """`drop --all` asks first: at a terminal it needs a "y"; elsewhere it needs `--yes` (exit 2 without)."""
    if args.yes or not count:
        return
    if not sys.stdin.isatty():
        raise CommandFailed(f"drop --all would delete {count} {what}; not at a terminal, so add --yes", code=2)
    try:
        answer = input(f"drop all {count} {what}? [y/N] ")
    except EOFError:  # Ctrl-D: a no
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandFailed("nothing dropped")


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    names = [h.name for h in settings.handlers]
    if args.handler not in names:
        raise CommandFailed(f"unknown handler {args.handler!r} (configured: {', '.join(names)})", code=2)
    where = f"{args.handler}'s dead letters"

    async def act(runtime: Runtime) -> int:
        dead = runtime.dead_letters
        letters = await dead.letters(args.handler, 10_000)
        if args.action == "list":
            if args.json:
                print_json(letters)
                return 0
            print(f"{'ID':<20} {'EVENT':<28} {'JOB':<32} {'ATTEMPTS':>8}  ERROR")
            for letter in letters:
                event = letter.event
                kind, job = (event.type, event.job_id) if event else ("(undecodable record)", "-")
                print(f"{letter.id:<20} {kind:<28} {job:<32} {letter.attempts:>8}  {letter.error[:100]}")
            print(f"{len(letters)} dead letter(s) for {args.handler}")
            return 0
        ids = _ids(args, [x.id for x in letters])
        found = await dead.get(args.handler, ids)
        if args.action == "show":
            for letter in found:
                print(msgspec.json.format(msgspec.json.encode(letter)).decode())
        elif args.action == "replay":
            new = await dead.replay(args.handler, [x.id for x in found])
            print(f"replayed {len(new)} to {args.handler}: {' '.join(new)}")
            if len(new) < len(found):
                raise CommandFailed(f"{len(found) - len(new)} undecodable dead letter(s) kept (see `show`)")
        else:
            if args.all:
                _confirm_drop_all(args, len(ids), f"dead letters of {args.handler}")
            print(f"dropped {await dead.drop(args.handler, [x.id for x in found])}")
        _must_exist(ids, {x.id for x in found}, where)
        return 0

    return with_redis(settings, act)


def cmd_quarantine(args: argparse.Namespace, settings: Settings) -> int:
    async def act(runtime: Runtime) -> int:
        dead = runtime.dead_letters
        items = await dead.quarantined(10_000)
        if args.action == "list":
            if args.json:
                print_json([{"id": i.id, "webhook_id": i.webhook_id, "error": i.error} for i in items])
                return 0
            print(f"{'ID':<20} {'WEBHOOK_ID':<40} ERROR")
            for item in items:
                print(f"{item.id:<20} {item.webhook_id:<40} {item.error[:120]}")
            print(f"{len(items)} quarantined")
            return 0
        ids = _ids(args, [i.id for i in items])
        present = {i.id for i in items} & set(ids)
        if args.action == "show":
            for item in (i for i in items if i.id in present):
                print(f"{item.id} webhook_id={item.webhook_id}\nerror: {item.error}")
                print(item.body.decode(errors="replace"))
        elif args.action == "replay":
            outcomes = await dead.replay_quarantined(ids, [h.name for h in settings.handlers])
            for entry_id, outcome in outcomes:
                print(f"{entry_id}: {outcome}")
            failed = [entry_id for entry_id, outcome in outcomes if outcome.startswith("still not readable")]
            if failed:
                raise CommandFailed(f"{len(failed)} still not readable, kept in quarantine: {' '.join(failed)}")
        else:
            if args.all:
                _confirm_drop_all(args, len(ids), "quarantined bodies")
            print(f"dropped {await dead.drop_quarantined([i for i in ids if i in present])}")
        _must_exist(ids, present, "the quarantine")
        return 0

    return with_redis(settings, act)
