"""The composition root: which Redis a process uses, and the shared objects built on it, once.

`open_runtime(settings, url)` builds the Redis client, the key names, the streams, the enqueuer, the job
state and the dead letters; on demand it opens the OpenAI client, the hydration step and the poller, and
sets up the handlers. Everything is closed in reverse order when the block ends (an `AsyncExitStack`), so a
handler whose `setup` fails closes what was already opened. The receiver, the worker, the poller and every
operator command take what they need from a `Runtime`; no other module calls these constructors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import structlog
from redis.exceptions import ResponseError

from processor import embedded
from processor.batch import wait_command
from processor.client import REDIS_ERRORS, Client, connect, open_client, text
from processor.deadletters import DeadLetters
from processor.enqueue import Enqueuer
from processor.errors import ConfigError
from processor.handler import Handler, HandlerContext, NeedsClose, NeedsSetup
from processor.jobstate import JobState
from processor.keys import Keys
from processor.logs import redact
from processor.settings import Settings
from processor.stream import Streams

if TYPE_CHECKING:  # imported where used: the operator commands need none of them (nor aiohttp, under openai)
    from processor.hydration import Preparer
    from processor.openai import OpenAIClient
    from processor.poller import Poller
    from processor.worker import Worker

log = structlog.get_logger()


class Runtime:
    """The objects one process shares, built from the settings and a Redis URL (use `open_runtime`)."""

    def __init__(self, settings: Settings, url: str, client: Client, stack: contextlib.AsyncExitStack) -> None:
        self.settings = settings
        self.url = url
        self._stack = stack
        self.client = client
        store = settings.redis
        self.keys = Keys(store.prefix, store.partitions)
        self.streams = Streams(self.client, self.keys)
        self.enqueuer = Enqueuer(
            self.client,
            self.keys,
            ttl_s=settings.receiver.dedupe_window_s,
            state_ttl_s=store.retention_s,
            max_batch=settings.receiver.max_batch,
            wait=wait_command(store.wait_replicas, store.wait_aof, store.wait_timeout_ms),
            groups=[h.name for h in settings.handlers],
        )
        self.jobs = JobState(self.client, self.keys, settings.redis.retention_s)
        self.dead_letters = DeadLetters(self.streams, enqueuer=self.enqueuer, retention_s=store.retention_s)
        self._api: OpenAIClient | None = None

    async def openai(self) -> OpenAIClient:
        """The OpenAI API client: opened on first use, closed with the runtime."""
        if self._api is None:
            from processor.openai import OpenAIClient

            self._api = await self._stack.enter_async_context(OpenAIClient(self.settings.openai))
        return self._api

    async def preparer(self) -> Preparer:
        """The hydration step, with the API client when hydration is on (it needs an API key)."""
        from processor.hydration import Preparer

        openai = self.settings.openai
        api = await self.openai() if openai.api_key and openai.hydrate else None
        if api is None:
            log.info("hydration_off", reason="no OPENAI_API_KEY" if openai.hydrate else "openai.hydrate = false")
        return Preparer(self.jobs, api, openai.hydrate_retry_s)

    def poller(self, api: OpenAIClient) -> Poller:
        """The poller, enqueueing through this runtime's enqueuer."""
        from processor.poller import Poller

        return Poller(self.settings, self.streams, api, self.enqueuer)

    async def set_up(self, handlers: list[Handler]) -> None:
        """Set up each handler (in the order of `[[handlers]]`); each one set up is closed with the runtime, so
        when a later `setup` fails, those before it are closed."""
        for handler, spec in zip(handlers, self.settings.handlers, strict=True):
            if isinstance(handler, NeedsSetup):
                prefix = self.keys.handler_state(handler.name)
                await handler.setup(HandlerContext(redis=self.client, key_prefix=prefix, timeout_s=spec.timeout_s))
            if isinstance(handler, NeedsClose):
                self._stack.push_async_callback(handler.close)


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings, url: str, *, socket_timeout: float = 5.0, quiet: bool = False
) -> AsyncIterator[Runtime]:
    """A `Runtime` on `url` for the block; everything it opened is closed afterwards, in reverse order.

    `socket_timeout` must exceed the longest blocking read on the client (the worker passes a larger one);
    `quiet`: an operator command (no warning when Redis does not answer: the command says so itself).
    """
    async with contextlib.AsyncExitStack() as stack:
        cluster = {"auto": None, "yes": True, "no": False}[settings.redis.cluster]
        client = await open_client(url, socket_timeout=socket_timeout, cluster=cluster, quiet=quiet)
        stack.push_async_callback(client.aclose)
        yield Runtime(settings, url, client, stack)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, url: str, handlers: list[Handler], *, with_poller: bool = False
) -> AsyncIterator[Worker]:
    """Set up handlers, run a `Worker` (and the poller, when asked and configured) until exit, then stop."""
    from processor.worker import Worker

    async with open_runtime(settings, url, socket_timeout=settings.worker.block_ms / 1000 + 10) as runtime:
        await runtime.set_up(handlers)
        preparer = await runtime.preparer()
        tasks: dict[str, Callable[[], Awaitable[None]]] = {}
        if with_poller and settings.openai.poll_interval_s > 0:
            if preparer.api is None:
                log.warning("poller_off", reason="set OPENAI_API_KEY (and openai.hydrate) to poll")
            else:
                tasks["poller"] = runtime.poller(preparer.api).run
        worker = Worker(
            handlers, settings.handlers, runtime.streams, settings.worker, settings.redis, preparer, tasks=tasks
        )
        task = asyncio.create_task(worker.run(), name="worker")
        try:
            yield worker
        finally:
            worker.stop()
            await task


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
def redis_for(settings: Settings, *, start_embedded: bool) -> Iterator[tuple[str, embedded.EmbeddedValkey | None]]:
    """Yield a Redis URL, and the embedded Valkey when one is started here because none is configured (it is
    stopped afterwards). Starting one claims the data directory (`embedded.claim`): a second `serve` on it is
    refused, and the server of one that just died is waited for, not attached to."""
    if settings.redis.url or not start_embedded:
        yield redis_url(settings), None
        return
    with embedded.claim(settings.redis.data_dir) as lock:  # one `serve` per data directory, never an orphan's
        server = embedded.EmbeddedValkey(settings.redis.data_dir, lock=lock)
        try:
            server.start()
            yield server.url, server
        finally:
            server.stop()


