"""`ftjobs` — the command line. Each subcommand is a thin wrapper around the modules that do the work.

Exit codes: 0 success, 1 the operation failed (Redis unreachable, a port in use, an unknown entry id, the API
refused the key, `send` got a non-2xx), 2 bad configuration or usage. An expected failure is one line on
stderr saying what failed and what to do, never a traceback.

The heavy modules (aiohttp, redis, the service and the dashboard) are imported inside the commands, so
`ftjobs --help` and the operator commands start quickly.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from processor import __version__
from processor.errors import CommandFailed, ConfigError

if TYPE_CHECKING:
    from processor.settings import Settings

Command = Callable[[argparse.Namespace, "Settings"], int]


def _ops(name: str) -> Command:
    """The operator command `name` of `processor.ops`, imported only when it runs."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from processor import ops

        command: Command = getattr(ops, name)
        return command(args, settings)

    return run


def _port(text: str) -> int:
    """A port given on the command line: 1-65535, as in the settings (0 would fall back to the configured one)."""
    return _ranged(text, 1, 65535)


#: The most a count on the command line may be: Redis refuses a range end beyond 64 bits (`jobs --limit
#: 99999999999999999999` ended in a traceback), and no count means anything near this.
MAX_COUNT: Final = 1_000_000


def _count(text: str) -> int:
    """A count given on the command line (`--workers`, `--limit`): 1 to `MAX_COUNT`."""
    return _ranged(text, 1, MAX_COUNT)


