"""Operator commands: look at the queue and the jobs, and deal with dead letters and quarantine.

`ftjobs status`, `jobs`, `job`, `dlq` and `quarantine`; each opens a `runtime.Runtime` on the deployment's
Redis (`REDIS_URL`, or the embedded Valkey `ftjobs serve` runs under `redis.data_dir`) and closes it again.
They never start a server: an empty one started here would only report "0 entries" about nothing.
Every listing takes `--json`; the tables have headers. `dlq` and `quarantine` act on named entries, or with
`--all` on every entry a `deadletters.EntryFilter` matches, read in pages and handled in chunks, with
`Progress` on stderr; `--dry-run` only prints the selection.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any, Final, TypeVar

import msgspec

from processor import embedded, keys, partitions, retention
from processor.deadletters import DeadLetter, EntryFilter, Quarantined, parse_time
from processor.errors import CommandFailed
from processor.humanize import human_time, terminal_safe
from processor.jobstate import Transition
from processor.limits import Guard
from processor.runtime import Runtime, open_runtime, redis_url
from processor.settings import Settings

T = TypeVar("T")

#: An entry id as `keys.ENTRY_ID`, or its milliseconds alone (Redis takes `ms` for `ms-0`).
ENTRY_ID: Final = re.compile(rf"{keys.ENTRY_ID.pattern}|[0-9]{{1,19}}")

#: Entries replayed or dropped per round trip by a bulk action (and between two progress updates).
CHUNK: Final = 100


def with_redis(settings: Settings, work: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run `work(runtime)` against the deployment's Redis; fail (exit 1) when there is none to attach to."""
    if not settings.redis.url and not embedded.is_running(settings.redis.data_dir):
        raise CommandFailed(
            f"no embedded Valkey runs in {settings.redis.data_dir!r} and REDIS_URL is not set: run this where "
            "`ftjobs serve` runs (or point redis.data_dir at its folder), or set REDIS_URL to your Redis"
        )

    async def run(url: str) -> T:
        async with open_runtime(settings, url, quiet=True) as runtime:
            return await work(runtime)

    return asyncio.run(run(redis_url(settings)))


def say(*lines: str) -> None:
    """Print each line with what a sender wrote in it (statuses, event types, errors, bodies) made safe for the
    terminal (`humanize.terminal_safe`): an escape sequence in a job's status must not reach it raw."""
    for line in lines:
        print(terminal_safe(line))


def print_json(value: Any) -> None:
    """One JSON document on stdout (the `--json` form of a listing)."""
    print(msgspec.json.encode(value).decode())


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async def collect(runtime: Runtime) -> dict[str, Any]:
        status = await runtime.streams.status(h.name for h in settings.handlers)
        for spec in settings.handlers:
            status["handlers"][spec.name] |= await Guard(runtime.client, runtime.keys, spec).state()
            held = await partitions.holders(runtime.client, runtime.keys, spec.name)
            status["handlers"][spec.name]["partitions"] = {str(p): who for p, who in sorted(held.items())}
        status["sizes"] = await retention.sizes(runtime.client, runtime.keys)
        return status

    status = with_redis(settings, collect)
    if args.json:
        print_json(status)
        return 0
    sizes, kept = status["sizes"], settings.redis
    print(
        f"events stream: {status['events']} entries in {status['partitions']} partition(s) · "
        f"quarantine: {status['quarantine']}"
    )
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
    print_partitions(status["handlers"], status["partitions"])
    print_workers(status["workers"])
    return 0


def print_partitions(handlers: dict[str, dict[str, Any]], count: int) -> None:
    """Which worker consumes which partitions, per handler (from the partition leases)."""
    for name, row in handlers.items():
        by_worker: dict[str, list[str]] = {}
        for partition, who in row.get("partitions", {}).items():
            by_worker.setdefault(who, []).append(partition)
        free = count - sum(len(ps) for ps in by_worker.values())
        shares = "; ".join(f"{who}: {','.join(ps)}" for who, ps in sorted(by_worker.items()))
        print(f"partitions of {name}: {shares or 'none taken'}" + (f" ({free} not taken)" if free and shares else ""))


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
        say(f"{job_id:<40} {status:<18} {human_time(at)}")
    return 0


