"""Shared fixtures: a real Redis (the machine's, when `REDIS_URL` is set) or a real embedded Valkey.

Every test gets its own key prefix, deleted afterwards, so tests never see each other's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from processor import registry, signatures
from processor.client import Client
from processor.embedded import EmbeddedValkey
from processor.errors import ConfigError
from processor.eventrecord import decode_event
from processor.httpserver import SERVER_OPTIONS
from processor.models import Event
from processor.receiver import create_app
from processor.runtime import running_worker
from processor.settings import COMMON_HANDLER_KEYS, Settings
from tests.clients import async_client
from tests.processes import Proc

PATH = "/webhooks/openai"
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "processor" / "samples"
SECRET = "whsec_ZmluZS10dW5pbmctd2ViaG9va3MtdGVzdC1rZXktMzI="
PREVIOUS_SECRET = "whsec_cHJldmlvdXMtcm90YXRlZC1zZWNyZXQta2V5LTAwMDE="


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def compact(raw: bytes) -> bytes:
    """The compact serialisation senders use (and the signature vectors are computed over)."""
    return msgspec.json.encode(msgspec.json.decode(raw))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """`REDIS_URL` when set (CI: the machine's Redis 7), else a private embedded Valkey for the session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    data = Path(tempfile.mkdtemp(prefix="ftjobs-test-"))
    server = EmbeddedValkey(data)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def rclient(redis_url: str, prefix: str) -> AsyncIterator[Client]:
    """A client for assertions (the cluster client on a cluster); deletes every key under the test's prefix
    afterwards (on a cluster SCAN visits every master, and DELETE is split by slot)."""
    client = await async_client(redis_url)
    try:
        yield client
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def make_settings(redis_url: str, prefix: str, tmp_path: Path, rclient: Client) -> Callable[..., Settings]:
    """Settings for a test: its own prefix (cleaned up by `rclient`), the test secret, fast worker timings."""

    def make(handlers: list[dict[str, Any]] | None = None, **tables: dict[str, Any]) -> Settings:
        raw: dict[str, Any] = {
            "receiver": {"secrets": [SECRET]} | tables.pop("receiver", {}),
            "redis": {"url": redis_url, "prefix": prefix, "data_dir": str(tmp_path / "data")} | tables.pop("redis", {}),
            "worker": {"lease_s": 2.0, "block_ms": 100, "grace_s": 5.0} | tables.pop("worker", {}),
            **tables,
        }
        if handlers is not None:
            raw["handlers"] = handlers
        return Settings.from_raw(raw, env={})

    return make


@pytest.fixture
def aiohttp_client(aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """pytest-aiohttp's client factory, serving a receiver app with the server options `ftjobs` runs it with.

    `create_app` stores them on the app (no decompression, idle timeout, header limits); without this the
    tests would exercise aiohttp's defaults instead of the production server.
    """

    async def make(app: Any, **kwargs: Any) -> TestClient:
        if isinstance(app, web.Application) and SERVER_OPTIONS in app:
            server = TestServer(app)  # its constructor ignores server options; start_server takes them
            await server.start_server(**app[SERVER_OPTIONS])
            app = server
        client: TestClient = await aiohttp_client(app, **kwargs)  # closing the client closes the server
        return client

    return make


def sink(name: str, redis_url: str, prefix: str, **options: Any) -> dict[str, Any]:
    """A `[[handlers]]` table for a `tests.sinks:Sink` writing under the test's prefix, at
    `{prefix}:{sink:NAME}`: the hash tag keeps the sink's keys in one cluster slot, for its Lua step."""
    common = {k: options.pop(k) for k in list(options) if k in COMMON_HANDLER_KEYS}
    return (
        {"name": name, "type": "tests.sinks:Sink", "redis_url": redis_url, "key": f"{prefix}:{{sink:{name}}}"}
        | common
        | options
    )


def build_fails(table: dict[str, Any], message: str) -> None:
    """Building this `[[handlers]]` table fails with a configuration error matching `message`."""
    settings = Settings.from_raw({"handlers": [table]}, env={})
    with pytest.raises(ConfigError, match=message):
        registry.build(settings.handlers)


def signed(body: bytes, webhook_id: str | None = None, secret: str = SECRET, **extra: str) -> dict[str, str]:
    """Headers for a correctly signed JSON delivery."""
    headers = signatures.signed_headers([signatures.parse_secret(secret)], webhook_id or f"wh_{uuid.uuid4().hex}", body)
    return headers | {"content-type": "application/json"} | extra


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class Rig:
    """A receiver (aiohttp test server) and a running worker, for one settings object."""

    def __init__(self, client: TestClient, settings: Settings, rclient: Client, prefix: str) -> None:
        self.client = client
        self.settings = settings
        self.rclient = rclient
        self.prefix = prefix

    async def post(self, body: bytes, webhook_id: str | None = None) -> dict[str, Any]:
        resp = await self.client.post(PATH, data=body, headers=signed(body, webhook_id))
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer

    async def delivered(self, name: str) -> list[Event]:
        return [decode_event(raw) for raw in await self.rclient.lrange(f"{self.prefix}:{{sink:{name}}}", 0, -1)]

    async def dead(self, name: str) -> list[dict[bytes, bytes]]:
        return [fields for _, fields in await self.rclient.xrange(f"{self.prefix}:{{dlq}}:{name}")]

    async def redeliver_first(self) -> None:
        """Put the stream's first entry in again, as happens after a crash between a side effect and its ack."""
        [(_, fields)] = await self.rclient.xrange(f"{self.prefix}:{{p0}}:events", count=1)
        await self.rclient.xadd(f"{self.prefix}:{{p0}}:events", fields)

    async def settled(self) -> bool:
        """Every handler group has read and acknowledged everything."""
        groups = await self.rclient.xinfo_groups(f"{self.prefix}:{{p0}}:events")
        return all(g["lag"] == 0 and g["pending"] == 0 for g in groups)

    async def starts(self, name: str) -> int:
        n: int = await self.rclient.llen(f"{self.prefix}:{{sink:{name}}}:starts")
        return n


@pytest.fixture
def rig(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    rclient: Client,
    prefix: str,
) -> Callable[..., Any]:
    """`async with rig(handlers) as r:` — receiver + worker for those handler tables."""

    @contextlib.asynccontextmanager
    async def make(handlers: list[dict[str, Any]], **tables: Any) -> AsyncIterator[Rig]:
        settings = make_settings(handlers, **tables)
        client = await aiohttp_client(create_app(settings, redis_url))
        async with running_worker(settings, redis_url, registry.build(settings.handlers)):
            yield Rig(client, settings, rclient, prefix)

    return make


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    """Start `ftjobs` subprocesses; any still running at the end is killed."""
    started: list[Proc] = []

    def start(args: list[str], cwd: Path, env: dict[str, str], name: str) -> Proc:
        proc = Proc(args, cwd, env, name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.stop(signal.SIGKILL)


def make_poller(settings: Settings, rclient: Any, api: Any) -> Any:
    """A poller on the settings' prefix, with an enqueuer of its own (as `runtime.Runtime.poller` builds it)."""
    from processor.enqueue import Enqueuer
    from processor.keys import Keys
    from processor.poller import Poller
    from processor.stream import Streams

    keys = Keys(settings.redis.prefix)
    enqueuer = Enqueuer(rclient, keys, ttl_s=settings.receiver.dedupe_window_s, state_ttl_s=settings.redis.retention_s)
    return Poller(settings, Streams(rclient, keys), api, enqueuer)


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Log entries as structlog's `capture_logs` gives them, with the context variables and the current
    delivery merged in, as `logs.configure` does (its own `processors=` argument needs structlog 25.5; this
    works on every version we support)."""
    import structlog

    from processor.logs import merge_delivery

    capture = structlog.testing.LogCapture()
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    processors.clear()  # in place: loggers cached on first use hold this very list
    processors.extend([structlog.contextvars.merge_contextvars, merge_delivery, capture])
    try:
        yield capture.entries
    finally:
        processors.clear()
        processors.extend(saved)