def _ranged(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is not in {low}-{high}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftjobs",
        description="Receive fine-tuning job webhooks, queue them durably on Redis streams, dispatch to handlers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config_help = "TOML settings file (default: $FTJOBS_CONFIG, else built-in defaults)"
    parser.add_argument("--config", "-c", metavar="FILE", help=config_help)
    # --config is accepted after the subcommand too (`ftjobs serve -c ftjobs.toml`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, func: Command) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    for name, help_, func in (
        (
            "serve",
            "receiver and workers in one process (embedded Valkey when no Redis URL is set)",
            cmd_serve,
        ),
        ("receive", "only the HTTP receiver (run several behind a load balancer)", cmd_receive),
    ):
        p = add(name, help_, func)
        p.add_argument("--host", help="address to listen on (default: receiver.host, 0.0.0.0)")
        p.add_argument("--port", type=_port, help="port to listen on (default: receiver.port, 8080)")
    p.add_argument(
        "--workers", type=_count, default=1, metavar="N", help="N receiver processes sharing the port (SO_REUSEPORT)"
    )
    p = add("work", "only the workers: deliver queued events to the configured handlers", cmd_work)
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on this port, on receiver.metrics_host (default 127.0.0.1)",
    )
    p.add_argument(
        "--health-port",
        type=_port,
        metavar="PORT",
        help="serve GET /healthz on this port: 503 when a handler loop is stuck (worker.stuck_after_s)",
    )
    p = add("check-config", "validate the settings and handlers, and print what would run", cmd_check_config)
    p.add_argument("--event", metavar="FILE", help="a job or webhook JSON file: say which handlers it would reach")
    p = add("poll", "poll the OpenAI API for job status changes (queued, running, ...) and enqueue them", cmd_poll)
    p.add_argument("--once", action="store_true", help="poll once and exit (default: every openai.poll_interval_s)")
    p = add("jobs", "recently changed jobs with their latest status", _ops("cmd_jobs"))
    p.add_argument("--limit", type=_count, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("job", "one job's timeline of status changes and where each came from", _ops("cmd_job"))
    p.add_argument("job_id", help="the fine-tuning job id (ftjob-...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, help_, ops_command in (
        ("dlq", "a handler's dead letters: list, show, replay (to that handler only) or drop", _ops("cmd_dlq")),
        (
            "quarantine",
            "signed bodies that did not decode: list, show, replay (decode again) or drop",
            _ops("cmd_quarantine"),
        ),
    ):
        p = add(name, help_, ops_command)
        p.add_argument("action", choices=["list", "show", "replay", "drop"])
        if name == "dlq":
            p.add_argument("handler", help="the handler's name")
        p.add_argument("ids", nargs="*", help="entry ids (for show, replay, drop)")
        p.add_argument("--all", action="store_true", help="show, replay or drop every entry (that the filters match)")
        p.add_argument("--yes", "-y", action="store_true", help="drop --all without asking")
        p.add_argument("--json", action="store_true", help="list: print JSON instead of a table")
        p.add_argument("--dry-run", action="store_true", help="replay, drop: print what would be done, change nothing")
        filters = p.add_argument_group("filters (with list or --all; all given must match)")
        filters.add_argument("--job", metavar="JOB_ID", help="only entries about this job")
        filters.add_argument(
            "--since", metavar="TIME", help="failed (or arrived) at or after TIME: ISO-8601 or 2h, 30m, 1d"
        )
        filters.add_argument(
            "--until", metavar="TIME", help="failed (or arrived) at or before TIME: ISO-8601 or 2h, 30m, 1d"
        )
        filters.add_argument("--error", metavar="TEXT", help="the recorded error contains TEXT (ignoring case)")
    p = add("status", "stream length and, per handler, lag, pending, retrying and dead letters", _ops("cmd_status"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("send", "sign a sample fine-tuning event with the configured secret and POST it", cmd_send)
    p.add_argument("--url", help="where to post (default: http://<receiver.host>:<receiver.port><receiver.path>)")
    p.add_argument("--status", default="succeeded", help="job status of the sample (default: succeeded)")
    p.add_argument("--thin", action="store_true", help="send OpenAI's thin envelope (only the job id) instead")
    p.add_argument("--job-id", help="job id to use (default: the sample's)")
    p.add_argument("--job", metavar="FILE", help="a FineTuningJob JSON file to send instead of the built-in sample")
    p.add_argument("--webhook-id", help="webhook-id header (default: a new one; repeat one to test dedupe)")
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a metadata pair (repeatable)",
    )
    p = sub.add_parser(
        "completion",
        help='print a shell completion script (eval "$(ftjobs completion bash)")',
        description="Print a completion script for bash, zsh or fish, generated from this command line.",
    )
    p.add_argument("shell", choices=["bash", "zsh", "fish"])
    p = add("dashboard", "serve the web dashboard alone (at /ui/; needs [dashboard] token off loopback)", cmd_dashboard)
    p.add_argument("--host", help="address to listen on (default: dashboard.host, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port to listen on (default: dashboard.port, 8081)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ftjobs` console script and `python -m processor`."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here (`--help` too), where a closed pipe is answered, not at the interpreter's exit
    except BrokenPipeError:
        # The reader of our output left (`ftjobs dlq show ... | head`): end quietly, like any shell tool, rather
        # than with a traceback; stdout goes to /dev/null so the interpreter's last flush raises nothing either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # `--help` and `--version` exit here, before the imports below
    if args.command == "completion":  # needs no settings: works even where the configuration is broken
        from processor import completion

        print(completion.script(args.shell, parser), end="")
        return 0
    from processor import logs, registry
    from processor.settings import Settings

    try:
        settings = Settings.load(args.config)
        registry.use_local_modules(settings.source)
        logs.configure(settings.log.level, settings.log.format)
        result: int = args.func(args, settings)
        return result
    except ConfigError as exc:
        print(f"ftjobs: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        failure = expected_failure(exc)
        if failure is None:
            raise
        print(f"ftjobs {args.command}: {failure[1]}", file=sys.stderr)
        return failure[0]


def expected_failure(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line saying what failed and what to do) for a failure a user can meet; None for a bug."""
    if isinstance(exc, CommandFailed):
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return 1, f"{exc.strerror or exc}: another process listens there; stop it or choose another --port"
    if "redis" in sys.modules:  # only a command that used Redis can raise its errors
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            return 1, f"Redis is unreachable ({exc}); is it running? Check REDIS_URL (or redis.url)"
    if "processor.openai" in sys.modules:
        from processor.openai import OpenAIAuthError, OpenAIError

        if isinstance(exc, OpenAIAuthError):
            return 1, f"{exc}; check OPENAI_API_KEY (or openai.api_key)"
        if isinstance(exc, OpenAIError):
            return 1, f"{exc}"
    return None


def _listen(args: argparse.Namespace, settings: Settings) -> tuple[str, int]:
    return args.host or settings.receiver.host, args.port or settings.receiver.port


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from processor import localsecret, registry, runtime, service

    settings = localsecret.with_secrets(settings, create_local=True)
    handlers = registry.build(settings.handlers)  # fail on a bad handler config before anything starts
    localsecret.warn_if_insecure(settings)
    host, port = _listen(args, settings)
    with runtime.redis_for(settings, start_embedded=True) as (url, server):
        if settings.redis.url:
            asyncio.run(runtime.check_persistence(url, wait_aof=settings.redis.wait_aof))
        app = service.serve_app(settings, url, handlers=handlers, embedded=server)
        service.run_http(app, host, port)
    return 1 if app[service.SERVE_FAILURE] else 0


def cmd_receive(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from processor import localsecret, runtime, service

    settings = localsecret.with_secrets(settings, create_local=False)
    localsecret.warn_if_insecure(settings)
    url = runtime.redis_url(settings)
    if settings.redis.url:
        asyncio.run(runtime.check_persistence(url, wait_aof=settings.redis.wait_aof))
    host, port = _listen(args, settings)
    service.run_receivers(args.workers, lambda: service.serve_app(settings, url), host, port)
    return 0


def cmd_work(args: argparse.Namespace, settings: Settings) -> int:
    from processor import registry, runtime, service

    handlers = registry.build(settings.handlers)
    url = runtime.redis_url(settings)
    return service.run_async(
        service.work_until_signal(settings, url, handlers, health_port=args.health_port, metrics_port=args.metrics_port)
    )


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    import structlog

    from processor import dashboard, runtime, service

    host, port = args.host or settings.dashboard.host, args.port or settings.dashboard.port
    settings = dashboard.with_token(settings, host)
    url = runtime.redis_url(settings)
    structlog.get_logger().info("dashboard_listening", url=f"http://{host}:{port}/ui/")
    service.run_http(dashboard.standalone_app(settings, url), host, port)
    return 0


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    import msgspec

    from processor import registry, signatures

    registry.build(settings.handlers)
    for secret in settings.receiver.secrets:  # checked before anything is said to be OK
        signatures.parse_secret(secret)
    print(f"config: {settings.source or '(defaults)'} — OK")
    print(
        f"receiver: {settings.receiver.host}:{settings.receiver.port}{settings.receiver.path}, "
        f"{len(settings.receiver.secrets)} secret(s), signatures "
        f"{'required' if settings.receiver.verify_signatures else 'NOT VERIFIED (development only)'}"
    )
    from processor import logs

    redis_at = (
        logs.redact(settings.redis.url) if settings.redis.url else f"embedded Valkey in {settings.redis.data_dir}"
    )
    print(f"redis: {redis_at}")
    for spec in settings.handlers:
        when = msgspec.json.encode(spec.when).decode()
        print(
            f"handler {spec.name}: type={spec.type} when={when} max_attempts={spec.max_attempts} "
            f"timeout_s={spec.timeout_s}"
        )
    if args.event:
        explain_routing(args.event, settings)
    return 0


def explain_routing(path: str, settings: Settings) -> None:
    """Print, for a sample event file, which handlers it would reach and why the others would skip it."""
    import msgspec

    from processor.models import Event, decode_body

    try:
        with open(path, "rb") as fh:
            body = decode_body(fh.read())
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"--event {path}: {exc}") from None
    event = Event.from_body(body, webhook_id="wh_check_config", received_at=time.time())
    print(f"event: {event.type} for {event.job_id}" + (" (thin: no job until hydrated)" if event.job is None else ""))
    for spec in settings.handlers:
        why = spec.when.mismatch(event)
        print(f"  {'→' if not why else '✗'} {spec.name}: {'would receive it' if not why else 'skips it: ' + why}")


def cmd_poll(args: argparse.Namespace, settings: Settings) -> int:
    from processor import runtime, service

    return service.run_async(service.poll_until_signal(settings, runtime.redis_url(settings), once=args.once))


def default_send_url(settings: Settings) -> str:
    """Where `send` posts without `--url`: the configured receiver (`receiver.host`, `.port`, `.path`); a
    wildcard host (0.0.0.0, ::, empty) is reached on loopback. A port given only as `serve --port` is not
    known here: pass `--url` then."""
    host = settings.receiver.host
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.receiver.port}{settings.receiver.path}"


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    import aiohttp
    import msgspec

    from processor import localsecret, signatures
    from processor.models import Envelope, EventData, decode_job

    secrets = settings.receiver.secrets or [s for s in [localsecret.local_secret(settings, create=False)] if s]
    if not secrets:
        raise ConfigError("no webhook secret to sign with: set OPENAI_WEBHOOK_SECRET (or run `ftjobs serve` once)")
    if args.job:
        try:
            with open(args.job, "rb") as fh:
                job = decode_job(fh.read())
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(f"--job {args.job}: {exc}") from None
    else:
        from processor.models import sample_job

        job = sample_job(args.status)
    changes: dict[str, Any] = {}
    if args.job_id:
        changes["id"] = args.job_id
    if args.metadata:
        pairs = dict(item.split("=", 1) for item in args.metadata if "=" in item)
        changes["metadata"] = {**(job.metadata or {}), **pairs}
    job = msgspec.structs.replace(job, **changes)
    if args.thin:
        envelope = Envelope(
            id=f"evt_{uuid.uuid4().hex}", type=job.event_type, created_at=int(time.time()), data=EventData(job.id)
        )
        body = msgspec.json.encode(envelope)
    else:
        body = msgspec.json.encode(job)
    webhook_id = args.webhook_id or f"wh_{uuid.uuid4().hex}"
    headers = signatures.signed_headers([signatures.parse_secret(secrets[0])], webhook_id, body)
    headers["content-type"] = "application/json"
    url = args.url or default_send_url(settings)

    async def post() -> tuple[int, str]:
        # Not following redirects: they would carry the signed request somewhere else.
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers=headers, allow_redirects=False) as resp,
        ):
            return resp.status, await resp.text()

    try:
        status, text = asyncio.run(post())
    except aiohttp.ClientError as exc:
        print(f"ftjobs send: could not reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'thin' if args.thin else 'full'} {job.event_type} for {job.id} → {url}: {status} {text}")
    return 0 if 200 <= status < 300 else 1


__all__ = ["main"]