#: What each `appendfsync` short of `always` can lose on a crash of the server: with `everysec` the write of the
#: AOF itself waits while a slow fsync runs (up to 2 s); with `no` the OS writes it out when it likes.
_DEFERRED_FSYNC: Final = {"everysec": "up to about 2 s", "no": "up to about 30 s (the OS's write-back)"}


async def _check_wait_aof(client: Client, url: str) -> None:
    """`wait_aof` needs WAITAOF (Redis 7.2+, Valkey 8+) and the AOF on: without them every write would be
    answered 503, so the receiver refuses to start instead. With nothing written yet, the probe answers at
    once."""
    try:
        await client.execute_command("WAITAOF", 1, 0, 1000)
    except ResponseError as exc:
        raise ConfigError(
            f"redis.wait_aof = true, but {redact(url)} cannot confirm writes in its append-only file "
            f"({str(exc).strip()}): it needs Redis 7.2 or later (or Valkey 8) with appendonly yes; "
            "or set wait_aof = false"
        ) from None


async def check_persistence(url: str, *, wait_aof: bool = False) -> None:
    """Warn when an external server would lose acknowledged events on a crash: AOF and RDB both off, or an
    AOF that is not fsynced before the answer (`appendfsync everysec`/`no`) while `wait_aof` is off. With
    `everysec`, Valkey and Redis postpone even the AOF's write() while a slow fsync runs (up to 2 s) and
    still answer, so a SIGKILL of the server, not only a power cut, can lose what they acknowledged.
    Raises `ConfigError` when `wait_aof` is on and the server cannot do it."""
    client = connect(url)
    try:
        if wait_aof:
            await _check_wait_aof(client, url)
        config: dict[Any, Any] = await client.config_get("appendonly")
        config |= await client.config_get("save")
        config |= await client.config_get("appendfsync")
    except ResponseError:  # managed services often refuse CONFIG
        log.warning("redis_persistence_unknown", url=redact(url), hint="make sure AOF is on (appendfsync always)")
        return
    except (*REDIS_ERRORS, OSError) as exc:
        log.warning("redis_unavailable_at_start", url=redact(url), error=type(exc).__name__)
        return
    finally:
        await client.aclose()
    values = {text(k): text(v) for k, v in config.items()}
    appendonly, save, fsync = values.get("appendonly", ""), values.get("save", ""), values.get("appendfsync", "")
    if appendonly != "yes":
        log.warning(
            "redis_persistence_off" if not save else "redis_aof_off",
            url=redact(url),
            appendonly=appendonly,
            save=save or "(none)",
            hint="acknowledged events can be lost on a Redis crash; enable appendonly yes, appendfsync always",
        )
    elif fsync in _DEFERRED_FSYNC and not wait_aof:
        log.warning(
            "redis_fsync_deferred",
            url=redact(url),
            appendfsync=fsync,
            hint=f"a Redis crash can lose {_DEFERRED_FSYNC[fsync]} of acknowledged events; set appendfsync always "
            "(recommended), or redis.wait_aof = true (each answer then waits for the next fsync)",
        )
