"""Process lifecycle for the long-running commands: the event loop, signals, and the processes that run.

`serve` = receiver + workers in one process (and the embedded Valkey when no URL is set);
`receive` and `work` are the two halves, for running several of each against one Redis. What runs is built
by `runtime` (the composition root); this module starts it, stops it on SIGTERM/SIGINT, and forks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final, TypeVar

import structlog
from aiohttp import web

from processor import gauges, metrics
from processor.embedded import EmbeddedValkey
from processor.errors import ConfigError
from processor.handler import Handler
from processor.httpserver import SERVER_OPTIONS
from processor.liveness import health_app
from processor.receiver import create_app
from processor.runtime import open_runtime, running_worker
from processor.settings import Settings
from processor.worker import Worker, WorkerFailed

log = structlog.get_logger()

T = TypeVar("T")


#: Why the workers of a `serve` process died for good (empty while they did not).
SERVE_FAILURE: Final = web.AppKey("serve_failure", list[str])
#: Set once the app began to shut down (SIGTERM): a failure then is recorded, not signalled again.
SHUTTING_DOWN: Final = web.AppKey("shutting_down", asyncio.Event)


def serve_app(
    settings: Settings,
    url: str,
    *,
    handlers: list[Handler] | None = None,
    embedded: EmbeddedValkey | None = None,
) -> web.Application:
    """The receiver app, with workers for `handlers` attached to its lifecycle when given, and the `embedded`
    Valkey it runs on kept alive (started again when it dies). When the workers die for good, or the server
    does not come back, the process stops (SIGTERM to itself) and `app[SERVE_FAILURE]` says why, for a
    non-zero exit."""
    app = create_app(settings, url)
    app[SERVE_FAILURE] = []
    if embedded is not None:
        server = embedded

        async def embedded_ctx(app: web.Application) -> AsyncIterator[None]:
            keeper = asyncio.create_task(_keep_alive_or_stop(app, server))
            yield
            keeper.cancel()

        async def shutting_down(app: web.Application) -> None:
            app[SHUTTING_DOWN].set()

        app[SHUTTING_DOWN] = asyncio.Event()
        app.on_shutdown.append(shutting_down)

        app.cleanup_ctx.append(embedded_ctx)
    if handlers is not None:

        async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
            try:
                async with running_worker(settings, url, handlers, with_poller=True) as worker:
                    watcher = asyncio.create_task(_stop_process_when_failed(worker))
                    yield
                    watcher.cancel()
            except WorkerFailed as exc:
                app[SERVE_FAILURE].append(str(exc))

        app.cleanup_ctx.append(worker_ctx)
    if settings.dashboard.token:
        from processor import dashboard  # imported only when served: `ftjobs --help` stays fast

        dashboard.mount(app, settings, url)
    return app


async def _keep_alive_or_stop(app: web.Application, server: EmbeddedValkey) -> None:
    try:
        await server.keep_alive()
    except Exception as exc:  # ServerLost, or a bug: either way the server is gone, so is the service
        app[SERVE_FAILURE].append(str(exc))
        log.critical("embedded_valkey_lost", error=str(exc))
        if not app[SHUTTING_DOWN].is_set():  # a second SIGTERM would cut the workers' drain short
            signal.raise_signal(signal.SIGTERM)


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


async def work_until_signal(
    settings: Settings,
    url: str,
    handlers: list[Handler],
    *,
    health_port: int | None = None,
    metrics_port: int | None = None,
) -> int:
    """`ftjobs work`: run the workers until SIGTERM/SIGINT, then stop gracefully; the exit code (1 when a
    task of the worker died for good). With `health_port`, serve `GET /healthz` there meanwhile; with
    `metrics_port`, `GET /metrics` on `receiver.metrics_host`."""
    stop = _stop_on_signals()
    metrics_host = settings.receiver.metrics_host
    try:
        async with (
            running_worker(settings, url, handlers) as worker,
            _health_server(worker, health_port),
            gauges.serving(metrics_host, metrics_port, worker.streams, settings.handlers),
        ):
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
    async with open_runtime(settings, url) as runtime:
        poller = runtime.poller(await runtime.openai())
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


def run_http(app: web.Application, host: str, port: int, *, reuse_port: bool = False, announce: bool = True) -> None:
    """Serve `app` until SIGTERM/SIGINT (aiohttp then runs the app's cleanup: workers stop gracefully).

    The server options (no decompression, timeouts, header limits) are the ones `create_app` put on the app.
    Once the port is bound, one `listening` line says where (unless `announce` is off).
    """
    web.run_app(
        app,
        host=host,
        port=port,
        print=_announcer(host, port) if announce else None,
        access_log=None,
        loop=new_loop(),
        reuse_port=reuse_port,
        **app[SERVER_OPTIONS],
    )


def _announcer(host: str, port: int) -> Callable[[str], None]:
    """What aiohttp calls (instead of `print`) once the port is bound."""
    return lambda _: log.info("listening", address=f"http://{host}:{port}", pid=os.getpid())


def run_receivers(count: int, make_app: Callable[[], web.Application], host: str, port: int) -> None:
    """`count` receiver processes on one port (SO_REUSEPORT: the kernel spreads connections across them).

    The children are forked before any event loop exists; each builds its own app and Redis connections.
    On SIGTERM the parent stops serving, then asks each child to stop and waits for it. Their counters are
    kept in a private folder (`metrics.share_between_processes`), removed at the end.
    """
    if count <= 1:
        run_http(make_app(), host, port)
        return
    shared = tempfile.mkdtemp(prefix="ftjobs-metrics-")
    metrics.share_between_processes(shared)
    children: list[int] = []
    for _ in range(count - 1):
        pid = os.fork()
        if pid == 0:  # child: serve until told to stop, then leave without running the parent's cleanup
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
            try:
                run_http(make_app(), host, port, reuse_port=True, announce=False)
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
        shutil.rmtree(shared, ignore_errors=True)
