"""Process wiring for the long-running commands: which Redis, which secret, and what runs in the loop.

`serve` = receiver + workers in one process (and the embedded Valkey when no URL is set);
`receive` and `work` are the two halves, for running several of each against one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import structlog
from aiohttp import web
from redis.exceptions import RedisError, ResponseError

from processor import embedded, registry, signatures
from processor.errors import ConfigError
from processor.handler import Handler, HandlerContext, NeedsClose, NeedsSetup
from processor.httpserver import SERVER_OPTIONS
from processor.jobstate import JobState, Preparer
from processor.liveness import health_app
from processor.logs import redact
from processor.openai import OpenAIClient
from processor.poller import Poller
from processor.receiver import create_app
from processor.settings import Settings
from processor.stream import Keys, Streams, connect, text
from processor.worker import Worker, WorkerFailed

log = structlog.get_logger()

LOCAL_SECRET_FILE: Final = "webhook-secret"
T = TypeVar("T")


def local_secret(settings: Settings, *, create: bool) -> str | None:
    """The secret kept under the data directory for a zero-config local setup (created on first `serve`)."""
    path = Path(settings.redis.data_dir) / LOCAL_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(signatures.generate_secret() + "\n")
    return path.read_text().strip()


def with_secrets(settings: Settings, *, create_local: bool) -> Settings:
    """Settings whose receiver has a secret: the configured ones, else the local one (with a warning)."""
    receiver = settings.receiver
    if receiver.secrets or not receiver.verify_signatures:
        return settings
    secret = local_secret(settings, create=create_local)
    if secret is None:
        raise ConfigError("no webhook secret: set OPENAI_WEBHOOK_SECRET (or receiver.secrets) to your whsec_ secret")
    log.warning(
        "using_local_webhook_secret",
        file=str(Path(settings.redis.data_dir) / LOCAL_SECRET_FILE),
        hint="set OPENAI_WEBHOOK_SECRET to the endpoint's signing secret before pointing OpenAI here",
    )
    return _replace_secrets(settings, [secret])


def _replace_secrets(settings: Settings, secrets: list[str]) -> Settings:
    return msgspec.structs.replace(settings, receiver=msgspec.structs.replace(settings.receiver, secrets=secrets))


def redis_url(settings: Settings) -> str:
    """The configured URL, or the socket of an embedded server already running on the data directory."""
    if settings.redis.url:
        return settings.redis.url
    if embedded.is_running(settings.redis.data_dir):
        return embedded.url_for(settings.redis.data_dir)
    raise ConfigError(
        "no Redis to connect to: set REDIS_URL (or redis.url), or start `ftjobs serve`, which runs an embedded one"
    )


@contextlib.contextmanager
def redis_for(settings: Settings, *, start_embedded: bool) -> Iterator[str]:
    """Yield a Redis URL, starting (and afterwards stopping) an embedded Valkey when none is configured."""
    if settings.redis.url or embedded.is_running(settings.redis.data_dir) or not start_embedded:
        yield redis_url(settings)
        return
    server = embedded.EmbeddedValkey(settings.redis.data_dir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


async def check_persistence(url: str) -> None:
    """Warn when an external server would lose acknowledged events on a crash (AOF and RDB both off)."""
    client = connect(url)
    try:
        config: dict[Any, Any] = await client.config_get("appendonly")
        config |= await client.config_get("save")
    except ResponseError:  # managed services often refuse CONFIG
        log.warning("redis_persistence_unknown", url=redact(url), hint="make sure AOF is on (appendfsync always)")
        return
    except (RedisError, OSError) as exc:
        log.warning("redis_unavailable_at_start", url=redact(url), error=type(exc).__name__)
        return
    finally:
        await client.aclose()
    values = {text(k): text(v) for k, v in config.items()}
    appendonly, save = values.get("appendonly", ""), values.get("save", "")
    if appendonly != "yes":
        log.warning(
            "redis_persistence_off" if not save else "redis_aof_off",
            url=redact(url),
            appendonly=appendonly,
            save=save or "(none)",
            hint="acknowledged events can be lost on a Redis crash; enable appendonly yes, appendfsync always",
        )


def warn_if_insecure(settings: Settings) -> None:
    if not settings.receiver.verify_signatures:
        log.warning(
            "SIGNATURE_VERIFICATION_DISABLED",
            hint="anyone who can reach this port can inject events; for local development only",
        )


def build_handlers(settings: Settings) -> list[Handler]:
    return registry.build(settings.handlers)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, url: str, handlers: list[Handler], *, with_poller: bool = False
) -> AsyncIterator[Worker]:
    """Set up handlers, run a `Worker` (and the poller, when asked and configured) until exit, then stop."""
    block_s = settings.worker.block_ms / 1000
    client = connect(url, socket_timeout=block_s + 10)
    keys = Keys(settings.redis.prefix)
    for handler, spec in zip(handlers, settings.handlers, strict=True):
        if isinstance(handler, NeedsSetup):
            prefix = keys.handler_state(handler.name)
            await handler.setup(HandlerContext(redis=client, key_prefix=prefix, timeout_s=spec.timeout_s))
    api = OpenAIClient(settings.openai) if settings.openai.api_key and settings.openai.hydrate else None
    if api is not None:
        await api.__aenter__()
    else:
        log.info("hydration_off", reason="no OPENAI_API_KEY" if settings.openai.hydrate else "openai.hydrate = false")
    preparer = Preparer(JobState(client, keys, settings.redis.retention_s), api, settings.openai.hydrate_retry_s)
    tasks: dict[str, Callable[[], Awaitable[None]]] = {}
    if with_poller and settings.openai.poll_interval_s > 0:
        if api is None:
            log.warning("poller_off", reason="set OPENAI_API_KEY (and openai.hydrate) to poll")
        else:
            tasks["poller"] = Poller(settings, Streams(client, keys), api).run
    worker = Worker(
        handlers,
        settings.handlers,
        Streams(client, keys),
        settings.worker,
        settings.redis,
        preparer,
        tasks=tasks,
    )
    task = asyncio.create_task(worker.run(), name="worker")
    try:
        yield worker
    finally:
        worker.stop()
        try:
            await task
        finally:
            for handler in handlers:
                if isinstance(handler, NeedsClose):
                    await handler.close()
            if api is not None:
                await api.close()
            await client.aclose()


#: Why the workers of a `serve` process died for good (empty while they did not).
WORKER_FAILURE: Final = web.AppKey("worker_failure", list[str])


def serve_app(settings: Settings, url: str, *, with_worker: bool) -> web.Application:
    """The receiver app, with the workers attached to its lifecycle when `with_worker`. When they die for
    good, the process stops (SIGTERM to itself) and `app[WORKER_FAILURE]` says why, for a non-zero exit."""
    app = create_app(settings, url)
    app[WORKER_FAILURE] = []
    if with_worker:
        handlers = build_handlers(settings)

        async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
            try:
                async with running_worker(settings, url, handlers, with_poller=True) as worker:
                    watcher = asyncio.create_task(_stop_process_when_failed(worker))
                    yield
                    watcher.cancel()
            except WorkerFailed as exc:
                app[WORKER_FAILURE].append(str(exc))

        app.cleanup_ctx.append(worker_ctx)
    if settings.dashboard.token:
        from processor import dashboard  # imported only when served: `ftjobs --help` stays fast

        dashboard.mount(app, settings, url)
    return app


async def _stop_process_when_failed(worker: Worker) -> None:
    await worker.finished.wait()
    if worker.failure:
        log.critical("worker_exiting", reason=worker.failure)
        signal.raise_signal(signal.SIGTERM)


def _stop_on_signals() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def work_until_signal(settings: Settings, url: str, *, health_port: int | None = None) -> int:
    """`ftjobs work`: run the workers until SIGTERM/SIGINT, then stop gracefully; the exit code (1 when a
    task of the worker died for good). With `health_port`, serve `GET /healthz` there meanwhile."""
    handlers = build_handlers(settings)
    stop = _stop_on_signals()
    try:
        async with running_worker(settings, url, handlers) as worker, _health_server(worker, health_port):
            stopping = asyncio.create_task(stop.wait())
            finished = asyncio.create_task(worker.finished.wait())
            await asyncio.wait([stopping, finished], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            finished.cancel()
            if stop.is_set():
                log.info("shutdown_requested", grace_s=settings.worker.grace_s)
    except WorkerFailed as exc:
        log.critical("worker_exiting", reason=str(exc))
        return 1
    return 0


@contextlib.asynccontextmanager
async def _health_server(worker: Worker, port: int | None) -> AsyncIterator[None]:
    """Serve the worker's health endpoint on `port` (all interfaces) while the block runs; nothing when None."""
    if port is None:
        yield
        return
    runner = web.AppRunner(health_app(worker.progress, worker.consumer, lambda: worker.failure), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    log.info("health_endpoint", port=port, path="/healthz", stuck_after_s=worker.progress.stuck_after_s)
    try:
        yield
    finally:
        await runner.cleanup()


async def poll_until_signal(settings: Settings, url: str, *, once: bool) -> int:
    """`ftjobs poll`: poll the API (once, or every `poll_interval_s` until SIGTERM/SIGINT)."""
    if not settings.openai.api_key:
        raise ConfigError("polling needs an API key: set OPENAI_API_KEY (or openai.api_key)")
    client = connect(url)
    try:
        async with OpenAIClient(settings.openai) as api:
            poller = Poller(settings, Streams(client, Keys(settings.redis.prefix)), api)
            if once:
                emitted = await poller.poll_once()
                print(f"enqueued {emitted} status change(s)")
                return 0
            if settings.openai.poll_interval_s <= 0:
                raise ConfigError("openai.poll_interval_s must be > 0 to poll continuously (or use --once)")
            stop = _stop_on_signals()
            task = asyncio.create_task(poller.run())
            await stop.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return 0
    finally:
        await client.aclose()


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop: uvloop's when it is installed (faster I/O), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on `new_loop()`."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


def run_http(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve `app` until SIGTERM/SIGINT (aiohttp then runs the app's cleanup: workers stop gracefully).

    The server options (no decompression, timeouts, header limits) are the ones `create_app` put on the app.
    """
    web.run_app(
        app,
        host=host,
        port=port,
        print=None,
        access_log=None,
        loop=new_loop(),
        reuse_port=reuse_port,
        **app[SERVER_OPTIONS],
    )


def run_receivers(count: int, make_app: Callable[[], web.Application], host: str, port: int) -> None:
    """`count` receiver processes on one port (SO_REUSEPORT: the kernel spreads connections across them).

    The children are forked before any event loop exists; each builds its own app and Redis connections.
    On SIGTERM the parent stops serving, then asks each child to stop and waits for it.
    """
    if count <= 1:
        run_http(make_app(), host, port)
        return
    children: list[int] = []
    for _ in range(count - 1):
        pid = os.fork()
        if pid == 0:  # child: serve until told to stop, then leave without running the parent's cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
            try:
                run_http(make_app(), host, port, reuse_port=True)
            finally:
                os._exit(0)
        children.append(pid)
    try:
        run_http(make_app(), host, port, reuse_port=True)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