def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    timeline: list[Transition] = with_redis(settings, lambda runtime: runtime.jobs.timeline(args.job_id))
    if not timeline:
        raise CommandFailed(f"no status changes recorded for {args.job_id} (`ftjobs jobs` lists the known ones)")
    if args.json:
        print_json(timeline)
        return 0
    say(args.job_id)
    print(f"  {'WHEN':<22} {'CHANGE':<34} {'SOURCE':<12} EVENT")
    for step in timeline:
        when, source = human_time(step.received or step.at), f"via {step.source}"
        if step.skipped:
            say(f"  {when:<22} {step.status:<34} {source:<12} {step.event}  (skipped: {step.skipped})")
            continue
        arrow = f"{step.previous or '(new)'} → {step.status}"
        say(f"  {when:<22} {arrow:<34} {source:<12} {step.event}")
    return 0


class Progress:
    """How far a bulk action is, on stderr: a bar redrawn in place (carriage return, as wide as the terminal)
    when stderr is a terminal; elsewhere a plain `replayed N/M` line at every tenth and at the end, so logs
    stay readable."""

    def __init__(self, total: int, verb: str, stream: IO[str] | None = None) -> None:
        self.total, self.verb, self.done = total, verb, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.step = max(1, total // 10)
        self._next_line = self.step

    def advance(self, count: int) -> None:
        self.done += count
        if self.tty:
            label = f" {self.done}/{self.total} {self.verb}"
            width = max(10, shutil.get_terminal_size().columns - len(label) - 3)
            filled = width * self.done // max(1, self.total)
            self.stream.write(f"\r[{'#' * filled}{'-' * (width - filled)}]{label}")
            if self.done >= self.total:
                self.stream.write("\n")
        elif self.done >= self._next_line or self.done >= self.total:
            self.stream.write(f"{self.verb} {self.done}/{self.total}\n")
            self._next_line = (self.done // self.step + 1) * self.step
        self.stream.flush()


def chunks(items: list[str], size: int = CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def entry_filter(args: argparse.Namespace) -> EntryFilter:
    """The `--job`, `--since`, `--until` and `--error` options as a filter (a bad time: exit 2)."""
    now = time.time()
    try:
        since = parse_time(args.since, now) if args.since else None
        until = parse_time(args.until, now) if args.until else None
    except ValueError as exc:
        raise CommandFailed(f"--since/--until: {exc}", code=2) from None
    chosen = EntryFilter(job=args.job, since=since, until=until, error=args.error)
    if chosen.active and args.ids and not args.all:
        raise CommandFailed(
            "--job, --since, --until and --error choose among all entries: use them with list or --all", 2
        )
    if args.dry_run and args.action not in ("replay", "drop"):
        raise CommandFailed("--dry-run goes with replay or drop", code=2)
    return chosen


def _ids(args: argparse.Namespace) -> list[str]:
    """The entry ids named on the command line (checked: exit 2); with `--all` none are needed."""
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


def print_letters(letters: list[DeadLetter]) -> None:
    print(f"{'ID':<20} {'EVENT':<28} {'JOB':<32} {'ATTEMPTS':>8}  ERROR")
    for letter in letters:
        event = letter.event
        kind, job = (event.type, event.job_id) if event else ("(undecodable record)", "-")
        say(f"{letter.id:<20} {kind:<28} {job:<32} {letter.attempts:>8}  {letter.error[:100]}")


def print_quarantined(items: list[Quarantined]) -> None:
    print(f"{'ID':<20} {'WEBHOOK_ID':<40} ERROR")
    for item in items:
        say(f"{item.id:<20} {item.webhook_id:<40} {item.error[:120]}")


def show_quarantined(item: Quarantined) -> None:
    body = item.body.decode(errors="replace").splitlines()
    say(f"{item.id} webhook_id={item.webhook_id}", f"error: {item.error}", *body)


def _some(ids: list[str]) -> str:
    """New entry ids for a summary line: all of a few, none of many."""
    return f": {' '.join(ids)}" if 0 < len(ids) <= 20 else ""


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    names = [h.name for h in settings.handlers]
    if args.handler not in names:
        raise CommandFailed(f"unknown handler {args.handler!r} (configured: {', '.join(names)})", code=2)
    where = f"{args.handler}'s dead letters"
    chosen = entry_filter(args)
    handler = args.handler

    async def act(runtime: Runtime) -> int:
        dead = runtime.dead_letters
        if args.action == "list" or (args.all and args.dry_run):
            letters = [x async for x in dead.scan(handler) if chosen.matches(x)]
            if args.json:
                print_json(letters)
                return 0
            print_letters(letters)
            if args.action == "list":
                print(f"{len(letters)} dead letter(s) for {handler}" + (" matching" if chosen.active else ""))
            else:
                print(f"would {args.action} {len(letters)} dead letter(s) of {handler} (dry run: nothing changed)")
            return 0
        if args.all:
            ids = []
            async for letter in dead.scan(handler):
                if chosen.matches(letter):
                    ids.append(letter.id)
                    if args.action == "show":
                        print(msgspec.json.format(msgspec.json.encode(letter)).decode())
            found = set(ids)
        else:
            ids = _ids(args)
            letters = await dead.get(handler, ids)
            found = {x.id for x in letters}
            if args.action == "show":
                for letter in letters:
                    print(msgspec.json.format(msgspec.json.encode(letter)).decode())
            elif args.dry_run:
                print_letters(letters)
                print(f"would {args.action} {len(letters)} dead letter(s) of {handler} (dry run: nothing changed)")
                _must_exist(ids, found, where)
                return 0
        if args.action == "replay":
            progress = Progress(len(ids), "replayed") if args.all else None
            new: list[str] = []
            kept = 0
            for chunk in chunks(ids):
                letters = await dead.get(handler, chunk)
                new += await dead.replay_letters(handler, letters)
                kept += sum(1 for x in letters if x.event is None)
                if progress:
                    progress.advance(len(chunk))
            print(f"replayed {len(new)} to {handler}{_some(new)}")
            if kept:
                raise CommandFailed(f"{kept} undecodable dead letter(s) kept (see `show`)")
        elif args.action == "drop":
            if args.all:
                _confirm_drop_all(args, len(ids), f"dead letters of {handler}")
            progress = Progress(len(ids), "dropped") if args.all else None
            dropped = 0
            for chunk in chunks([i for i in ids if i in found]):
                dropped += await dead.drop(handler, chunk)
                if progress:
                    progress.advance(len(chunk))
            print(f"dropped {dropped}")
        _must_exist(ids, found, where)
        return 0

    return with_redis(settings, act)


def cmd_quarantine(args: argparse.Namespace, settings: Settings) -> int:
    chosen = entry_filter(args)
    groups = [h.name for h in settings.handlers]

    async def act(runtime: Runtime) -> int:
        dead = runtime.dead_letters
        if args.action == "list" or (args.all and args.dry_run):
            items = [x async for x in dead.scan_quarantined() if chosen.matches(x)]
            if args.json:
                print_json([{"id": i.id, "webhook_id": i.webhook_id, "error": i.error} for i in items])
                return 0
            print_quarantined(items)
            if args.action == "list":
                print(f"{len(items)} quarantined" + (" matching" if chosen.active else ""))
            else:
                print(f"would {args.action} {len(items)} quarantined (dry run: nothing changed)")
            return 0
        if args.all:
            ids = []
            async for item in dead.scan_quarantined():
                if chosen.matches(item):
                    ids.append(item.id)
                    if args.action == "show":
                        show_quarantined(item)
            present = set(ids)
        else:
            ids = _ids(args)
            items = await dead.get_quarantined(ids)
            present = {i.id for i in items}
            if args.action == "show":
                for item in items:
                    show_quarantined(item)
            elif args.dry_run:
                print_quarantined(items)
                print(f"would {args.action} {len(items)} quarantined (dry run: nothing changed)")
                _must_exist(ids, present, "the quarantine")
                return 0
        if args.action == "replay":
            progress = Progress(len(ids), "replayed") if args.all else None
            failed = []
            for chunk in chunks([i for i in ids if i in present]):
                for entry_id, outcome in await dead.replay_quarantined(chunk, groups):
                    say(f"{entry_id}: {outcome}")
                    if outcome.startswith("still not readable"):
                        failed.append(entry_id)
                if progress:
                    progress.advance(len(chunk))
            if failed:
                raise CommandFailed(f"{len(failed)} still not readable, kept in quarantine: {' '.join(failed)}")
        elif args.action == "drop":
            if args.all:
                _confirm_drop_all(args, len(ids), "quarantined bodies")
            progress = Progress(len(ids), "dropped") if args.all else None
            dropped = 0
            for chunk in chunks([i for i in ids if i in present]):
                dropped += await dead.drop_quarantined(chunk)
                if progress:
                    progress.advance(len(chunk))
            print(f"dropped {dropped}")
        _must_exist(ids, present, "the quarantine")
        return 0

    return with_redis(settings, act)
